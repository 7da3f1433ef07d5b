"""lm-eval-harness on our own GPT and Tokenizer: a checkpoint scored without an export, or the live (sharded) model
of a training run scored in-process.

    python -m lit_gpt.lm_eval_adapter --model lit_gpt --model_args checkpoint=out/run/iter-00010000-ckpt.pth \\
        --tasks llammlein_de --include_path eval/tasks --batch_size 8 --device cpu

(lm-eval's own command line with the model "lit_gpt" registered; model_args: checkpoint, and optionally
model_name, tokenizer and dtype as scripts/evaluate.py takes them.) From Python:

    evaluate_tasks(model, tokenizer, ["llammlein_de"], limit=100)   # -> {task: {metric: value}}
    check_tasks_available(["llammlein_de", "hellaswag"])             # InputError naming a task lm-eval cannot load

Scores equal those of `lm_eval --model hf` on the export of the same checkpoint (tests/test_lm_eval_adapter.py):
requests are tokenized as lm-eval's HFLM tokenizes them (its TemplateLM, the same rolling windows), scored over the
whole padded vocabulary, and generated greedily with the padded rows suppressed (as the export's
generation_config.json does), stopping at EOS, at a stop sequence or after max_gen_toks tokens.

Under torch.distributed (the trainer's FSDP/FSDP2 ranks) every rank runs lm-eval on all requests, scores its share
of the batches, and the shares are gathered: every rank makes the same number of forward calls (FSDP gathers
parameters inside each), padded with dummy batches, and ends with every score.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lm_eval
import numpy as np
import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from lit_gpt.errors import InputError
from lit_gpt.rng import RNGState
from lit_gpt.tokenizer import Tokenizer

# The repository's own tasks (eval/tasks/NAME), known by name wherever lm-eval runs.
REPO_TASKS = Path(__file__).resolve().parents[1] / "eval" / "tasks"
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@register_model("lit_gpt")
class LitGPTLM(TemplateLM):
    """lm-eval's LM over a GPT (plain, or wrapped by Fabric/FSDP: called as it is) and our Tokenizer.

    lm-eval sees one process (rank 0 of 1) on every rank; the ranks share the forward passes among themselves."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int = 8, device=None,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise InputError(f"batch size {batch_size}: must be at least 1")
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
        self._max_length = max_length or config.block_size
        self.vocab_size = tokenizer.vocab_size  # generation never picks the lm_head's padding rows

    @classmethod
    def from_checkpoint(cls, checkpoint: str, model_name: str | None = None, tokenizer: str | None = None,
                        dtype: str = "fp32", batch_size: int | str = 8, device: str | None = None,
                        **_ignored) -> LitGPTLM:
        """What `--model_args checkpoint=...` builds: a training checkpoint or an export, as scripts/evaluate.py
        loads it."""
        from lit_gpt.checkpoint.load import load_gpt
        from lit_gpt.hf_convert import TORCH_DTYPES

        if str(batch_size).startswith("auto"):
            raise InputError("--batch_size auto: not supported by the lit_gpt model; give a number")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _, tok_dir, _ = load_gpt(Path(checkpoint), model_name, Path(tokenizer) if tokenizer else None,
                                        dtype=TORCH_DTYPES[dtype])
        return cls(model.to(device), Tokenizer(tok_dir), batch_size=int(batch_size), device=device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LitGPTLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LitGPTLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.from_checkpoint(**{**extra, **arg_dict})

    # ------------------------------------------------------------------ what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM's: BOS, else EOS, conditions a continuation scored without context
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # None: the tokenizer's own BOS policy, as AutoTokenizer applies it for HFLM
        return self.tok.encode(string, bos=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request of
        (key, context ids, continuation ids); contexts longer than the window lose their left end, as in HFLM."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after {len(context)} "
                                 f"context tokens with a {self.max_length}-token window")
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole[:-1], continuation))
        dummy = ([self.prefix_token_id], [self.prefix_token_id])
        return self._map_batches(rows, lambda row: -len(row[0]), self._score_batch, dummy)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Every token of each text, in HFLM's disjoint windows (the first conditioned on prefix_token_id)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _greedy) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += loglikelihood
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        rows = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ValueError("the lit_gpt model generates greedily only (do_sample false, temperature 0)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no context in a {self.max_length}-token window")
            context_ids = self.tok_encode(context)[-(self.max_length - max_new):]
            rows.append((context_ids, until, max_new))
        dummy = ([self.prefix_token_id], [], 1)
        return self._map_batches(rows, lambda row: -len(row[0]), self._generate_batch, dummy)

    # ------------------------------------------------------------------ batches, forward passes, ranks
    def _map_batches(self, rows: list, sort_key: Callable, run_batch: Callable[[list], list], dummy) -> list:
        """run_batch over batches of similar length (longest first), the batches dealt round-robin to the ranks;
        a rank out of batches runs `dummy` batches so that all make the same calls. Every rank returns all
        results, in the order of `rows`."""
        rank, world = _world()
        order = sorted(range(len(rows)), key=lambda i: sort_key(rows[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[rank::world]
        results = {}
        for round_index in range(-(-len(batches) // world)):
            if round_index < len(mine):
                batch = mine[round_index]
                results.update(zip(batch, run_batch([rows[i] for i in batch])))
            else:
                run_batch([dummy])
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, results)
            results = {index: value for share in shares for index, value in share.items()}
        return [results[i] for i in range(len(rows))]

    def _logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Logits [B, T, V] of the sequences, right-padded: a causal model's logits at a real position never see the
        padding after it."""
        width = max(map(len, sequences))
        idx = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, ids in enumerate(sequences):
            idx[row, :len(ids)] = torch.tensor(ids)
        return self.model(idx.to(self.device))

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        logits = self._logits([inputs for inputs, _ in rows])
        scores = []
        for row, (inputs, targets) in enumerate(rows):
            logprobs = torch.log_softmax(logits[row, len(inputs) - len(targets):len(inputs)].float(), dim=-1)
            target = torch.tensor(targets, device=logprobs.device)
            picked = logprobs.gather(1, target[:, None])[:, 0]
            scores.append((picked.double().sum().item(), bool((logprobs.argmax(-1) == target).all())))
        return scores

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank: all ranks keep generating (forward calls) while one of them does."""
        if _world()[1] == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _generate_batch(self, rows: list[tuple[list[int], list[str], int]]) -> list[str]:
        sequences = [list(context) for context, _, _ in rows]
        new: list[list[int]] = [[] for _ in rows]
        done = [max_new == 0 for _, _, max_new in rows]
        while self._any_rank(not all(done)):
            logits = self._logits(sequences)
            for row, (_, until, max_new) in enumerate(rows):
                if done[row]:
                    continue
                token = int(logits[row, len(sequences[row]) - 1, :self.vocab_size].argmax())
                if token == self.tok.eos_id:
                    done[row] = True
                    continue
                new[row].append(token)
                sequences[row].append(token)
                text = self.tok_decode(new[row])
                # the text is cut at the first stop sequence anyway: generating past it changes nothing
                done[row] = len(new[row]) >= max_new or any(stop and stop in text for stop in until)
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids, (_, until, _) in zip(new, rows)]


# ---------------------------------------------------------------------- tasks
def _task_manager(tasks: Sequence[str]) -> tuple[TaskManager, list[str]]:
    """A TaskManager that knows the repository's tasks and every task directory given, and the task names: a
    directory stands for the task or group named like it (eval/tasks/llammlein_de -> llammlein_de). lm-eval's own
    task index (15 s to build) is added only when a name is not among the local ones."""
    include = [REPO_TASKS] if REPO_TASKS.is_dir() else []
    names = []
    for task in tasks:
        path = Path(task)
        if path.is_dir():
            if path.resolve().parent != REPO_TASKS:  # those are indexed already
                include.append(path.resolve())
            names.append(path.resolve().name)
        else:
            names.append(task)
    paths = [str(p) for p in include]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(name in local.all_tasks for name in names):
        return local, names
    return TaskManager(include_path=paths), names


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every task it builds at INFO; keep its warnings only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_tasks_available(tasks: list[str]) -> None:
    """Raise InputError (one line naming the task) for a task lm-eval does not know or whose data it cannot load
    here (e.g. a Hub dataset on a node without internet); loads each task's data once."""
    manager, names = _task_manager(tasks)
    for given, name in zip(tasks, names):
        if name not in manager.all_tasks:
            where = f"directory {given} defines no task or group named {name!r}" if Path(given).is_dir() else \
                "unknown to lm-eval (lm_eval --tasks list) and not a task directory"
            raise InputError(f"lm-eval task {given!r}: {where}")
        try:
            with _quiet_lm_eval():
                manager.load([name])
        except Exception as e:  # datasets' offline, connection and file errors have no common base
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise InputError(f"lm-eval task {given!r}: its data cannot be loaded here ({reason}); fetch it once where "
                             f"there is internet (e.g. on a login node: python -c \"from lit_gpt.lm_eval_adapter "
                             f"import check_tasks_available as c; c(['{given}'])\") and run with HF_DATASETS_OFFLINE=1, "
                             f"or give the task as a local directory") from None


@contextlib.contextmanager
def _training_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the random streams lm-eval seeds (Python, numpy, torch, CUDA) and the
    model's mode as they were afterwards."""
    rng, numpy_rng, was_training = RNGState().state_dict(), np.random.get_state(), model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        RNGState().load_state_dict(rng)
        np.random.set_state(numpy_rng)


def evaluate_tasks(model, tokenizer: Tokenizer, tasks: list[str], *, batch_size: int = 8, limit: int | None = None,
                   device=None) -> dict[str, dict[str, float]]:
    """lm-eval's scores of `model` on `tasks` (names, or task directories): {task: {metric: value}}, sorted, floats
    only, no standard errors (a metric of filter F other than "none" is named METRIC_F). Under torch.distributed every rank must call
    it, and every rank gets the scores. Leaves the model's mode and every random stream as they were."""
    manager, names = _task_manager(tasks)
    lm = LitGPTLM(model, tokenizer, batch_size=batch_size, device=device)
    rank, world = _world()
    with _training_state_kept(model), _quiet_lm_eval():
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                          bootstrap_iters=0, log_samples=False)
    if world > 1:  # lm-eval returns the results where LOCAL_RANK is 0 only; global rank 0 has them
        shared = [results if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        results = shared[0]
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in sorted(results["results"].items()):
        values = {}
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")  # scores are "METRIC,FILTER"; the rest is bookkeeping
            if not comma or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(value):
                values[metric if filter_name in ("", "none") else f"{metric}_{filter_name}"] = float(value)
        if values:
            scores[task] = dict(sorted(values.items()))
    return scores


def main() -> None:
    """lm-eval's command line, with the model "lit_gpt" registered by importing this module."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
