"""Measure the peak memory of training steps taken as the trainer takes them, to compare lit_gpt.memory_estimate with.

    python tests/memory_probe.py SPECS_JSON OUT_JSON    (Fabric starts the other ranks of a multi-device spec itself)

The step is the trainer's: Fabric with the run's strategy and precision, the fused AdamW of `make_optimizer`, the
chunked loss with the logits dropped before backward, gradient accumulation under `no_backward_sync`, clipping.
Random tokens stand in for data. What is measured, above the moment before the model is built:

- CUDA: torch.cuda.max_memory_allocated();
- CPU: the peak resident set size (VmHWM, reset through /proc/self/clear_refs). Run with MALLOC_MMAP_THRESHOLD_ set
  (`measure` does): glibc then returns every freed tensor to the system at once, so the RSS follows the live tensors
  instead of glibc's cached heap.

The peak of each part of the last step (forward and loss, backward, optimizer step) is reported too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Allocations above 64 KiB are mmapped and unmapped when freed (glibc otherwise raises this threshold up to 32 MiB).
CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def measure(specs: list[dict], out_dir: Path, timeout: int = 600) -> list[dict]:
    """Run the probe in a fresh process (its ranks in their own) and return its results, one per spec. Specs of one
    device are measured one after the other in the same process; a multi-device spec must come alone."""
    if len(specs) > 1 and any(spec.get("devices", 1) > 1 for spec in specs):
        raise ValueError("a multi-device spec must be measured alone")
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = out_dir / "specs.json", out_dir / "results.json"
    spec_file.write_text(json.dumps(specs))
    env = {**os.environ, **CPU_ENV, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(spec_file), str(result_file)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"memory probe failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


class PeakMeter:
    """Peak memory above a baseline, resettable: the CUDA allocator's count, or the process's RSS on a CPU."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.device = device
        self.baseline = self.current()

    def current(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        """Peak since the last reset, above the baseline."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.max_memory_allocated(self.device) - self.baseline
        return _status_kib("VmHWM") * 1024 - self.baseline


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def run(spec: dict) -> dict:
    import torch
    from lightning.fabric import Fabric

    from lit_gpt.config import Config
    from lit_gpt.distributed import make_strategy

    devices, accelerator = spec.get("devices", 1), spec.get("accelerator", "cpu")
    fabric = Fabric(accelerator=accelerator, devices=devices, precision=spec["precision"],
                    strategy=make_strategy(spec.get("strategy", "auto"), devices, 1,
                                           spec.get("sharding_strategy", "FULL_SHARD")))
    fabric.launch()
    torch.set_float32_matmul_precision("high")
    fabric.seed_everything(0)
    config = Config.from_name(spec["model_name"], **spec.get("overrides", {}))
    # A first run of a one-layer model of the same widths loads every kernel and library the step uses (their pages
    # count in the RSS), so that the measured run counts only memory that grows with the model.
    train_steps(fabric, config.replace(n_layer=1, block_size=16), {**spec, "micro_batch_size": 1}, None)
    return train_steps(fabric, config, spec, PeakMeter(fabric.device))


def train_steps(fabric, config, spec: dict, meter: PeakMeter | None) -> dict:
    import torch

    from lit_gpt.loss import token_losses
    from lit_gpt.model import GPT
    from pretrain.tinyllama_fabric import TrainConfig, make_optimizer

    b, k = spec["micro_batch_size"], spec.get("micro_batches", 1)
    # The step's inputs exist before the baseline, as the data loader's batches do in the trainer.
    data = torch.randint(0, config.vocab_size, (k, b, config.block_size + 1), device=fabric.device)
    meter = meter or PeakMeter(fabric.device)
    meter.reset()
    with fabric.init_module():
        model = GPT(config)
    model.activation_checkpointing = spec.get("activation_checkpointing", False)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, TrainConfig()))
    phases = {}
    for _ in range(spec.get("steps", 2)):
        for i in range(k):
            with fabric.no_backward_sync(model, enabled=i < k - 1):
                logits = model(data[i, :, :-1])
                _, objective = token_losses(logits, data[i, :, 1:])
                del logits  # as the trainer does: the loss keeps only its gradient
                _note(phases, "forward and loss", meter)
                fabric.backward(objective / data[i, :, 1:].numel())
                _note(phases, "backward", meter)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _note(phases, "optimizer step", meter)
    peak = max(phases.values())
    peaks = fabric.all_gather(torch.tensor(peak, device=fabric.device)).reshape(-1).tolist()
    return {"peak": max(peaks), "rank_peaks": peaks, "phases": phases,
            "device": torch.cuda.get_device_name(fabric.device) if fabric.device.type == "cuda" else "cpu"}


def _note(phases: dict, name: str, meter: PeakMeter) -> None:
    """Record the peak of a part of the step (the largest over the steps), and start measuring the next part."""
    phases[name] = max(phases.get(name, 0), meter.peak())
    meter.reset()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    spec_file, result_file = sys.argv[1:3]
    results = [run(spec) for spec in json.loads(Path(spec_file).read_text())]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        Path(result_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
