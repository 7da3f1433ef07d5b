"""The original TinyLlama / LLäMmlein model and checkpoint format, written here independently of lit_gpt, as the
reference the conversion is tested against.

`OriginalGPT` follows the original `lit_gpt/model.py` of those projects: module order lm_head, transformer(wte,
h, ln_f) (so its parameter order is theirs), fused QKV grouped per query group, half-split ("NeoX") RoPE applied to
the two halves, and as MLP either xformers' `SwiGLU(_pack_weights=False)` under `mlp.swiglu` or the xformers-free
MLP (`mlp.w1/w2/w3`); both compute w3(silu(w1 x) * w2 x). `save_original` writes what their trainer's
`fabric.save` writes on one device (optimizer state keyed by parameter position) or under FSDP (keyed by name).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt.config import Config

MODEL_NAME = "micro"  # registered here, so the checkpoint's hparams name it
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 0.1  # their AdamW: one group, every parameter decayed
HPARAMS = {"model_name": MODEL_NAME, "name": "out/micro", "global_batch_size": 8, "micro_batch_size": 2,
           "gradient_accumulation_steps": 4, "learning_rate": LR, "weight_decay": WEIGHT_DECAY, "beta1": BETAS[0],
           "beta2": BETAS[1], "grad_clip": 1.0, "precision": "bf16-mixed", "sharding_strategy": "SHARD_GRAD_OP"}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps))


class SwiGLU(nn.Module):
    """xformers.ops.SwiGLU(in, hidden, bias=False, _pack_weights=False): its three linears and its eager formula."""

    def __init__(self, n_embd: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(n_embd, hidden, bias=False)
        self.w2 = nn.Linear(n_embd, hidden, bias=False)
        self.w3 = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SwiGLUMLP(nn.Module):  # their LLaMAMLP
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.swiglu = SwiGLU(config.n_embd, config.intermediate_size)

    def forward(self, x):
        return self.swiglu(x)


class XformersFreeMLP(SwiGLU):  # their xformersfree_LLaMAMLP: w1/w2/w3 directly on the MLP
    def __init__(self, config: Config) -> None:
        super().__init__(config.n_embd, config.intermediate_size)


MLPS = {"swiglu": SwiGLUMLP, "xformers_free": XformersFreeMLP}


def rope(x, cos, sin):
    """Rotate the two halves of each head (flash-attn's apply_rotary_emb, interleaved=False); x: (B, T, H, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin):
        c = self.config
        B, T, C = x.shape
        q_per_kv = c.n_head // c.n_query_groups
        qkv = self.attn(x).view(B, T, c.n_query_groups, q_per_kv + 2, c.head_size)
        q, k, v = qkv.split((q_per_kv, 1, 1), dim=-2)
        q, k, v = (t.reshape(B, T, -1, c.head_size) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(q_per_kv, dim=1), v.repeat_interleave(q_per_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(c.head_size))
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, config: Config, mlp: str) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLPS[mlp](config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm_1(x), cos, sin)
        return x + self.mlp(self.norm_2(x))


class OriginalGPT(nn.Module):
    def __init__(self, config: Config, mlp: str) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config, mlp) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps)))

    def forward(self, idx):
        T, hs = idx.shape[1], self.config.head_size
        theta = 1.0 / (self.config.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
        angles = torch.outer(torch.arange(T, dtype=torch.float32), theta)
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, angles.cos(), angles.sin())
        return self.lm_head(self.transformer.ln_f(x))


def config() -> Config:
    return Config.from_name(MODEL_NAME)


def batch(seed: int, rows: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, config().vocab_size, (rows, length + 1), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def their_optimizer(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, foreach=False)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    loss = loss_of(model, tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def our_optimizer(model: nn.Module, no_decay_weight_decay: float) -> torch.optim.AdamW:
    """Our trainer's structure (decay / no-decay groups by name, fused AdamW) with their hyperparameters."""
    def undecayed(name: str) -> bool:
        return "norm" in name or "ln_f" in name or "wte" in name

    groups = [{"params": [p for n, p in model.named_parameters() if not undecayed(n)], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in model.named_parameters() if undecayed(n)],
               "weight_decay": no_decay_weight_decay}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)


def trained_original(mlp: str, steps: int = 3, seed: int = 0) -> tuple[OriginalGPT, torch.optim.AdamW]:
    """An original-style model after a few AdamW steps (so that its optimizer holds state)."""
    torch.manual_seed(seed)
    model = OriginalGPT(config(), mlp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    optimizer = their_optimizer(model)
    for i in range(steps):
        step(model, optimizer, batch(100 + i))
    return model, optimizer


FSDP_PREFIXES = [
    # As Fabric + FSDP (+ activation checkpointing) may spell them; FSDP's full state dict usually strips them.
    (re.compile(r"^"), "_forward_module."),
    (re.compile(r"(transformer\.h\.\d+\.)"), r"\1_fsdp_wrapped_module._checkpoint_wrapped_module."),
]


def fsdp_name(name: str) -> str:
    for pattern, replacement in FSDP_PREFIXES:
        name = pattern.sub(replacement, name, count=1)
    return name


def save_original(path: Path, model: OriginalGPT, optimizer: torch.optim.Optimizer, layout: str,
                  step_count: int = 3) -> Path:
    """What their `fabric.save(path, {"model", "optimizer", "hparams", "iter_num", "step_count"})` writes.

    layout "single": one device, `optimizer.state_dict()` keyed by parameter position; "fsdp": FSDP full state dict,
    optimizer state keyed by parameter name (`FSDP.optim_state_dict`), names with wrapper prefixes."""
    model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    if layout == "fsdp":
        names = [fsdp_name(n) for n, _ in model.named_parameters()]
        model_sd = {fsdp_name(k): v for k, v in model_sd.items()}
        optim_sd = {"state": {names[i]: s for i, s in optim_sd["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                     for g in optim_sd["param_groups"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model_sd, "optimizer": optim_sd, "hparams": dict(HPARAMS),
                "iter_num": step_count * HPARAMS["gradient_accumulation_steps"], "step_count": step_count}, path)
    return path


def reload_original(path: Path, mlp: str) -> tuple[OriginalGPT, torch.optim.AdamW]:
    """Their trainer resuming: a fresh original-style model and optimizer with the checkpoint's state."""
    state = torch.load(path, weights_only=True)
    model = OriginalGPT(config(), mlp)
    unwrap = {fsdp_name(n): n for n, _ in model.named_parameters()}
    model.load_state_dict({unwrap.get(k, k): v for k, v in state["model"].items()})
    optimizer = their_optimizer(model)
    optim_sd = state["optimizer"]
    if isinstance(optim_sd["param_groups"][0]["params"][0], str):  # by name: back to positions
        position = {fsdp_name(n): i for i, (n, _) in enumerate(model.named_parameters())}
        position.update({n: i for i, (n, _) in enumerate(model.named_parameters())})
        optim_sd = {"state": {position[k]: s for k, s in optim_sd["state"].items()},
                    "param_groups": [{**g, "params": sorted(position[p] for p in g["params"])}
                                     for g in optim_sd["param_groups"]]}
    # FSDP's state shares one "step" tensor between parameters; torch's non-fused AdamW would increment it in place
    # once per parameter. Their FSDP loading made separate tensors: so does this.
    optim_sd["state"] = {k: {n: v.clone() for n, v in s.items()} for k, s in optim_sd["state"].items()}
    optimizer.load_state_dict(optim_sd)
    return model, optimizer
