"""Memory per GPU of a training run, from the model config, precision, parallelism and micro batch: what `--dry_run`
prints, and the largest micro batch that fits a memory budget.

The peak is added up from what this toolkit's training step holds, component by component, at each of the moments
where a step is fullest (`phase_components`); the largest of them is the estimate. Each component is computed the way
the code allocates it:

- parameters: the master copy (fp32, bf16 under bf16-true), divided over the ranks that shard it;
- compute copies: the parameters as the matmuls use them, held from forward to backward. Without FSDP, bf16-mixed
  autocast casts every Linear weight to bf16 and autograd keeps the copy; FSDP gathers the unsharded (bf16 under
  mixed precision) parameters: all of them when it keeps them until backward (SHARD_GRAD_OP, NO_SHARD), else the
  root unit (embedding, final norm, lm_head: FSDP never reshards the root after forward) and two Blocks (the current
  one and the prefetched next);
- gradients: in the parameters' dtype, sharded like them; during gradient accumulation FSDP2 and FSDP1 inside
  `no_sync` hold unsharded gradients between micro-batches, and DDP keeps a bucket copy of all gradients;
- AdamW: two moments per parameter in the parameters' dtype, sharded;
- activations: the tensors autograd saves per Block, counted op by op in `block_activation_bytes` (checked against
  saved-tensor counts in tests/test_memory_estimate.py); with activation checkpointing only each Block's input, plus
  one Block recomputed at a time in backward;
- logits and loss: the logits, and the logits-sized gradient buffer of the chunked loss (lit_gpt/loss.py), plus its
  fp32 working chunks;
- overhead the allocator does not count (on CUDA only): CUDA context and libraries, fragmentation of the caching
  allocator, NCCL buffers.

`allocated` is comparable with `torch.cuda.max_memory_allocated()` (tests/gpu/test_memory_gpu.py) and, on a CPU, with
the peak resident memory above the one before the model was built (tests/test_memory_estimate.py); `total` adds the
overhead and is what must fit the GPU. The model assumes eager Blocks: compiled Blocks save less (inductor
recomputes cheap ops), so it is an upper bound with --compile.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from lit_gpt.config import Config
from lit_gpt.loss import CHUNK_ELEMENTS, DEFAULT_CHUNK_ELEMENTS

GiB = 2**30
FP32 = 4
# Not seen by torch's allocator (typical sizes on H100/H200 with torch 2.x and CUDA's lazy module loading; the GPU
# check records the reserved and device-wide figures next to the estimate): the CUDA context with the cuBLAS/cuDNN
# handles and kernels; the caching allocator's reserve above its peak allocation (blocks split and cached for reuse);
# NCCL's communication buffers when there are peers.
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
ALLOCATOR_FRAGMENTATION = 0.10
NCCL_BUFFER_BYTES = int(0.5 * GiB)
FLASH_LIKE = ("fa3", "fa4", "fa2", "flex", "sdpa")  # save q, k, v, out and the softmax statistics only


@dataclass(frozen=True)
class TrainingSetup:
    """What decides the memory of one rank."""

    config: Config
    micro_batch_size: int
    micro_batches: int = 1  # per optimizer step on each rank: > 1 accumulates gradients
    precision: str = "bf16-mixed"  # 32-true, bf16-mixed or bf16-true
    strategy: str = "auto"  # auto (one device), ddp, fsdp, fsdp2
    sharding_strategy: str = "FULL_SHARD"
    world_size: int = 1
    devices_per_node: int = 1
    activation_checkpointing: bool = False
    attn_impl: str = "sdpa"  # the concrete backend (lit_gpt.attention.resolve_backend), not "auto"
    document_masking: bool = False
    device_type: str = "cuda"

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "fsdp2")

    @property
    def shards(self) -> int:
        """Ranks that share one copy of the parameters, gradients and optimizer state."""
        if not self.sharded or self.sharding_strategy == "NO_SHARD":
            return 1
        return self.devices_per_node if self.sharding_strategy == "HYBRID_SHARD" else self.world_size

    @property
    def master_bytes(self) -> int:
        """Bytes per element of the parameters the optimizer updates (and of their gradients and AdamW moments)."""
        return 2 if self.precision == "bf16-true" else FP32

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the matmul inputs and outputs (and of the logits)."""
        return FP32 if self.precision == "32-true" else 2

    @property
    def residual_bytes(self) -> int:
        """Bytes per element of the residual stream. Under bf16-mixed without FSDP the parameters stay fp32 and
        autocast casts only the matmul inputs: the embedding output, the norms and the residual additions stay fp32.
        FSDP computes with bf16 parameters, so everything is bf16 there."""
        if self.precision == "32-true" or (self.precision == "bf16-mixed" and not self.sharded):
            return FP32
        return 2


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    linear: int  # in matmuls: what autocast casts
    block: int  # one transformer Block
    block_linear: int  # its matmul weights
    root: int  # embedding, final norm and lm_head: FSDP's root unit

    @classmethod
    def of(cls, c: Config) -> ParameterCounts:
        vocab = c.padded_vocab_size * c.n_embd
        block_linear = c.n_embd * c.qkv_size + c.n_head * c.head_size * c.n_embd + 3 * c.n_embd * c.intermediate_size
        block = block_linear + 2 * c.n_embd
        root = 2 * vocab + c.n_embd
        return cls(total=root + c.n_layer * block, linear=vocab + c.n_layer * block_linear, block=block,
                   block_linear=block_linear, root=root)


def block_activation_bytes(s: TrainingSetup) -> int:
    """Bytes autograd keeps for the backward pass of one Block (eager, not checkpointed), op by op:

    RMSNorm (twice): its input in fp32 (the residual itself when that is fp32, else an fp32 copy) and the normalised
    tensor in the residual dtype; the attention and MLP inputs in the compute dtype (autocast casts a fp32 input once
    per Linear, so the MLP's two Linears keep two copies); the value heads (copied out of the fused QKV output, which
    is then freed) and the RoPE-rotated q and k (SDPA with document masks and GQA: k and v expanded to every head); the attention output and its softmax
    statistics (flash-like kernels: FlashAttention, flex, SDPA's fused kernels) or, for eager attention, the expanded
    keys and values and the fp32 probabilities and their compute-dtype copy; SwiGLU's four [tokens, intermediate]
    tensors (fc_1 out, its SiLU, fc_2 out, their product).
    """
    c, r, cb = s.config, s.residual_bytes, s.compute_bytes
    batch, T = s.micro_batch_size, c.block_size
    n, d, h, D = batch * T, c.n_embd, c.n_head, c.head_size
    norms = 2 * n * d * (FP32 + r)
    linear_inputs = n * d * cb * (1 + (2 if r != cb else 1))  # attention, then the MLP
    qkv = n * c.n_query_groups * D * cb  # the value heads, copied out of the fused QKV output (not kept)
    if s.attn_impl == "sdpa" and s.document_masking and c.n_query_groups != h:
        # keys and values expanded to every query head (a masked GQA call keeps SDPA's fused kernel that way)
        attention = 3 * n * h * D * cb + n * h * D * cb + n * h * FP32  # rotated q, expanded k, v; out; lse
        qkv = 0
    elif s.attn_impl in FLASH_LIKE:
        attention = n * (h + c.n_query_groups) * D * cb + n * h * D * cb + n * h * FP32  # rotated q, k; out; lse
    else:  # eager: the rotated q, expanded k and v and the output copy; probabilities in fp32 and the compute dtype
        attention = 4 * n * h * D * cb + batch * h * T * T * (FP32 + (cb if cb != FP32 else 0))
        qkv = 0  # the expansion copies k and v: the QKV output is not kept
    mlp = 4 * n * c.intermediate_size * cb
    return norms + linear_inputs + qkv + attention + mlp


def _shared_activation_bytes(s: TrainingSetup) -> int:
    """Saved once per forward pass, outside the Blocks: the final norm and the lm_head input, and the masks."""
    c, r, cb = s.config, s.residual_bytes, s.compute_bytes
    n, T = s.micro_batch_size * c.block_size, c.block_size
    head = n * c.n_embd * (FP32 + r + cb) + n * 8  # final RMSNorm and lm_head input; the token ids (embedding)
    if not s.document_masking:
        return head
    masks = 2 * n * c.head_size * FP32  # cos/sin gathered at each token's position in its document
    if s.attn_impl == "sdpa":
        masks += s.micro_batch_size * T * T * cb  # SDPA's additive mask
    elif s.attn_impl == "eager":
        masks += s.micro_batch_size * T * T  # a bool mask
    return head + masks


def activation_bytes(s: TrainingSetup) -> int:
    """Activations saved by the forward pass of one micro batch (what is held when the loss has been computed)."""
    c = s.config
    per_block = (s.micro_batch_size * c.block_size * c.n_embd * s.residual_bytes if s.activation_checkpointing
                 else block_activation_bytes(s))  # checkpointing keeps only each Block's input
    return c.n_layer * per_block + _shared_activation_bytes(s)


def _compute_copies(s: TrainingSetup, p: ParameterCounts) -> int:
    """Parameters in their compute form, held from forward to backward (see the module docstring)."""
    if not s.sharded:
        if s.precision != "bf16-mixed":
            return 0
        # Checkpointed Blocks drop their casts with their activations (and cast again when recomputed, one at a time).
        blocks_cast = 1 if s.activation_checkpointing else s.config.n_layer
        return (p.linear - (s.config.n_layer - blocks_cast) * p.block_linear) * 2
    if s.shards == 1 and s.compute_bytes == s.master_bytes:
        return 0  # nothing to gather or cast: the parameters are used as they are
    reshards = s.shards > 1 and s.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
    return (p.root + 2 * p.block if reshards else p.total) * s.compute_bytes


def _accumulated_gradients(s: TrainingSetup, p: ParameterCounts) -> tuple[str, int]:
    """(component, bytes) of the gradients held between the micro-batches of one optimizer step."""
    if s.micro_batches == 1:
        return "gradients", 0
    if s.strategy == "fsdp2":  # unsharded, in the reduce dtype (fp32 under bf16-mixed)
        return "unsharded gradients", p.total * (FP32 if s.precision == "bf16-mixed" else s.master_bytes)
    if s.strategy == "fsdp" and s.precision != "bf16-mixed" and s.shards > 1:  # FSDP1 `no_sync`: unsharded
        return "unsharded gradients", p.total * s.master_bytes
    # One device, DDP, and FSDP1 under bf16-mixed (reduce-scattered in fp32 after every micro-batch).
    return "gradients", p.total * s.master_bytes // s.shards


def _loss_bytes(s: TrainingSetup, with_logits: bool) -> int:
    """The logits (until the trainer drops them after the loss), the loss's gradient buffer in the logits' dtype and
    its fp32 working chunks (an upcast copy of bf16 logits and the log-probabilities)."""
    c = s.config
    rows = s.micro_batch_size * c.block_size
    logits = rows * c.padded_vocab_size * s.compute_bytes
    chunk_rows = max(1, CHUNK_ELEMENTS.get(s.device_type, DEFAULT_CHUNK_ELEMENTS) // c.padded_vocab_size)
    chunk = min(rows, chunk_rows) * c.padded_vocab_size
    chunks = chunk * FP32 * (2 if s.compute_bytes != FP32 else 1)
    return logits * (2 if with_logits else 1) + (chunks if with_logits else 0)


@dataclass
class MemoryEstimate:
    setup: TrainingSetup
    phase: str  # the moment of the peak
    components: dict[str, int]  # bytes held then, by component
    overhead: dict[str, int] = field(default_factory=dict)  # not counted by torch's allocator

    @property
    def allocated(self) -> int:
        return sum(self.components.values())

    @property
    def total(self) -> int:
        return self.allocated + sum(self.overhead.values())


def phase_components(s: TrainingSetup) -> dict[str, dict[str, int]]:
    """Bytes by component at each moment of a training step where the memory peaks (steady state: after the first
    step the optimizer state exists)."""
    c, p = s.config, ParameterCounts.of(s.config)
    n = s.micro_batch_size * c.block_size
    static = {"parameters": p.total * s.master_bytes // s.shards,
              "optimizer state": 2 * p.total * s.master_bytes // s.shards}
    if s.strategy == "ddp":  # on one device too: `ddp` is DDP there (lit_gpt.distributed.make_strategy)
        static["gradient buckets (DDP)"] = p.total * s.master_bytes
    grads_name, grads = _accumulated_gradients(s, p)
    forward = {**static, "compute copies": _compute_copies(s, p), grads_name: grads, "activations": activation_bytes(s)}
    # lm_head's weight gradient in the compute dtype, then added to the master gradient; the gradient of the hidden
    # states.
    head_grads = c.padded_vocab_size * c.n_embd * (s.compute_bytes + s.master_bytes) + n * c.n_embd * s.compute_bytes
    phases = {
        "end of forward (loss)": {**forward, "logits and loss": _loss_bytes(s, with_logits=True)},
        "start of backward": {**forward, "logits and loss": _loss_bytes(s, with_logits=False),
                              "backward buffers": head_grads},
        "end of backward": {**static, "gradients": p.total * s.master_bytes // s.shards},
    }
    if s.activation_checkpointing:
        # Upper bound over the backward pass: every Block input and every gradient (the first Blocks recomputed hold
        # all Block inputs, the last ones nearly all gradients), one Block's activations recomputed, and the
        # gradients flowing through it.
        recompute = replace(s, activation_checkpointing=False)
        phases["recomputing a Block"] = {
            **forward, grads_name: max(grads, p.total * s.master_bytes // s.shards),
            "activations": forward["activations"] + block_activation_bytes(recompute),
            "backward buffers": _block_backward_bytes(s)}
    if s.sharded:  # FSDP's unsharded root-unit gradient (lm_head's arrives first), cast to fp32 for the reduce
        cast = FP32 if s.compute_bytes != FP32 else 0
        phases["end of backward"]["backward buffers"] = p.root * (s.compute_bytes + cast)
    return phases


def _block_backward_bytes(s: TrainingSetup) -> int:
    """Gradients flowing through one Block in backward at its fullest: of the MLP's output, and of the residual
    stream (the one arriving and the one being built)."""
    c = s.config
    n = s.micro_batch_size * c.block_size
    return n * c.intermediate_size * s.compute_bytes + 2 * n * c.n_embd * s.residual_bytes


def estimate_memory(s: TrainingSetup) -> MemoryEstimate:
    phases = phase_components(s)
    phase = max(phases, key=lambda name: sum(phases[name].values()))
    estimate = MemoryEstimate(s, phase, {k: v for k, v in phases[phase].items() if v})
    if s.device_type == "cuda":
        estimate.overhead = {"CUDA context": CUDA_CONTEXT_BYTES,
                             "allocator fragmentation": int(estimate.allocated * ALLOCATOR_FRAGMENTATION)}
        if s.world_size > 1:
            estimate.overhead["NCCL buffers"] = NCCL_BUFFER_BYTES
    return estimate


def largest_micro_batch(s: TrainingSetup, budget_bytes: float, divides: int | None = None,
                        limit: int = 1 << 16) -> int:
    """The largest micro batch whose estimated total fits `budget_bytes` (0: not even 1), optionally only among the
    divisors of `divides` (the per-rank batch). The total grows with the micro batch, so a bisection finds it."""
    def fits(b: int) -> bool:
        return estimate_memory(replace(s, micro_batch_size=b)).total <= budget_bytes

    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    if divides is not None:
        low = max((b for b in range(1, min(low, divides) + 1) if divides % b == 0), default=0)
    return low
