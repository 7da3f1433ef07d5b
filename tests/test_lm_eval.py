"""lm-eval-harness on an export of scripts/create.sh, offline, with the repository's German task (eval/tasks): every
log-likelihood lm-eval reports, and the accuracies and perplexities it aggregates from them, equal our own forward
pass (lit_gpt's GPT on the checkpoint's weights, our Tokenizer) on the same items."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hf_helpers import random_state, small_config, write_run_dir

from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from scripts.convert_lit_checkpoint import main as convert_main

TASKS = ROOT / "eval" / "tasks"
TASK_DIR = TASKS / "llammlein_de"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_task_items_are_well_formed():
    items = read_jsonl(TASK_DIR / "mc.jsonl")
    assert len(items) == 40 and len({i["id"] for i in items}) == 40
    for item in items:
        assert 2 <= len(item["choices"]) <= 4 and len(set(item["choices"])) == len(item["choices"]), item["id"]
        assert 0 <= item["label"] < len(item["choices"]), item["id"]
        assert item["context"] == item["context"].strip()  # lm-eval puts the one space before each choice
    assert len({i["label"] for i in items}) == 3  # the right answer is not always in the same place
    texts = read_jsonl(TASK_DIR / "ppl.jsonl")
    assert len(texts) == 26 and all(t["text"] == t["text"].strip() and len(t["text"]) < 200 for t in texts)


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


@pytest.mark.slow
def test_lm_eval_on_an_export(tmp_path, tokenizer_dir):
    config = small_config(2)  # block_size 128: every item fits
    state = random_state(config, seed=3)
    checkpoint = write_run_dir(tmp_path / "run", config, tokenizer_dir, state)
    export = tmp_path / "hf"
    # what scripts/create.sh runs (in this process: one interpreter start less)
    assert convert_main(["--checkpoint", str(checkpoint), "--out_dir", str(export), "--dtype", "fp32", "--verify"]) == 0

    # The README's command, from another working directory (the task finds its own data files).
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
         "--tasks", "llammlein_de", "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(tmp_path / "results"), "--log_samples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "HF_HOME": str(tmp_path / "hf_home")})  # nothing from the Hub, no shared cache
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    samples = {task: read_jsonl(next((tmp_path / "results").rglob(f"samples_{task}_*.jsonl")))
               for task in ("llammlein_de_mc", "llammlein_de_ppl")}

    model = GPT(config).eval()
    model.load_state_dict(state)
    reference = Reference(model, Tokenizer(tokenizer_dir))

    items = read_jsonl(TASK_DIR / "mc.jsonl")
    assert sorted(s["doc"]["id"] for s in samples["llammlein_de_mc"]) == [i["id"] for i in items]
    correct = correct_norm = 0
    for sample in samples["llammlein_de_mc"]:
        item = sample["doc"]
        theirs = [float(ll) for ll, _greedy in sample["filtered_resps"]]
        ours = [reference.choice(item["context"], c) for c in item["choices"]]
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-3), item["id"]
        correct += max(range(len(ours)), key=ours.__getitem__) == item["label"]
        correct_norm += max(range(len(ours)), key=lambda i: ours[i] / len(item["choices"][i])) == item["label"]
    assert results["llammlein_de_mc"]["acc,none"] == pytest.approx(correct / len(items))
    assert results["llammlein_de_mc"]["acc_norm,none"] == pytest.approx(correct_norm / len(items))

    texts = read_jsonl(TASK_DIR / "ppl.jsonl")
    assert sorted(s["doc"]["id"] for s in samples["llammlein_de_ppl"]) == [t["id"] for t in texts]
    loglikelihood = 0.0
    for sample in samples["llammlein_de_ppl"]:
        ours = reference.text(sample["doc"]["text"])
        assert float(sample["filtered_resps"][0][0]) == pytest.approx(ours, rel=1e-5, abs=1e-3)
        loglikelihood += ours
    words = sum(len(t["text"].split()) for t in texts)
    size = sum(len(t["text"].encode("utf-8")) for t in texts)
    ppl = results["llammlein_de_ppl"]
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-loglikelihood / words), rel=1e-4)
    assert ppl["byte_perplexity,none"] == pytest.approx(math.exp(-loglikelihood / size), rel=1e-4)
    assert ppl["bits_per_byte,none"] == pytest.approx(-loglikelihood / size / math.log(2), rel=1e-4)
