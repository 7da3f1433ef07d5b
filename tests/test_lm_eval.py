"""lm-eval-harness on an export of scripts/create.sh, offline, with the repository's German task (eval/tasks): every
log-likelihood lm-eval reports, and the accuracies and perplexities it aggregates from them, equal our own forward
pass (lit_gpt's GPT on the checkpoint's weights, our Tokenizer) on the same items."""
from __future__ import annotations

import math

import pytest
from lm_eval_helpers import TASKS, Reference, read_jsonl

from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer

TASK_DIR = TASKS / "llammlein_de"


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


@pytest.mark.slow
def test_lm_eval_on_an_export(hf_lm_eval_run, tokenizer_dir):
    results, samples = hf_lm_eval_run.results, hf_lm_eval_run.samples
    model = GPT(hf_lm_eval_run.config).eval()
    model.load_state_dict(hf_lm_eval_run.state)
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
