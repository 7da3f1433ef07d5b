"""Training throughput: this toolkit's trainer against litgpt's `pretrain` and a plain `transformers` loop.

CPU mode (the default) trains the same Llama-style model (same dims, batch, sequence length, thread count, token
data and precision: fp32, or bf16-mixed for all with --precision bf16-mixed) with three contenders, each in its own
subprocess, and reports the median steady-state tokens/s:

  ours     pretrain/tinyllama_fabric.py as a subprocess on a prepared LITPKDS dataset (its real data loading,
           logging and step), tokens/s read from its metrics.jsonl
  litgpt   litgpt.pretrain.setup (litgpt's own pretraining loop, torch.compile included as litgpt does it) with a
           LitGPT config of identical dims, fed the same chunk files through a DataLoader
  hf       a plain PyTorch loop over transformers.LlamaForCausalLM (attn_implementation="sdpa") with AdamW

Runs of the contenders are interleaved (the order rotates every round) and repeated; the median is reported,
because a shared machine makes single timings noisy. Extra contenders: `ours_compile` (the trainer with
--compile true) and `litgpt_eager` (litgpt with torch.compile disabled).

    python bench/train_cpu.py                                   # demo_25M, batch 4 x 512, 3 rounds
    python bench/train_cpu.py --litgpt_python /path/to/venv/bin/python --rounds 5   # default: .venv-bench
    python bench/train_cpu.py --profile ours,hf                 # where a step spends its time (torch.profiler)
    python bench/train_cpu.py --device cuda                     # GPU: MFU per model and attention backend
    python bench/train_cpu.py --device cpu --mfu --models micro # the GPU-mode code, run on CPU (a smoke test)

litgpt is not a dependency of this project; `bash bench/setup_env.sh` installs it in .venv-bench, which is used by
default (or pass another interpreter with --litgpt_python or $LITGPT_PYTHON).

GPU mode (--device cuda) runs our `GPT` in-process for LLaMmlein_120M and LLaMmlein_1B with each attention
backend (a backend that cannot run is skipped with the reason; `auto` is the trainer's pick there), the model built on
the meta device and materialised and initialised on the GPU (fp32, then cast for bf16-true) under bf16-mixed autocast (or --precision
bf16-true), fused AdamW, the trainer's chunked cross-entropy, grad clipping, and prints tokens/s and
MFU = tokens/s * flops_per_token (the PaLM convention, lit_gpt.speed_monitor) / device peak as a markdown table.
Data loading is not part of GPU mode.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lit_gpt.config import Config  # (pure Python: importable from any interpreter with torch)
from lit_gpt.run_dir import RunDir  # (pure Python too)

ROOT = Path(__file__).resolve().parents[1]

TRAINER = ROOT / "pretrain" / "tinyllama_fabric.py"
CONTENDERS = ("ours", "litgpt", "hf", "ours_compile", "litgpt_eager")
DEFAULT_CONTENDERS = "ours,litgpt,hf"
FORTUNES_DE = Path("/usr/share/games/fortunes/de")
GPU_BACKENDS = ("fa3", "fa4", "fa2", "flex", "sdpa")
GPU_DEFAULT_BATCH = {"LLaMmlein_120M": 16, "LLaMmlein_1B": 8}

# Optimiser settings shared by every contender (the trainer's defaults).
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0


# ================================================================================================================
# Model dims
# ================================================================================================================
def model_config(args) -> Config:
    overrides = dict(args.override or {})
    overrides["block_size"] = args.seq_len
    return Config.from_name(args.model_name, **overrides)


def dims_of(cfg: Config) -> dict:
    """What every contender needs to build the same Llama: the fields the peers have equivalents for."""
    keys = ("n_layer", "n_head", "n_embd", "n_query_groups", "head_size", "intermediate_size", "vocab_size",
            "padded_vocab_size", "padding_multiple", "norm_eps", "rope_base", "block_size")
    return {k: getattr(cfg, k) for k in keys}


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--override {item!r}: expected NAME=VALUE (a lit_gpt.Config field)")
        out[key] = float(value) if "." in value or "e-" in value else int(value)
    return out


# ================================================================================================================
# Data: a prepared LITPKDS dataset that all contenders read
# ================================================================================================================
def _run(cmd: list[str], **kw) -> None:
    print("  $", " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(map(str, cmd))}\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _synthetic_corpus(path: Path, n_docs: int = 4000, seed: int = 0) -> None:
    """Pseudo-German documents, for machines without a corpus (throughput does not depend on the text)."""
    import random

    words = ("der die das und ist nicht ein eine zu mit auf für von sich dem den im auch es an als wie nach Haus "
             "Baum Straße Wasser Bücher Mädchen Größe schön grün über fünf Brücke König Frühling Käse Mühle lesen "
             "schreiben laufen gehen sehen denken wissen sagen machen kommen München Köln Würzburg Lamm").split()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
                            for _ in range(rng.randint(2, 12)))
            f.write(json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")


def _write_random_chunks(out: Path, vocab: int, n_tokens: int, seed: int, chunk_tokens: int = 1 << 18) -> None:
    """Random-token LITPKDS chunks (--synthetic_data): only for when the data scripts are not available."""
    import numpy as np

    from lit_gpt.litpkds import chunk_name, encode_header, token_dtype

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab)
    for i in range(math.ceil(n_tokens / chunk_tokens)):
        with open(out / chunk_name("train", i), "wb") as f:
            f.write(encode_header(dtype, chunk_tokens))
            rng.integers(0, vocab, chunk_tokens, dtype=np.int64).astype(dtype).tofile(f)


def prepare_data(args, cfg: Config, python: str) -> tuple[Path, str]:
    """(train chunk dir, tokenizer path or '') -- made once in the work dir and reused."""
    if args.train_data_dir:
        return Path(args.train_data_dir), args.tokenizer_path or ""
    work = Path(args.work_dir)
    if args.synthetic_data:
        train = work / f"synthetic_v{cfg.vocab_size}" / "train"
        if not any(train.glob("*.bin")):
            _write_random_chunks(train, cfg.vocab_size, 1 << 21, args.seed)
        return train, ""
    scripts = ROOT / "scripts"
    if not (scripts / "train_tokenizer.py").exists() or not (scripts / "prepare_data.py").exists():
        raise SystemExit("scripts/train_tokenizer.py and scripts/prepare_data.py are needed to prepare data; pass "
                         "--train_data_dir DIR (a prepared train/ folder) or --synthetic_data instead")
    vocab = min(args.tokenizer_vocab, cfg.vocab_size)
    base = work / f"data_v{vocab}"
    tokenizer, data = base / "tokenizer", base / "data"
    if (base / "done").exists():
        return data / "train", str(tokenizer)
    print(f"Preparing benchmark data in {base} ...", flush=True)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if args.corpus:
        corpus = Path(args.corpus)
    elif FORTUNES_DE.is_dir():
        corpus = base / "corpus.jsonl"
        _run([python, scripts / "fortunes_to_jsonl.py", "--src", FORTUNES_DE, "--out", corpus])
    else:
        corpus = base / "corpus.jsonl"
        _synthetic_corpus(corpus)
    _run([python, scripts / "train_tokenizer.py", "--input", corpus, "--output_dir", tokenizer,
          "--vocab_size", vocab])
    _run([python, scripts / "prepare_data.py", "--input", corpus, "--output_dir", data, "--tokenizer", tokenizer,
          "--chunk_size", str(1 << 18), "--val_fraction", "0.01", "--workers", "1"])
    (base / "done").write_text("ok\n")
    return data / "train", str(tokenizer)


class ChunkSamples:
    """Samples of seq_len + 1 tokens read from LITPKDS chunk files through memory maps (used by the peers).

    A torch Dataset by duck typing (no torch import here, so it pickles into DataLoader workers cheaply)."""

    def __init__(self, train_dir: str, seq_len: int, seed: int) -> None:
        import numpy as np

        from lit_gpt.litpkds import HEADER_SIZE, read_header

        self.span = seq_len + 1
        self.index: list[tuple[str, str, int, int]] = []  # (path, dtype, chunk tokens, first token of sample)
        # prepare_data.py's manifest gives each chunk's real token count (the last chunk is padded to full size).
        manifest = Path(train_dir) / "manifest.json"
        real = ({f["name"]: f["tokens"] for f in json.loads(manifest.read_text())["files"]}
                if manifest.exists() else {})
        for path in sorted(Path(train_dir).glob("*.bin")):
            dtype, n = read_header(path)
            usable = real.get(path.name, n)
            self.index += [(str(path), dtype.str, n, off) for off in range(0, usable - self.span + 1, self.span)]
        if not self.index:
            raise SystemExit(f"{train_dir}: no chunk holds a sample of {self.span} tokens")
        self.order = np.random.default_rng(seed).permutation(len(self.index))
        self.header = HEADER_SIZE
        self._maps: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        path, dtype, n, off = self.index[int(self.order[i % len(self.order)])]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=self.header, shape=(n,))
        return torch.from_numpy(self._maps[path][off: off + self.span].astype(np.int64))


# ================================================================================================================
# Contenders (each runs in its own subprocess; every one writes [{"step", "tokens", "time"}, ...])
# ================================================================================================================
def thread_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # inductor's compile pool would fight for the cores
    return env


def run_ours(spec: dict, out: Path, compile_: bool) -> dict:
    cfg_args = []
    base = Config.from_name(spec["model_name"])
    for key, value in spec["dims"].items():
        if key in ("head_size", "padded_vocab_size", "padding_multiple") and value == getattr(base, key):
            continue
        cfg_args += [f"--{key}", str(value)]
    cmd = [spec["python"], str(TRAINER), "--model_name", spec["model_name"], *cfg_args,
           "--accelerator", "cpu", "--devices", "1", "--strategy", "auto", "--precision", spec["precision"],
           "--global_batch_size", str(spec["batch"]), "--micro_batch_size", str(spec["batch"]),
           "--max_steps", str(spec["steps"]), "--warmup_steps", "2", "--learning_rate", str(spec["lr"]),
           "--min_lr", str(spec["lr"] / 10), "--weight_decay", str(WEIGHT_DECAY), "--grad_clip", str(GRAD_CLIP),
           "--log_interval", "1", "--eval_interval", "0", "--val_data_dir", "", "--save_interval", "100000000",
           "--keep_last_checkpoints", "1", "--train_data_dir", spec["train_dir"],
           "--tokenizer_path", spec["tokenizer_path"], "--out_dir", str(out), "--num_workers", str(spec["workers"]),
           "--seed", str(spec["seed"]), "--compile", "true" if compile_ else "false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=thread_env(spec["threads"]), capture_output=True, text=True,
                          timeout=spec["timeout"])
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in RunDir(out).metrics_jsonl.read_text().splitlines()]
    steps = [r for r in records if "loss" in r and r.get("time") is not None]
    hparams = json.loads(RunDir(out).hparams.read_text())
    return {"log": [{"step": r["step"], "tokens": r["step"] * spec["batch"] * spec["seq_len"], "time": r["time"],
                     "real_tokens": r["tokens"], "window_tps": r.get("tokens_per_sec"), "loss": r["loss"]}
                    for r in steps],
            "params": hparams.get("num_parameters")}


def run_worker(spec: dict, out: Path, which: str, python: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out)}))
    cmd = [python, str(Path(__file__).resolve()), "--_worker", which, "--_spec", str(spec_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=thread_env(spec["threads"]), capture_output=True, text=True,
                          timeout=spec["timeout"])
    result_file = out / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"{which} worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result_file.read_text())


def _worker_setup(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_float32_matmul_precision("high")  # what our trainer and the litgpt CLI set
    torch.manual_seed(spec["seed"])
    return torch


def worker_hf(spec: dict) -> dict:
    """A plain training loop over transformers' LlamaForCausalLM: what a user would write by hand."""
    torch = _worker_setup(spec)
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    d, T, B = spec["dims"], spec["seq_len"], spec["batch"]
    hf_config = LlamaConfig(
        vocab_size=d["padded_vocab_size"], hidden_size=d["n_embd"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"], num_key_value_heads=d["n_query_groups"],
        head_dim=d["head_size"], max_position_embeddings=T, rms_norm_eps=d["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(d["rope_base"])}, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, use_cache=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_config)
    model.train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    data = ChunkSamples(spec["train_dir"], T, spec["seed"])
    loader = DataLoader(data, batch_size=B, shuffle=False, num_workers=spec["workers"], drop_last=True)
    log, step = [], 0
    start = time.perf_counter()
    while step < spec["steps"]:
        for batch in loader:
            x, y = batch[:, :T], batch[:, 1:]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16-mixed"):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.append({"step": step, "tokens": step * B * T, "time": time.perf_counter() - start, "loss": loss.item()})
            if step >= spec["steps"]:
                break
    return {"log": log, "params": params}


def worker_litgpt(spec: dict, compile_: bool) -> dict:
    """litgpt's own pretraining entry point, `litgpt.pretrain.setup`, on our chunk files.

    Only the logger is wrapped (to timestamp each logged iteration; litgpt's TensorBoard logging still runs) and,
    for `litgpt_eager`, torch.compile is replaced by the identity."""
    _worker_setup(spec)
    import importlib.metadata

    import litgpt.pretrain as lp
    from lightning.fabric.loggers import Logger
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.config import Config as LitConfig
    from litgpt.data import DataModule
    from torch.utils.data import DataLoader

    d, T, B = spec["dims"], spec["seq_len"], spec["batch"]
    log: list[dict] = []
    start = [time.perf_counter()]

    class TimedLogger(Logger):
        """Delegates to litgpt's logger and timestamps every training log call (one per iteration here)."""

        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        @property
        def name(self):
            return self.inner.name

        @property
        def version(self):
            return self.inner.version

        def log_hyperparams(self, params, *a, **k) -> None:
            self.inner.log_hyperparams(params, *a, **k)

        def log_metrics(self, metrics, step=None) -> None:
            if "total_tokens" in metrics:
                if not log:
                    start[0] = time.perf_counter() - metrics.get("iter_time", 0.0)
                it = int(metrics["iter"])
                log.append({"step": it, "tokens": it * B * T, "time": time.perf_counter() - start[0],
                            "loss": float(metrics["loss"])})
            self.inner.log_metrics(metrics, step)

        def save(self) -> None:
            self.inner.save()

        def finalize(self, status: str) -> None:
            self.inner.finalize(status)

    real_choose_logger = lp.choose_logger
    lp.choose_logger = lambda *a, **k: TimedLogger(real_choose_logger(*a, **k))
    if not compile_:
        lp.torch.compile = lambda model, *a, **k: model

    class ChunkData(DataModule):
        def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None, **kw) -> None:
            self.batch_size = batch_size

        def train_dataloader(self):
            return DataLoader(ChunkSamples(spec["train_dir"], T, spec["seed"]), batch_size=self.batch_size,
                              shuffle=False, num_workers=spec["workers"], drop_last=True)

        def val_dataloader(self):
            return DataLoader(ChunkSamples(spec["train_dir"], T, spec["seed"] + 1), batch_size=self.batch_size,
                              shuffle=False, num_workers=0, drop_last=True)

    lit_config = LitConfig(
        name="bench", block_size=T, vocab_size=d["vocab_size"], padding_multiple=d["padding_multiple"],
        padded_vocab_size=d["padded_vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
        n_query_groups=d["n_query_groups"], head_size=d["head_size"], intermediate_size=d["intermediate_size"],
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=d["norm_eps"],
        mlp_class_name="LLaMAMLP", rope_base=d["rope_base"],
    )
    params: dict = {}
    real_fit = lp.fit

    def fit(*a, **k):
        state = k.get("state") if "state" in k else a[3]
        params["n"] = sum(p.numel() for p in state["model"].parameters())
        return real_fit(*a, **k)

    lp.fit = fit
    # After training, litgpt re-parses sys.argv as its own CLI to save hyperparameters.yaml: give it a valid one.
    sys.argv = [sys.argv[0], "bench"]
    lp.setup(
        model_name="bench", model_config=lit_config, out_dir=Path(spec["out"]) / "litgpt_out", precision=spec["precision"],
        data=ChunkData(),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=B, micro_batch_size=B,
                        max_tokens=spec["steps"] * B * T, max_norm=GRAD_CLIP, lr_warmup_steps=2,
                        min_lr=spec["lr"] / 10, tie_embeddings=False),
        eval=EvalArgs(interval=10**9, max_iters=1, initial_validation=False, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW",
                   "init_args": {"lr": spec["lr"], "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "eps": EPS}},
        devices=1, logger_name="tensorboard", seed=spec["seed"],
    )
    return {"log": log, "params": params.get("n"), "litgpt_version": importlib.metadata.version("litgpt")}


# ================================================================================================================
# Profiling one training step (forward, fp32 cross-entropy, backward, clip, AdamW) with torch.profiler
# ================================================================================================================
def worker_profile(spec: dict, target: str) -> dict:
    torch = _worker_setup(spec)
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile, record_function

    d, T, B = spec["dims"], spec["seq_len"], spec["batch"]
    if target == "ours":
        from lit_gpt.model import GPT

        model = GPT(Config.from_name(spec["model_name"], **{k: v for k, v in d.items()
                                                             if k not in ("padded_vocab_size",)}, attn_impl="sdpa"))
        forward = lambda x: model(x)  # noqa: E731
    elif target == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=d["padded_vocab_size"], hidden_size=d["n_embd"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["n_layer"], num_attention_heads=d["n_head"], num_key_value_heads=d["n_query_groups"],
            head_dim=d["head_size"], max_position_embeddings=T, rms_norm_eps=d["norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": float(d["rope_base"])},
            tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa"))
        forward = lambda x: model(input_ids=x).logits  # noqa: E731
    elif target == "litgpt":
        from litgpt.config import Config as LitConfig
        from litgpt.model import GPT as LitGPT

        model = LitGPT(LitConfig(
            name="bench", block_size=T, vocab_size=d["vocab_size"], padding_multiple=d["padding_multiple"],
            padded_vocab_size=d["padded_vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
            n_query_groups=d["n_query_groups"], head_size=d["head_size"], intermediate_size=d["intermediate_size"],
            rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
            norm_eps=d["norm_eps"], mlp_class_name="LLaMAMLP", rope_base=d["rope_base"]))
        forward = lambda x: model(x)  # noqa: E731
    else:
        raise SystemExit(f"unknown profile target {target!r}")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    batch = torch.randint(0, d["vocab_size"], (B, T + 1))
    x, y = batch[:, :T], batch[:, 1:]
    phases = ("forward", "loss", "backward", "clip", "optimizer")

    def step() -> None:
        with record_function("forward"):
            logits = forward(x)
        with record_function("loss"):
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    n = spec.get("profile_steps", 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    phase_us = {e.key: e.cpu_time_total / n for e in events if e.key in phases}
    ops = sorted((e for e in events if e.key not in phases and e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events) / n
    return {"phases_ms": {k: phase_us.get(k, 0.0) / 1e3 for k in phases},
            "step_ms": sum(phase_us.get(k, 0.0) for k in phases) / 1e3,
            "total_self_ms": total_self / 1e3,
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / n / 1e3, "calls": e.count // n}
                        for e in ops[:spec.get("profile_top", 18)]]}


# ================================================================================================================
# CPU comparison: orchestration and report
# ================================================================================================================
def steady_tps(log: list[dict], warmup: int) -> float | None:
    """Tokens/s between the end of step `warmup` and the last step (warm-up and compilation excluded)."""
    log = sorted(log, key=lambda r: r["step"])
    base = [r for r in log if r["step"] == warmup]
    if not base or log[-1]["step"] <= warmup:
        return None
    (a,), b = base, log[-1]
    return (b["tokens"] - a["tokens"]) / (b["time"] - a["time"])


def step_times(log: list[dict], warmup: int) -> list[float]:
    log = sorted(log, key=lambda r: r["step"])
    return [b["time"] - a["time"] for a, b in zip(log, log[1:]) if a["step"] >= warmup]


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def litgpt_interpreter(args) -> str:
    """--litgpt_python, else $LITGPT_PYTHON, else the venv of bench/setup_env.sh, else this interpreter."""
    bench_venv = ROOT / ".venv-bench" / "bin" / "python"
    return (args.litgpt_python or os.environ.get("LITGPT_PYTHON")
            or (str(bench_venv) if bench_venv.exists() else sys.executable))


def interpreter_has(python: str, module: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return probe.returncode == 0


def compare(args) -> int:
    cfg = model_config(args)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {CONTENDERS}")
    if args.precision not in ("", "32-true", "bf16-mixed"):
        raise SystemExit(f"--precision {args.precision}: the CPU comparison runs 32-true or bf16-mixed")
    litgpt_python = litgpt_interpreter(args)
    runnable = []
    for c in contenders:
        if c.startswith("litgpt") and not interpreter_has(litgpt_python, "litgpt.pretrain"):
            print(f"skip {c}: litgpt is not importable by {litgpt_python} (pass --litgpt_python)", flush=True)
            continue
        if c == "hf" and not interpreter_has(sys.executable, "transformers"):
            print("skip hf: transformers is not importable", flush=True)
            continue
        runnable.append(c)
    if not runnable:
        raise SystemExit("no contender can run")
    train_dir, tokenizer_path = prepare_data(args, cfg, sys.executable)
    work = Path(args.work_dir) / "runs"
    shutil.rmtree(work, ignore_errors=True)
    spec = dict(model_name=args.model_name, dims=dims_of(cfg), seq_len=args.seq_len, batch=args.batch,
                precision=args.precision or "32-true", steps=args.warmup + args.steps, threads=args.threads, workers=args.num_workers, seed=args.seed,
                lr=args.lr, train_dir=str(train_dir.resolve()), tokenizer_path=tokenizer_path,
                python=sys.executable, timeout=args.timeout)
    tokens_per_step = args.batch * args.seq_len
    print(f"Model {args.model_name} {json.dumps(spec['dims'])}\nbatch {args.batch} x {args.seq_len} tokens, "
          f"{args.warmup} warm-up + {args.steps} measured steps, {args.threads} threads, {args.rounds} rounds, "
          f"contenders {runnable}\n", flush=True)

    results: dict[str, list[dict]] = {c: [] for c in runnable}
    for r in range(args.rounds):
        order = runnable[r % len(runnable):] + runnable[: r % len(runnable)]
        for c in order:
            out = work / f"{c}_{r}"
            load_before = _load()
            t0 = time.perf_counter()
            try:
                if c in ("ours", "ours_compile"):
                    res = run_ours(spec, out, compile_=c == "ours_compile")
                else:
                    res = run_worker(spec, out, c, litgpt_python if c.startswith("litgpt") else sys.executable)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"round {r} {c}: FAILED {str(e)[-1500:]}", flush=True)
                continue
            tps = steady_tps(res["log"], args.warmup)
            times = step_times(res["log"], args.warmup)
            res.update(tps=tps, median_step_s=statistics.median(times) if times else None,
                       wall_s=time.perf_counter() - t0, load=f"{load_before} -> {_load()}")
            results[c].append(res)
            print(f"round {r} {c:13s} {tps or float('nan'):10,.0f} tok/s  median step "
                  f"{(res['median_step_s'] or float('nan')) * 1e3:8.1f} ms  params {res.get('params')}  "
                  f"(run {res['wall_s']:.0f} s, load {res['load']})", flush=True)
            if not args.keep_runs:
                shutil.rmtree(out, ignore_errors=True)

    summary = {}
    for c, runs in results.items():
        vals = [x["tps"] for x in runs if x["tps"]]
        steps_ = [x["median_step_s"] for x in runs if x["median_step_s"]]
        if vals:
            summary[c] = {"median_tps": statistics.median(vals), "best_tps": max(vals), "runs_tps": vals,
                          "median_step_tps": tokens_per_step / statistics.median(steps_),
                          "params": runs[0].get("params")}
    print_report(args, cfg, summary)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "dims": spec["dims"], "summary": summary,
                                                   "runs": results}, indent=1, default=str))
    return 0


def env_line(litgpt_python: str) -> str:
    import torch

    parts = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    try:
        import lightning

        parts.append(f"lightning {lightning.__version__}")
    except ImportError:
        pass
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    probe = subprocess.run([litgpt_python, "-c", "import importlib.metadata as m; print(m.version('litgpt'))"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        parts.append(f"litgpt {probe.stdout.strip()}")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs; " + ", ".join(parts)


def print_report(args, cfg: Config, summary: dict) -> None:
    print(f"\n### {args.model_name} ({cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads / "
          f"{cfg.n_query_groups} KV groups, MLP {cfg.intermediate_size}, vocab {cfg.padded_vocab_size}), "
          f"batch {args.batch} x {args.seq_len}, {args.precision or '32-true'}, {args.threads} threads\n")
    print(env_line(litgpt_interpreter(args)) + "\n")
    ours = summary.get("ours", {}).get("median_tps")
    best = summary.get("ours", {}).get("best_tps")
    print("| contender | params | median tokens/s | ours / contender (median) | best run | ours / contender (best) "
          "| tokens/s of each run |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for c, s in summary.items():
        ratio = f"{ours / s['median_tps']:.2f}x" if ours and c != "ours" else "—"
        ratio_best = f"{best / s['best_tps']:.2f}x" if best and c != "ours" else "—"
        runs = ", ".join(f"{v:,.0f}" for v in s["runs_tps"])
        params = f"{s['params'] / 1e6:.2f}M" if s.get("params") else "?"
        print(f"| {c} | {params} | {s['median_tps']:,.0f} | {ratio} | {s['best_tps']:,.0f} | {ratio_best} | {runs} |")
    print(f"\nSteady state: tokens between the end of step {args.warmup} and step {args.warmup + args.steps}, "
          f"divided by the wall time between them (data loading, logging and the optimizer included).")


def profile_report(args) -> int:
    cfg = model_config(args)
    litgpt_python = litgpt_interpreter(args)
    spec = dict(model_name=args.model_name, dims=dims_of(cfg), seq_len=args.seq_len, batch=args.batch,
                threads=args.threads, seed=args.seed, lr=args.lr, timeout=args.timeout, profile_steps=args.profile_steps)
    for target in [t.strip() for t in args.profile.split(",") if t.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            python = litgpt_python if target == "litgpt" else sys.executable
            try:
                res = run_worker(spec, Path(tmp), f"profile:{target}", python)
            except RuntimeError as e:
                print(f"profile {target}: FAILED {e}")
                continue
        step = res["step_ms"]
        print(f"\n#### {target}: {step:.0f} ms per step (batch {args.batch} x {args.seq_len}, eager, "
              f"{args.threads} threads) = {args.batch * args.seq_len / step * 1e3:,.0f} tokens/s under the profiler\n")
        print("| phase | ms | share |\n|---|---:|---:|")
        for k, v in res["phases_ms"].items():
            print(f"| {k} | {v:.1f} | {v / step:.1%} |")
        print("\n| op (self CPU time) | ms per step | share of step | calls |\n|---|---:|---:|---:|")
        for op in res["top_ops"]:
            print(f"| `{op['op']}` | {op['self_ms']:.1f} | {op['self_ms'] / step:.1%} | {op['calls']} |")
    return 0


# ================================================================================================================
# GPU mode: MFU of our model per attention backend (in-process)
# ================================================================================================================
def backend_unavailable(impl: str, device, dtype, head_size: int) -> str | None:
    """Why attention backend `impl` cannot train on `device`/`dtype` at this head size, or None."""
    from lit_gpt.attention import AttentionUnavailable, resolve_backend

    try:
        resolve_backend(impl, device, dtype, head_size, needs_grad=True)
    except AttentionUnavailable as e:
        return str(e)
    return None


def measure_model(cfg: Config, batch: int, seq_len: int, args, device) -> dict:
    """Time full training steps of our GPT as the trainer takes them: forward (autocast), the chunked cross-entropy,
    backward, clip, fused AdamW."""
    import torch

    from lit_gpt.loss import token_losses
    from lit_gpt.model import GPT, num_parameters
    from lit_gpt.speed_monitor import device_peak_flops, flops_per_token

    cuda = device.type == "cuda"
    mixed = args.precision == "bf16-mixed"
    torch.manual_seed(args.seed)
    with torch.device("meta"):  # built on the device itself: no host copy of a 1B model per backend
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()  # fp32, then cast for bf16-true: the weights do not depend on torch's bf16 random stream
    if args.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if args.compile:
        for block in model.transformer.h:
            block.compile()
    model.train()
    n_params = num_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  fused=True)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        data = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            logits = model(data[:, :-1])
        loss = token_losses(logits, data[:, 1:])[1] / data[:, 1:].numel()
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.gpu_warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.gpu_steps):
        loss = step(i)
    sync()
    elapsed = time.perf_counter() - start
    tps = batch * seq_len * args.gpu_steps / elapsed
    fpt = flops_per_token(cfg, n_params, seq_len)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device)
    result = {"params": n_params, "batch": batch, "tokens_per_sec": tps, "step_ms": elapsed / args.gpu_steps * 1e3,
              "flops_per_token": fpt, "tflops": tps * fpt / 1e12, "mfu": tps * fpt / peak if peak else None,
              "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
              "loss": float(loss)}
    return result  # the model, optimizer and batches go with this frame; the caller empties the CUDA cache


def mfu_report(args) -> int:
    import torch

    from lit_gpt.attention import resolve_backend
    from lit_gpt.speed_monitor import MFU_CONVENTION, device_peak_flops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_float32_matmul_precision("high")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.precision == "32-true" else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device)
    print(f"Device: {name}; peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (MFU not reported)'}; "
          f"torch {torch.__version__}; precision {args.precision}; compile {args.compile}", flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = []
    for model_name in models:
        head_size = Config.from_name(model_name).head_size
        # auto: the backend the trainer would pick here (the fastest available), named in the table
        for impl in dict.fromkeys(resolve_backend(b, device, dtype, head_size, needs_grad=True) if b == "auto" else b
                                  for b in backends):
            reason = backend_unavailable(impl, device, dtype, head_size)
            if reason:
                print(f"skip {model_name} / {impl}: {reason}", flush=True)
                rows.append({"model": model_name, "attn": impl, "skipped": reason})
                continue
            overrides = dict(args.override or {})
            seq_len = args.gpu_seq_len or overrides.pop("block_size", None) or Config.from_name(model_name).block_size
            cfg = Config.from_name(model_name, attn_impl=impl, **{**overrides, "block_size": seq_len})
            batch = args.gpu_batch or GPU_DEFAULT_BATCH.get(model_name, 4)
            while True:
                try:
                    res = measure_model(cfg, batch, seq_len, args, device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if batch == 1:
                        res = None
                        break
                    print(f"{model_name} / {impl}: out of memory at micro batch {batch}, retrying with {batch // 2}")
                    batch //= 2
            if res is None:
                rows.append({"model": model_name, "attn": impl, "skipped": "out of memory at micro batch 1"})
                continue
            res.update(model=model_name, attn=impl, seq_len=seq_len, compile=args.compile)
            rows.append(res)
            if args.json_out:  # after every row: a run stopped by a time limit keeps what it measured
                Path(args.json_out).write_text(json.dumps(mfu_json(name, peak, rows, torch), indent=1))
            print(f"{model_name} / {impl}: {res['tokens_per_sec']:,.0f} tok/s, "
                  f"MFU {'%.1f%%' % (100 * res['mfu']) if res['mfu'] is not None else 'n/a'}", flush=True)
    print("\n| model | attention | params | micro batch x seq | tokens/s | step ms | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['model']} | {r['attn']} | | | skipped: {r['skipped']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['memory_gb']:.1f}" if r["memory_gb"] is not None else "n/a"
        print(f"| {r['model']} | {r['attn']} | {r['params'] / 1e6:.0f}M | {r['batch']} x {r['seq_len']} | "
              f"{r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.1f} | {mfu} | {mem} |")
    print(f"\nMFU = tokens/s x flops_per_token ({MFU_CONVENTION}) / peak dense bf16 FLOP/s; "
          f"{args.gpu_warmup} warm-up + {args.gpu_steps} timed steps on random tokens (no data loading).")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(mfu_json(name, peak, rows, torch), indent=1))
    return 0 if any("skipped" not in r for r in rows) else 1


def mfu_json(device_name: str, peak: float | None, rows: list[dict], torch) -> dict:
    from lit_gpt.speed_monitor import MFU_CONVENTION

    return {"device": device_name, "torch": torch.__version__, "peak_tflops": peak / 1e12 if peak else None,
            "mfu_convention": MFU_CONVENTION, "rows": rows}


# ================================================================================================================
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: compare trainers (subprocesses); cuda: MFU per model and attention backend")
    p.add_argument("--mfu", action="store_true", help="run the in-process MFU benchmark (implied by --device cuda)")
    p.add_argument("--model_name", default="demo_25M", help="CPU comparison: registry name (lit_gpt.config)")
    p.add_argument("--override", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="Config field overrides for the benchmarked model(s), e.g. n_layer=4")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="CPU comparison: samples per step (one micro batch)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per run, after --warmup")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the measurement (compilation etc.)")
    p.add_argument("--rounds", type=int, default=3, help="runs per contender, interleaved")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch/OpenMP threads, all")
    p.add_argument("--num_workers", type=int, default=1, help="data loader processes, all contenders")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS, help=f"comma-separated from {CONTENDERS}")
    p.add_argument("--litgpt_python", default="",
                   help="interpreter with litgpt installed (default: $LITGPT_PYTHON, else .venv-bench/bin/python)")
    p.add_argument("--train_data_dir", default="", help="prepared LITPKDS train/ folder (skips data preparation)")
    p.add_argument("--tokenizer_path", default="", help="its tokenizer (with --train_data_dir)")
    p.add_argument("--corpus", default="", help="corpus for data preparation (default: fortunes-de or synthetic)")
    p.add_argument("--tokenizer_vocab", type=int, default=4096)
    p.add_argument("--synthetic_data", action="store_true", help="random-token chunks instead of a real corpus")
    p.add_argument("--work_dir", default=str(ROOT / "out" / "bench_train_cpu"))
    p.add_argument("--keep_runs", action="store_true", help="keep each run's output folder")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--profile", default="", help="profile a step instead: comma-separated from ours, hf, litgpt")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--json_out", default="")
    p.add_argument("--precision", default="", choices=("", "bf16-mixed", "bf16-true", "32-true"),
                   help="default: bf16-mixed on CUDA, 32-true on CPU (the CPU comparison takes 32-true or "
                        "bf16-mixed, for every contender)")
    g = p.add_argument_group("GPU / MFU mode")
    g.add_argument("--models", default="LLaMmlein_120M,LLaMmlein_1B")
    g.add_argument("--backends", default=",".join(GPU_BACKENDS), help="comma-separated; auto: the trainer's pick")
    g.add_argument("--compile", action="store_true", help="torch.compile each Block (as the trainer's --compile)")
    g.add_argument("--gpu_batch", type=int, default=0, help=f"micro batch (default {GPU_DEFAULT_BATCH}, else 4)")
    g.add_argument("--gpu_seq_len", type=int, default=0, help="default: the model's block_size")
    g.add_argument("--gpu_warmup", type=int, default=3)
    g.add_argument("--gpu_steps", type=int, default=10)
    g.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak (dense bf16)")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--_spec", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.override = parse_overrides(args.override)

    if args._worker:
        spec = json.loads(Path(args._spec).read_text())
        kind = args._worker
        if kind == "hf":
            result = worker_hf(spec)
        elif kind in ("litgpt", "litgpt_eager"):
            result = worker_litgpt(spec, compile_=kind == "litgpt")
        elif kind.startswith("profile:"):
            result = worker_profile(spec, kind.split(":", 1)[1])
        else:
            raise SystemExit(f"unknown worker {kind!r}")
        (Path(spec["out"]) / "result.json").write_text(json.dumps(result))
        return 0
    if args.device == "cuda" or args.mfu:
        args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
        return mfu_report(args)
    if args.profile:
        return profile_report(args)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
