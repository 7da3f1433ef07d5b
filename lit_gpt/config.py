"""Model configurations: one dataclass plus a registry of named architectures.

Field names follow lit-gpt so that its configs and checkpoints map over by name.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

AttnImpl = Literal["auto", "fa3", "fa4", "fa2", "flex", "sdpa", "eager"]
ATTN_IMPLS = ("auto", "fa3", "fa4", "fa2", "flex", "sdpa", "eager")  # lit_gpt.attention.BACKENDS and auto
# The scripts' --dtype values, listed here so that --help needs no torch; lit_gpt.hf_convert.TORCH_DTYPES maps them.
DTYPE_NAMES = ("bf16", "fp32", "bfloat16", "float32")


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


def _arch(help_text: str, default: Any = None):
    """A Config field with its `--help` text; the trainer overrides it from the command line (every size here is
    positive, which the trainer's parser enforces)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class Config:
    name: str = ""
    block_size: int = _arch("tokens per training sample (context length)", 2048)
    vocab_size: int = _arch("tokenizer vocabulary size", 32000)
    # The embedding and lm_head are padded to a multiple of this for fast matmuls.
    padding_multiple: int = _arch("pad the embedding and lm_head rows to a multiple of this", 64)
    padded_vocab_size: int | None = _arch("rows of the embedding and lm_head (default: vocab_size padded)")
    n_layer: int = _arch("transformer blocks", 12)
    n_head: int = _arch("attention (query) heads", 12)
    n_embd: int = _arch("hidden size", 768)
    # n_query_groups == n_head is MHA, 1 is MQA, anything between is GQA.
    n_query_groups: int | None = _arch("key/value heads (GQA; default: n_head, i.e. MHA)")
    head_size: int | None = _arch("size of one attention head (default: n_embd / n_head)")
    intermediate_size: int = _arch("hidden size of the SwiGLU MLP", 2048)
    norm_eps: float = _arch("RMSNorm epsilon", 1e-5)
    rope_base: int = _arch("RoPE base (theta)", 10000)
    # Runtime choice of attention kernel; not part of the architecture.
    attn_impl: AttnImpl = "auto"

    def __post_init__(self) -> None:
        # All derived fields are resolved here and nowhere else.
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_query_groups ({self.n_query_groups})")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    @property
    def qkv_size(self) -> int:
        """Output rows of the fused QKV projection."""
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in name_to_config:
            close = difflib.get_close_matches(name, name_to_config, n=5, cutoff=0.4)
            hint = close or sorted(name_to_config)
            raise ValueError(f"Unknown model name {name!r}. Closest known names: {', '.join(hint)}")
        base = dict(name_to_config[name])
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown Config field(s) {sorted(unknown)} for model {name!r}")
        # Registry entries hold no derived fields, so overrides recompute them in __post_init__.
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)


def _llama(name: str, **kw: Any) -> dict:
    return dict(name=name, **kw)


configs = [
    # LLäMmlein: 32,000 BPE tokens + 10 added tokens, padded to 32,064.
    _llama("LLaMmlein_120M", n_layer=12, n_head=12, n_embd=768, n_query_groups=4, intermediate_size=2048, vocab_size=32010),
    _llama("LLaMmlein_1B", n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632, vocab_size=32010),
    _llama("LLaMmlein_7B", n_layer=32, n_head=32, n_embd=4096, n_query_groups=32, intermediate_size=11008, vocab_size=32010),
    _llama("tiny_LLaMA_1b", n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632, vocab_size=32000),
    _llama("tiny_LLaMA_120M", n_layer=12, n_head=12, n_embd=768, n_query_groups=1, intermediate_size=2048, vocab_size=32000),
    _llama("Llama-2-7b-hf", n_layer=32, n_head=32, n_embd=4096, n_query_groups=32, intermediate_size=11008, vocab_size=32000, block_size=4096),
    # Small models for the CPU demo, tests and benchmarks.
    _llama("micro", n_layer=2, n_head=4, n_embd=64, n_query_groups=2, intermediate_size=176, vocab_size=512, block_size=128),
    _llama("demo_5M", n_layer=4, n_head=4, n_embd=256, n_query_groups=2, intermediate_size=704, vocab_size=4096, block_size=256),
    _llama("demo_25M", n_layer=8, n_head=8, n_embd=448, n_query_groups=4, intermediate_size=1216, vocab_size=8192, block_size=512),
]

name_to_config: dict[str, dict] = {c["name"]: c for c in configs}
