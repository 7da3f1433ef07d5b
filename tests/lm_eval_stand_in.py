"""A stand-in for lit_gpt.lm_eval_adapter (same two functions) whose scores are a deterministic function of the model
and the tokenizer, computed at once: what the fast tests of the evaluation plumbing (evaluate.py --tasks and its
records) compare against."""
from __future__ import annotations

import math

import torch

from lit_gpt.errors import InputError

TEXTS = {"stand_in_de": "Der König geht über die Brücke nach München.",
         "stand_in_de_2": "Das Mädchen liest fünf Bücher im Frühling.",
         "stand_in_offline": ""}


def check_tasks_available(tasks: list[str]) -> None:
    for task in tasks:
        if task not in TEXTS:
            raise InputError(f"unknown task {task!r}")


@torch.no_grad()
def evaluate_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
                   device=None) -> dict[str, dict[str, float]]:
    """Per task: the mean log-likelihood of its sentence's tokens after BOS, as acc (its exp) and word_perplexity."""
    scores = {}
    for task in tasks:
        if task == "stand_in_offline":  # what the datasets library raises offline for a dataset it has not cached
            raise ConnectionError("Couldn't reach 'org/stand_in_offline' on the Hub (OfflineModeIsEnabled)")
        ids = torch.tensor([tokenizer.encode(TEXTS[task])], device=device)
        logprobs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)
        mean = logprobs.gather(-1, ids[:, 1:, None]).mean().item()
        scores[task] = {"acc,none": math.exp(mean), "acc_stderr,none": "N/A", "word_perplexity,none": math.exp(-mean),
                        "limit": float(limit or 0)}
    return scores
