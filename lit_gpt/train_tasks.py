"""lm-eval tasks scored during training (--eval_tasks, --eval_task_interval): in-process, on the live (sharded) model,
every rank taking part (lit_gpt/lm_eval_adapter.py). lm-eval is imported only when tasks are asked for."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lit_gpt.errors import InputError


class TrainTasks:
    """The run's lm-eval tasks, checked at start-up: a task lm-eval cannot load here (unknown, or its data not
    available offline) stops the run before anything is written."""

    def __init__(self, tasks: str, interval: int, limit: int, batch_size: int, tokenizer_path: str,
                 device: torch.device) -> None:
        self.tasks = [t for t in tasks.split(",") if t]
        self.interval, self.limit, self.batch_size, self.device = interval, limit or None, batch_size, device
        self.tokenizer = None
        if not self.tasks:
            return
        if not tokenizer_path:
            raise InputError("--eval_tasks: needs the run's tokenizer (--tokenizer_path)")
        try:
            from lit_gpt.lm_eval_adapter import check_tasks_available
        except ImportError as e:
            raise InputError(f"--eval_tasks: lm-eval is not installed ({e}); pip install -e '.[eval]'") from None
        from lit_gpt.tokenizer import Tokenizer

        try:
            check_tasks_available(self.tasks)
        except InputError as e:
            raise InputError(f"--eval_tasks: {e}") from None
        try:
            self.tokenizer = Tokenizer(Path(tokenizer_path))
        except ValueError as e:
            raise InputError(f"--tokenizer_path: {e}") from None

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def due(self, step: int, max_steps: int) -> bool:
        """After every eval_task_interval steps before the last (the end has its own run)."""
        return bool(self.tasks) and bool(self.interval) and step % self.interval == 0 and step < max_steps

    def run(self, model) -> tuple[dict[str, dict[str, float]], float]:
        """({task: {metric: value}}, seconds spent); collective: every rank calls it. The model's mode and the random
        streams are left as they were."""
        from lit_gpt.lm_eval_adapter import evaluate_tasks

        start = time.perf_counter()
        scores = evaluate_tasks(model, self.tokenizer, self.tasks, batch_size=self.batch_size, limit=self.limit,
                                device=self.device)
        return scores, time.perf_counter() - start
