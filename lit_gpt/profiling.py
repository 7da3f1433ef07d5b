"""A profiler window: `--profile_steps 20:25` records a torch.profiler trace of optimizer steps 20..24 (and, on a
GPU, a CUDA memory snapshot over the same steps) into out_dir/profile/. Off by default, and then free: the training
loop calls `step()`, which returns at once.

Traces are written per rank in the format TensorBoard's profiler plugin and Perfetto (ui.perfetto.dev) open;
memory snapshots (`memory-rankR.pickle`) open in pytorch.org/memory_viz.
"""
from __future__ import annotations

from pathlib import Path

from lit_gpt.run_dir import RunDir

# torch is imported where it is used: the trainer checks --profile_steps (parse_window) before importing torch.


def parse_window(spec: str) -> tuple[int, int] | None:
    """"START:END" -> (START, END) with 0 <= START < END; "" -> None. ValueError otherwise."""
    if not spec:
        return None
    try:
        start, end = (int(part) for part in spec.split(":"))
    except ValueError:
        raise ValueError(f"expected START:END (optimizer steps), got {spec!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"expected 0 <= START < END, got {spec!r}")
    return start, end


class ProfileWindow:
    def __init__(self, spec: str, out_dir: Path, rank: int, device) -> None:
        self.window = parse_window(spec)
        self.dir, self.rank, self.cuda = RunDir(out_dir).profile, rank, device.type == "cuda"
        self.profiler = None  # a torch.profiler.profile while recording
        self.marker = None  # the open record_function span of the current step

    def step(self, step: int) -> None:
        """Call before optimizer step `step` (0-based) and once after the last one: each recorded step is a span
        named `train_step#N` in the trace."""
        if self.window is None:
            return
        start, end = self.window
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if step == start and self.profiler is None:
            self._start()
        elif self.profiler is not None and step >= end:
            self._stop()
        if self.profiler is not None:
            import torch

            self.marker = torch.profiler.record_function(f"train_step#{step}")
            self.marker.__enter__()

    def close(self) -> None:
        """The run stopped inside the window: keep what was recorded."""
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if self.profiler is not None:
            self._stop()

    def _start(self) -> None:
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                               with_stack=False)
        self.profiler.start()

    def _stop(self) -> None:
        import torch

        self.profiler.stop()
        # The name TensorBoard's profiler plugin looks for (*.pt.trace.json); Perfetto opens it too.
        self.profiler.export_chrome_trace(str(self.dir / f"rank{self.rank}.pt.trace.json"))
        self.profiler = None
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"memory-rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
