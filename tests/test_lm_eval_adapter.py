"""lit_gpt/lm_eval_adapter.py: lm-eval on our own GPT and Tokenizer scores what `lm_eval --model hf` scores on the
export of the same checkpoint, however the requests are batched and split over ranks."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script
from hf_helpers import random_state, small_config
from lm_eval_helpers import TASKS, Reference, read_jsonl

from lit_gpt import lm_eval_adapter
from lit_gpt.errors import InputError
from lit_gpt.lm_eval_adapter import LitGPTLM, check_tasks_available, evaluate_tasks
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer


def request(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer_dir):
    config = small_config(2)
    model = GPT(config).eval()
    model.load_state_dict(random_state(config, seed=5))
    return model, Tokenizer(tokenizer_dir)


def greedy(model: GPT, tokenizer: Tokenizer, context: str, stop: str, max_new: int) -> str:
    """One context at a time, the whole sequence recomputed per token: the padded rows never chosen, EOS ends it."""
    ids, new = tokenizer.encode(context), []
    with torch.no_grad():
        while len(new) < max_new:
            token = int(model(torch.tensor([ids]))[0, -1, :tokenizer.vocab_size].argmax())
            if token == tokenizer.eos_id:
                break
            ids, new = ids + [token], new + [token]
            if stop in tokenizer.decode(new):
                break
    return tokenizer.decode(new).split(stop)[0]


class Gathered(Exception):
    """Raised by the simulated all_gather_object once a rank's share is known."""


def on_ranks(monkeypatch, world: int, compute):
    """compute() as each of `world` ranks in turn, up to the gathering of its share; then once more as rank 0 with
    every share gathered. Returns that result and each rank's number of forward calls. (Generation's per-token
    agreement between ranks is the real distributed run's: here each rank stops on its own.)"""
    shares, calls = {}, []

    def share_only(out, obj):
        shares[len(calls)] = obj
        raise Gathered

    def all_shares(out, obj):
        out[:] = [shares[r] for r in range(world)]

    monkeypatch.setattr(LitGPTLM, "_any_rank", lambda self, flag: flag)
    original = LitGPTLM._logits
    count = [0]

    def counting(self, sequences):
        count[0] += 1
        return original(self, sequences)

    monkeypatch.setattr(LitGPTLM, "_logits", counting)
    if world == 1:
        monkeypatch.setattr(lm_eval_adapter, "_world", lambda: (0, 1))
        result = compute()
        monkeypatch.undo()
        return result, [count[0]]
    monkeypatch.setattr(torch.distributed, "all_gather_object", share_only)
    for rank in range(world):
        monkeypatch.setattr(lm_eval_adapter, "_world", lambda rank=rank: (rank, world))
        count[0] = 0
        with pytest.raises(Gathered):
            compute()
        calls.append(count[0])
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_shares)
    monkeypatch.setattr(lm_eval_adapter, "_world", lambda: (0, world))
    result = compute()
    monkeypatch.undo()
    return result, calls


def test_batches_and_rank_shares_score_as_one_forward_pass_per_request(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    reference = Reference(model, tokenizer)
    items = read_jsonl(TASKS / "llammlein_de" / "mc.jsonl")[:9]
    texts = [t["text"] for t in read_jsonl(TASKS / "llammlein_de" / "ppl.jsonl")[:4]]
    requests = [request(i["context"], f" {c}") for i in items for c in i["choices"]] + \
               [request("", text) for text in texts]
    expected = [reference.choice(i["context"], c) for i in items for c in i["choices"]] + \
               [reference.text(text) for text in texts]
    lm = LitGPTLM(model, tokenizer, batch_size=4)
    batches = math.ceil(len(requests) / 4)
    for world in (1, 3):
        scores, calls = on_ranks(monkeypatch, world, lambda: lm.loglikelihood(requests, disable_tqdm=True))
        assert [s for s, _ in scores] == pytest.approx(expected, rel=1e-5, abs=1e-4), world
        # every rank makes as many forward calls (dummy batches fill the short shares)
        assert calls == [math.ceil(batches / world)] * world, (world, calls)
    # greedy: the continuation is each position's argmax over the whole (padded) vocabulary
    context = tokenizer.encode("Die Kinder")
    ids = list(context)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    continuation = ids[len(context):]
    other = continuation[:-1] + [(continuation[-1] + 1) % 512]
    assert [g for _, g in lm._loglikelihood_tokens([(None, context, continuation), (None, context, other)])] == \
        [True, False]

    # loglikelihood_rolling: lm-eval's BOS prefix before the tokenizer's own (see llammlein_de_ppl.yaml), one window
    rolling = lm.loglikelihood_rolling([request(text) for text in texts], disable_tqdm=True)
    bos = tokenizer.bos_id
    assert rolling == pytest.approx([reference.score([bos] + tokenizer.encode(t), 1) for t in texts], rel=1e-5)
    # windows shorter than the text: every token still scored once, each window after the first conditioned on the
    # tokens before it (make_disjoint_window); the total is then lower than with the full context, but close
    short = LitGPTLM(model, tokenizer, batch_size=4, max_length=8).loglikelihood_rolling(
        [request(texts[0])], disable_tqdm=True)[0]
    assert short != pytest.approx(rolling[0], rel=1e-6) and short == pytest.approx(rolling[0], rel=0.5)

    contexts = [i["context"] for i in items]
    gen_kwargs = {"until": ["."], "max_gen_toks": 5, "do_sample": False}
    for world in (2,):
        generated, _ = on_ranks(monkeypatch, world, lambda: lm.generate_until(
            [request(c, gen_kwargs) for c in contexts], disable_tqdm=True))
        assert generated == [greedy(model, tokenizer, c, ".", 5) for c in contexts], world


def test_unknown_task_is_one_line_naming_it(tmp_path, monkeypatch):
    import lm_eval.tasks

    # lm-eval's own index of 15k tasks left out (15 s to build): the name is unknown either way
    monkeypatch.setattr(lm_eval_adapter, "TaskManager", lambda include_path, include_defaults=True:
                        lm_eval.tasks.TaskManager(include_path=include_path, include_defaults=False))
    with pytest.raises(InputError, match=r"^lm-eval task 'no_such_task_xyz': unknown to lm-eval") as e:
        check_tasks_available(["llammlein_de", "no_such_task_xyz"])
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="defines no task or group named 'empty'"):
        check_tasks_available([str(tmp_path / "empty")])


@pytest.mark.slow
def test_adapter_scores_equal_lm_eval_hf_on_the_export(hf_lm_eval_run, tokenizer_dir):
    model = GPT(hf_lm_eval_run.config).eval()
    model.load_state_dict(hf_lm_eval_run.state)
    tokenizer = Tokenizer(tokenizer_dir)
    ours = evaluate_tasks(model, tokenizer, [str(TASKS / "llammlein_de"), "llammlein_de_gen"], batch_size=5)
    theirs = hf_lm_eval_run.results
    assert sorted(ours) == ["llammlein_de_gen", "llammlein_de_mc", "llammlein_de_ppl"]
    for task in ("llammlein_de_mc", "llammlein_de_gen"):
        metrics = ("acc", "acc_norm") if task.endswith("mc") else ("exact_match",)
        assert ours[task] == {m: theirs[task][f"{m},none"] for m in metrics}, task
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["llammlein_de_ppl"][metric] == pytest.approx(theirs["llammlein_de_ppl"][f"{metric},none"],
                                                                  rel=1e-4), metric
    # the generations themselves, request by request (a random model rarely answers right: exact_match alone
    # would compare zeros)
    lm = LitGPTLM(model, tokenizer, batch_size=5)
    samples = hf_lm_eval_run.samples["llammlein_de_gen"]
    with torch.no_grad():
        generated = lm.generate_until([request(*s["arguments"]["gen_args_0"].values()) for s in samples])
    assert generated == [s["resps"][0][0] for s in samples]
    assert any(generated) and len(set(generated)) > 1


@pytest.mark.slow
def test_lm_eval_command_line_scores_a_training_checkpoint(hf_lm_eval_run, tmp_path):
    """`python -m lit_gpt.lm_eval_adapter --model lit_gpt --model_args checkpoint=...`: lm-eval's own command line
    on the checkpoint (no export) gives the hf run's scores."""
    run_script("-m", "lit_gpt.lm_eval_adapter", "--model", "lit_gpt", "--model_args",
               f"checkpoint={hf_lm_eval_run.checkpoint}", "--tasks", "llammlein_de", "--include_path", str(TASKS),
               "--device", "cpu", "--batch_size", "6", "--output_path", str(tmp_path / "results"),
               env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    ours, theirs = json.loads(results_file.read_text())["results"], hf_lm_eval_run.results
    for task, metric in [("llammlein_de_mc", "acc,none"), ("llammlein_de_mc", "acc_norm,none")]:
        assert ours[task][metric] == theirs[task][metric], metric
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["llammlein_de_ppl"][metric] == pytest.approx(theirs["llammlein_de_ppl"][metric], rel=1e-4)
