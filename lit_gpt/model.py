"""Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied lm_head.

State-dict keys follow lit-gpt (`transformer.wte`, `transformer.h.{i}.attn.attn`, ...), so lit-gpt-family
checkpoints load by name. Every parameterised module initialises itself in `reset_parameters`, which is what
FSDP calls after materialising a meta-device model; the init scheme therefore survives meta-device construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lit_gpt.attention import DocumentMask, Mask, attention, prepare_mask, resolve_backend
from lit_gpt.config import Config


def normal_init_(weight: torch.Tensor, std: float) -> None:
    """N(0, std^2) drawn in fp32 and then cast: a bf16 model (bf16-true) starts from the fp32 model's weights of the
    same seed, whatever random stream torch uses for `normal_` on bf16 tensors."""
    if weight.dtype == torch.float32 or weight.is_meta:
        nn.init.normal_(weight, mean=0.0, std=std)
        return
    with torch.no_grad():
        weight.copy_(torch.empty(weight.shape, dtype=torch.float32, device=weight.device).normal_(0.0, std))


class Linear(nn.Linear):
    """Bias-free linear layer initialised from N(0, std^2)."""

    def __init__(self, in_features: int, out_features: int, std: float) -> None:
        self.std = std  # set before nn.Linear.__init__, which calls reset_parameters
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        normal_init_(self.weight, self.std)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, std: float) -> None:
        self.std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        normal_init_(self.weight, self.std)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama does), then scale in the input dtype.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def build_rope_cache(seq_len: int, head_size: int, base: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_size] in fp32, NeoX/HF half-split layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [T, D] or [B, T, D]. Rotation is computed in fp32."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_length: int, n_kv: int, head_size: int, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, max_seq_length, n_kv, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[: k.shape[0]].index_copy_(1, input_pos, k)
        self.v[: v.shape[0]].index_copy_(1, input_pos, v)
        return self.k[: k.shape[0]], self.v[: v.shape[0]]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, init_std: float, proj_std: float) -> None:
        super().__init__()
        self.config = config
        # Fused QKV in lit-gpt's grouped layout: per query group, q_per_kv query heads, one key, one value head.
        self.attn = Linear(config.n_embd, config.qkv_size, std=init_std)
        self.proj = Linear(config.n_head * config.head_size, config.n_embd, std=proj_std)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Mask = None,
        input_pos: torch.Tensor | None = None,
        attn_impl: str | None = None,
    ) -> torch.Tensor:
        """`attn_impl` is the concrete backend and `mask` what `prepare_mask` built for it (GPT.forward passes both,
        resolved once outside any compiled region); without `attn_impl` the config's choice is resolved here."""
        c = self.config
        B, T, _ = x.shape
        qkv = self.attn(x).view(B, T, c.n_query_groups, c.q_per_kv + 2, c.head_size)
        q = qkv[:, :, :, : c.q_per_kv].reshape(B, T, c.n_head, c.head_size)
        k = qkv[:, :, :, c.q_per_kv]
        # A copy: attention keeps v for its backward pass, and a view would keep the whole fused qkv output alive.
        v = qkv[:, :, :, c.q_per_kv + 1].contiguous()
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set; call GPT.set_kv_cache first")
            k, v = self.kv_cache.update(input_pos, k, v)
        if attn_impl is None:
            attn_impl = resolve_backend(c.attn_impl, q.device, q.dtype, c.head_size, isinstance(mask, DocumentMask))
        y = attention(q, k, v, attn_impl, mask)
        return self.proj(y.reshape(B, T, c.n_head * c.head_size))


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config, init_std: float, proj_std: float) -> None:
        super().__init__()
        self.fc_1 = Linear(config.n_embd, config.intermediate_size, std=init_std)  # HF gate_proj
        self.fc_2 = Linear(config.n_embd, config.intermediate_size, std=init_std)  # HF up_proj
        self.proj = Linear(config.intermediate_size, config.n_embd, std=proj_std)  # HF down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        # TinyLlama / GPT-NeoX init: small normal everywhere, residual-output projections scaled by depth.
        init_std = math.sqrt(2.0 / (5 * config.n_embd))
        proj_std = 1.0 / math.sqrt(config.n_embd) / config.n_layer
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, init_std, proj_std)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = LLaMAMLP(config, init_std, proj_std)

    def forward(self, x: torch.Tensor, cos, sin, mask: Mask = None, input_pos=None, attn_impl=None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, mask, input_pos, attn_impl)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        init_std = math.sqrt(2.0 / (5 * config.n_embd))
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, std=init_std)
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(config.padded_vocab_size, config.n_embd, std=init_std),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, config.norm_eps),
            )
        )
        # Recompute each Block's activations in the backward pass instead of storing them (memory for compute).
        self.activation_checkpointing = False
        # The RoPE tables are plain attributes, not buffers: they stay fp32 under `bf16-true` precision
        # conversion and need no special handling under meta-device init or sharding.
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def init_weights(self) -> None:
        """Re-initialise every parameter (e.g. after `to_empty()` on a meta-device model)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def rope_cache(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._rope:
            c = self.config
            self._rope[device] = build_rope_cache(c.block_size, c.head_size, c.rope_base, device)
        return self._rope[device]

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None) -> None:
        c = self.config
        max_seq_length = max_seq_length or c.block_size
        if max_seq_length > c.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds block_size {c.block_size}")
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_seq_length, c.n_query_groups, c.head_size, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(
        self,
        idx: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        restart_positions: bool = True,
        doc_mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        """idx: [B, T] token ids -> logits [B, T, padded_vocab_size].

        doc_mask: optional DocumentMask of the packed documents (the data loader builds it on the host); tokens then
        attend only within their own document, and with `restart_positions` RoPE positions restart per document.
        doc_ids: the same given as [B, T] ids that change where a document starts (the mask is then computed here,
        on the host: one device synchronisation).
        input_pos: [T] absolute positions for incremental decoding with the KV cache.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"Sequence length {T} exceeds block_size {self.config.block_size}")
        if doc_ids is not None:
            if doc_mask is not None:
                raise ValueError("pass doc_ids or doc_mask, not both")
            doc_mask = DocumentMask.from_doc_ids(doc_ids)
        x = self.transformer.wte(idx)
        # The backend and its mask are decided here, once per forward pass and outside the (compiled) Blocks.
        device_type = idx.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        impl = resolve_backend(self.config.attn_impl, idx.device, dtype, self.config.head_size, doc_mask is not None)
        cos, sin = self.rope_cache(idx.device)
        if input_pos is not None:
            if doc_mask is not None:
                raise ValueError("doc_ids and input_pos (KV-cache decoding) cannot be combined")
            if self.transformer.h[0].attn.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set; call GPT.set_kv_cache first")
            cos, sin = cos[input_pos], sin[input_pos]
            max_len = self.transformer.h[0].attn.kv_cache.k.shape[1]
            mask = (torch.arange(max_len, device=idx.device)[None, :] <= input_pos[:, None])[None, None]
            if impl not in ("sdpa", "eager"):
                impl = "sdpa"  # an explicit mask (decoding) goes through SDPA, the kernel-agnostic path
        else:
            if doc_mask is not None and restart_positions:
                cos, sin = cos[doc_mask.positions], sin[doc_mask.positions]
            else:
                cos, sin = cos[:T], sin[:T]
            mask = prepare_mask(impl, doc_mask, T, T, idx.device, dtype)

        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                # Non-reentrant checkpointing wraps no module, so state-dict keys stay the same for every strategy.
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, input_pos, impl, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, input_pos, impl)
        return self.lm_head(self.transformer.ln_f(x))


def num_parameters(module: nn.Module, requires_grad: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad)
