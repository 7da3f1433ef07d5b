"""Mapping between lit-gpt state dicts / Configs and Hugging Face `LlamaForCausalLM`, in both directions.

Every HF tensor derives from exactly one lit tensor (the fused QKV splits into three), so conversions work one
tensor at a time and never need the whole model in memory. Conversions are pure reshapes and slices, so they also
work on meta tensors: that is how the HF shapes of a config are derived, to check files before reading weights.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lit_gpt.config import DTYPE_NAMES, Config, name_to_config

# lit name -> HF name for the tensors outside the blocks, and per block (after the `transformer.h.{i}.` prefix).
GLOBAL_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.fc_1.weight": "mlp.gate_proj.weight",
    "mlp.fc_2.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
}
QKV = "attn.attn.weight"
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_BLOCK_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
# --dtype values: short and torch spellings.
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, **{v: k for k, v in _DTYPE_NAMES.items()}}
assert tuple(TORCH_DTYPES) == DTYPE_NAMES, "lit_gpt.config.DTYPE_NAMES lists the --dtype values"


# ------------------------------------------------------------------ fused QKV
def split_qkv(config: Config, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lit's grouped [q_per_kv queries, 1 key, 1 value] x n_query_groups rows -> HF q_proj, k_proj, v_proj."""
    g, qpk, hs = config.n_query_groups, config.q_per_kv, config.head_size
    grouped = weight.view(g, qpk + 2, hs, weight.shape[-1])
    q = grouped[:, :qpk].reshape(g * qpk * hs, -1)
    k = grouped[:, qpk].reshape(g * hs, -1)
    v = grouped[:, qpk + 1].reshape(g * hs, -1)
    return q, k, v


def merge_qkv(config: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_qkv`. HF query head h reads key/value head h // q_per_kv, as lit's grouping does."""
    g, qpk, hs = config.n_query_groups, config.q_per_kv, config.head_size
    n_embd = q.shape[-1]
    parts = (q.reshape(g, qpk, hs, n_embd), k.reshape(g, 1, hs, n_embd), v.reshape(g, 1, hs, n_embd))
    return torch.cat(parts, dim=1).reshape(-1, n_embd)


# ------------------------------------------------------------------ names
def lit_model_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every lit parameter name and shape of `GPT(config)`, embedding first and lm_head last.

    Spelled out rather than read from a meta-device GPT: building one costs seconds of first-use torch imports in a
    CLI; tests/test_hf_import.py checks that the two agree.
    """
    c = config
    block = {
        "norm_1.weight": (c.n_embd,),
        QKV: (c.qkv_size, c.n_embd),
        "attn.proj.weight": (c.n_embd, c.n_head * c.head_size),
        "norm_2.weight": (c.n_embd,),
        "mlp.fc_1.weight": (c.intermediate_size, c.n_embd),
        "mlp.fc_2.weight": (c.intermediate_size, c.n_embd),
        "mlp.proj.weight": (c.n_embd, c.intermediate_size),
    }
    shapes = {"transformer.wte.weight": (c.padded_vocab_size, c.n_embd)}
    for i in range(c.n_layer):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in block.items()})
    shapes["transformer.ln_f.weight"] = (c.n_embd,)
    shapes["lm_head.weight"] = (c.padded_vocab_size, c.n_embd)
    return shapes


def hf_model_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name and shape for `config`, in lit parameter order."""
    shapes = {}
    for key, shape in lit_model_shapes(config).items():
        for name, t in lit_to_hf(config, key, torch.empty(shape, device="meta")).items():
            shapes[name] = tuple(t.shape)
    return shapes


def hf_names(lit_key: str) -> tuple[str, ...]:
    """The HF tensor name(s) a lit tensor becomes (three for the fused QKV)."""
    if lit_key in GLOBAL_NAMES:
        return (GLOBAL_NAMES[lit_key],)
    match = _BLOCK_KEY.match(lit_key)
    if match:
        layer, rest = match.groups()
        if rest == QKV:
            return tuple(f"model.layers.{layer}.{name}" for name in HF_QKV)
        if rest in BLOCK_NAMES:
            return (f"model.layers.{layer}.{BLOCK_NAMES[rest]}",)
    raise KeyError(f"no Hugging Face name for lit parameter {lit_key!r}")


def lit_to_hf(config: Config, lit_key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One lit tensor -> its HF tensor(s) (views where possible; callers make them contiguous when writing)."""
    names = hf_names(lit_key)
    parts = split_qkv(config, tensor) if len(names) == 3 else (tensor,)
    return dict(zip(names, parts))


def hf_to_lit(config: Config, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(lit key, tensor) pairs for the whole model, fetching each HF tensor by name with `get` on demand.

    A checkpoint with tied embeddings (no `lm_head.weight`) gets a copy of the embedding as lm_head: our model is
    untied, and the copy computes the same logits.
    """
    for lit_key in lit_model_shapes(config):
        names = hf_names(lit_key)
        if len(names) == 3:
            yield lit_key, merge_qkv(config, *(get(n) for n in names))
        elif lit_key == "lm_head.weight":
            try:
                yield lit_key, get(names[0])
            except KeyError:
                yield lit_key, get(GLOBAL_NAMES["transformer.wte.weight"]).clone()
        else:
            yield lit_key, get(names[0])


# ------------------------------------------------------------------ configs
def hf_config(config: Config, dtype: torch.dtype, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for LlamaForCausalLM. The lm_head keeps its padded rows so shapes match the checkpoint exactly;
    `vocab_size` is therefore `padded_vocab_size` (the tokenizer may be smaller, as in many published models)."""
    dtype_name = _DTYPE_NAMES[dtype]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": float(config.rope_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def config_from_hf(hf: dict, vocab_size: int | None = None, name: str = "", where: str = "config.json") -> Config:
    """Our Config for an HF Llama config.json: a registry entry when the architecture matches, else a custom one.

    `vocab_size` is the tokenizer's size when known (the embedding may hold more, padded rows).
    """
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not supported (only 'llama')")
    unsupported = {"attention_bias": True, "mlp_bias": True}
    for key, bad in unsupported.items():
        if hf.get(key) == bad:
            raise ValueError(f"{where}: {key}={bad} is not supported by our Llama model")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: RoPE scaling {rope!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rows = hf["vocab_size"]
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(f"{where}: vocab_size {rows} is smaller than the tokenizer's {vocab_size} tokens")
    arch = dict(
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_base=int(theta) if float(theta).is_integer() else theta, padded_vocab_size=rows,
    )
    block_size = hf.get("max_position_embeddings", 2048)
    for registry_name in name_to_config:
        candidate = Config.from_name(registry_name, block_size=block_size)
        if all(getattr(candidate, k) == v for k, v in arch.items()) and (
                vocab_size is None or candidate.vocab_size == vocab_size):
            return candidate
    return Config(name=name, block_size=block_size, vocab_size=vocab_size or rows, **arch)


# ------------------------------------------------------------------ reading HF directories
def is_hf_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


class HFWeights:
    """Lazy, memory-mapped access to the tensors of an HF safetensors checkpoint (one file or an index)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import SafetensorError, safe_open

        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: not a readable safetensors index with a weight_map "
                                 f"({type(e).__name__}: {e})") from None
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors checkpoints are read)")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            # A shard the index names may be missing or truncated (an interrupted download): say which.
            try:
                handle = safe_open(str(directory / name), framework="pt")
            except (OSError, SafetensorError) as e:
                raise ValueError(f"{directory / name}: cannot read this safetensors file ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        return self._handles[self._where[key]].get_tensor(key)


def read_hf_checkpoint(directory: Path, vocab_size: int | None = None) -> tuple[Config, Iterator[tuple[str, torch.Tensor]]]:
    """Our Config and a lazy stream of lit (key, tensor) pairs for an HF Llama directory."""
    directory = Path(directory)
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / 'config.json'}: unreadable ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{directory / 'config.json'}: holds a JSON {type(hf).__name__}, not a model config object")
    try:
        config = config_from_hf(hf, vocab_size=vocab_size, name=directory.name, where=str(directory / "config.json"))
    except KeyError as e:
        raise ValueError(f"{directory / 'config.json'}: missing {e}") from None
    weights = HFWeights(directory)
    expected = hf_model_shapes(config)
    present = {k for k in weights.keys() if not k.endswith("rotary_emb.inv_freq")}  # old exports stored RoPE
    optional = {"lm_head.weight"} if hf.get("tie_word_embeddings") else set()  # tied: the embedding serves
    missing = sorted(set(expected) - present - optional)
    extra = sorted(present - set(expected))
    if missing or extra:
        raise ValueError(f"{directory}: weights do not match config.json (missing {missing[:3]}, unexpected {extra[:3]})")
    for key in sorted(present):
        if weights.shape(key) != expected[key]:
            raise ValueError(f"{directory}: {key} has shape {list(weights.shape(key))}, config.json implies "
                             f"{list(expected[key])}")
    return config, hf_to_lit(config, weights.__getitem__)
