"""What a run records besides checkpoints: its settings beside the checkpoints, and per logged step the metrics
(metrics.jsonl/.csv, TensorBoard/W&B) and the console line with tokens/s, MFU, memory and ETA."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lit_gpt.checkpoint.find import latest_checkpoint
from lit_gpt.checkpoint.layout import SaveError
from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.config import Config
from lit_gpt.loggers import RunLoggers
from lit_gpt.metrics_log import MetricsLog
from lit_gpt.resume import Progress
from lit_gpt.run_dir import RunDir
from lit_gpt.speed_monitor import MFU_CONVENTION, SpeedMonitor, matmul_parameters
from lit_gpt.stragglers import describe as describe_stragglers


def write_run_files(run: RunDir, hparams: dict, config: Config, tokenizer_path: str) -> None:
    """Beside the checkpoints: resolved hyperparameters, model config and the tokenizer (what an export needs)."""
    write_atomically(run.hparams, json.dumps(hparams, indent=2).encode())
    write_atomically(run.model_config, json.dumps(config.to_dict(), indent=2).encode())
    src = Path(tokenizer_path) if tokenizer_path else None
    if src is not None and src.exists():
        run.tokenizer.mkdir(exist_ok=True)
        files = [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]
        for f in files:
            write_atomically(run.tokenizer / ("tokenizer.model" if f.suffix == ".model" else f.name), f.read_bytes())


class RunLog:
    """Reports the run's steps and validations to metrics.jsonl/.csv, the loggers and the console (rank 0 writes)."""

    def __init__(self, monitor: SpeedMonitor, metrics: MetricsLog, loggers: RunLoggers, start: Progress,
                 log_interval: int, max_steps: int, device: torch.device, print_fn: Callable[..., None]) -> None:
        self.monitor, self.metrics, self.loggers = monitor, metrics, loggers
        self.log_interval, self.max_steps, self.device, self.print = log_interval, max_steps, device, print_fn
        self.start_time = time.perf_counter()
        monitor.update(start.step, start.tokens_seen)
        # The first record that could not be written (rank 0; e.g. a full disk): nothing more is written, and the
        # trainer stops at its next collective decision without saving (a resume trains those steps again).
        self.failure: str | None = None

    def hparams(self, hparams: dict) -> None:
        self._write(None, lambda: self.loggers.log_hparams(hparams))

    def _write(self, record: dict | None, log_metrics: Callable[[], None]) -> None:
        if self.failure is not None:
            return
        try:
            if record is not None:
                self.metrics.write(record)
            log_metrics()
        except SaveError as e:
            self.failure = str(e)

    def describe(self, model_name: str, config: Config, n_params: int, world: str, global_batch_size: int) -> None:
        """The run's size in one line, and how MFU is counted where it is (on a GPU of known peak)."""
        self.print(f"{model_name}: {n_params / 1e6:.1f}M parameters | {world} | {global_batch_size} samples x "
                   f"{config.block_size} tokens per step | {self.max_steps} steps")
        if self.monitor.peak_flops:
            self.print(f"MFU: {MFU_CONVENTION} ({matmul_parameters(config, n_params) / 1e6:.1f}M), over "
                       f"{self.monitor.peak_flops / 1e12:.0f} TFLOP/s dense bf16 per "
                       f"{torch.cuda.get_device_name(self.device)}")

    def stop_nonfinite(self, steps_in_a_row: int, run: RunDir) -> int:
        """Exit status 1, after saying where the run can go on from (collective: every rank calls it)."""
        good = latest_checkpoint(run.path)
        self.print(f"error: {steps_in_a_row} consecutive non-finite steps; stopping. "
                   + (f"The last good checkpoint is {good}" if good else "No checkpoint was written before."),
                   file=sys.stderr)
        return 1

    def stop_records_lost(self, failure: str, step: int, run: RunDir) -> int:
        """Exit status 1 for a record that could not be written: no checkpoint is saved past it, so a resume trains
        those steps again once it can be written."""
        good = latest_checkpoint(run.path, verify=False)
        self.print(f"error: {failure}; stopped at step {step} without saving"
                   + (f" (the last checkpoint is {good.name})" if good else "")
                   + "; once it can be written, --resume auto trains the steps after that checkpoint again",
                   file=sys.stderr)
        return 1

    def restart(self, progress: Progress, metrics: MetricsLog) -> None:
        """After an in-process rollback: the records go on from `progress`, in `metrics` (made for its step); the
        speed is measured anew (the token count went back)."""
        self.metrics = metrics
        self.monitor.records.clear()
        self.monitor.update(progress.step, progress.tokens_seen)

    def event(self, record: dict, line: str) -> None:
        """A record of something that happened (it has an "event" key: metrics.jsonl only) and its console line."""
        self._write(record, lambda: None)
        self.print(line)

    def logs_at(self, step: int) -> bool:
        """Whether the step after which `step` steps are done gets a record and a log line."""
        return step % self.log_interval == 0 or step == self.max_steps

    def step(self, progress: Progress, loss: float, grad_norm: float, lr: float,
             stragglers: list[dict] | None = None, extra: dict | None = None) -> None:
        """`extra`: more fields for the step's record (e.g. goodput), written when the step is logged."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.print(f"step {progress.step}: update skipped: non-finite " + " and ".join(
                f"{name} ({value})" for name, value in (("loss", loss), ("gradient norm", grad_norm))
                if not math.isfinite(value)))
        if not self.logs_at(progress.step):
            return
        self.monitor.update(progress.step, progress.tokens_seen)
        eta = self.monitor.eta_seconds(self.max_steps)
        memory = (torch.cuda.max_memory_allocated() if self.device.type == "cuda" else _peak_rss_bytes()) / 2**30
        tps, smoothed, mfu = self.monitor.tokens_per_sec(), self.monitor.smoothed_tokens_per_sec(), self.monitor.mfu()
        record = {"iter": progress.iter_num, "step": progress.step, "loss": loss if math.isfinite(loss) else None,
                  "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                  "tokens": progress.tokens_seen, "tokens_per_sec": tps, "tokens_per_sec_smoothed": smoothed,
                  "mfu": mfu, "skipped_steps": progress.skipped, "memory_gb": memory,
                  "time": time.perf_counter() - self.start_time, **(extra or {})}
        if stragglers:  # lit_gpt/stragglers.py: named only when some rank was markedly slower
            record["stragglers"] = stragglers
        self._write(record, lambda: self.loggers.log(
            {k: v for k, v in record.items() if v is not None and k not in ("step", "time", "stragglers")}, progress.step))
        self.print(f"step {progress.step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f}"
                   + (f" | {tps:,.0f} tok/s ({smoothed:,.0f} smoothed)" if tps else "")
                   + (f" | MFU {mfu:.1%}" if mfu else "") + f" | mem {memory:.1f} GiB"
                   + (f" | ETA {eta / 60:.1f} min" if eta is not None else "")
                   + (f" | stragglers: {describe_stragglers(stragglers)}" if stragglers else ""))

    def validation(self, progress: Progress, val_loss: float) -> None:
        self._write({"iter": progress.iter_num, "step": progress.step, "val_loss": val_loss},
                    lambda: self.loggers.log({"val_loss": val_loss}, progress.step))
        self.print(f"step {progress.step} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.1f}")

    def task_scores(self, progress: Progress, scores: dict[str, dict[str, float]], seconds: float) -> None:
        """lm-eval scores of the live model (lit_gpt/train_tasks.py): keys eval/TASK/METRIC, and eval/seconds."""
        flat = {f"eval/{task}/{metric}": value for task, metrics in scores.items() for metric, value in metrics.items()}
        flat["eval/seconds"] = seconds
        self._write({"iter": progress.iter_num, "step": progress.step, **flat},
                    lambda: self.loggers.log(flat, progress.step))
        self.print(f"step {progress.step} | lm-eval tasks in {seconds:.1f} s | "
                   + " | ".join(f"{key.removeprefix('eval/')} {value:.4f}" for key, value in flat.items()
                                if key != "eval/seconds"))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
