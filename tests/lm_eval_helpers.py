"""The export every lm-eval comparison reads, scored once per session by `lm_eval --model hf` (the README's command)
on the repository's tasks, and the direct computation of lm-eval's scores with our own model (`Reference`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from hf_helpers import random_state, small_config, write_run_dir

from lit_gpt.config import Config
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer

TASKS = ROOT / "eval" / "tasks"
HF_TASKS = ("llammlein_de", "llammlein_de_gen")  # every output type but loglikelihood_rolling


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class Reference:
    """Scores as lm-eval defines them, computed with our model and tokenizer."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def score(self, ids: list[int], first_target: int) -> float:
        """Sum of log p(ids[i] | ids[:i]) for i >= first_target."""
        logprobs = torch.log_softmax(self.model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
        targets = torch.tensor(ids[first_target:])
        return logprobs[torch.arange(first_target - 1, len(ids) - 1), targets].sum().item()

    def choice(self, context: str, choice: str) -> float:
        """The choice's tokens are those of "context choice" (BOS first) after the tokens of the context alone."""
        context_ids = self.tokenizer.encode(context)
        return self.score(self.tokenizer.encode(f"{context} {choice}"), len(context_ids))

    def text(self, text: str) -> float:
        """Every token of the text after one BOS."""
        ids = self.tokenizer.encode(text)
        assert ids[0] == self.tokenizer.bos_id and ids[1] != self.tokenizer.bos_id
        return self.score(ids, 1)


@dataclass
class HFRun:
    config: Config
    state: dict
    checkpoint: Path
    export: Path
    results: dict  # lm-eval's "results" of the hf run
    samples: dict[str, list[dict]]  # its logged samples per task


@pytest.fixture(scope="session")
def hf_lm_eval_run(tmp_path_factory, tokenizer_dir) -> HFRun:
    """A random checkpoint (trainer layout), its verified export (what scripts/create.sh runs), and `lm_eval --model
    hf` on the export with HF_TASKS, run offline from another working directory."""
    from scripts.convert_lit_checkpoint import main as convert_main

    base = tmp_path_factory.mktemp("lm_eval_hf")
    config = small_config(2)  # block_size 128: every item fits
    state = random_state(config, seed=3)
    checkpoint = write_run_dir(base / "run", config, tokenizer_dir, state)
    export = base / "hf"
    assert convert_main(["--checkpoint", str(checkpoint), "--out_dir", str(export), "--dtype", "fp32", "--verify"]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
         "--tasks", ",".join(HF_TASKS), "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(base / "results"), "--log_samples"],
        cwd=base, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "HF_HOME": str(base / "hf_home")})  # nothing from the Hub, no shared cache
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = (base / "results").rglob("results_*.json")
    tasks = ("llammlein_de_mc", "llammlein_de_ppl", "llammlein_de_gen")
    samples = {task: read_jsonl(next((base / "results").rglob(f"samples_{task}_*.jsonl"))) for task in tasks}
    return HFRun(config, state, checkpoint, export, json.loads(results_file.read_text())["results"], samples)
