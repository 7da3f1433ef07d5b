"""Fabric strategies for FSDP, FSDP2, DDP and a single device that run the same on CUDA (NCCL) and CPU (gloo).

Under `bf16-mixed` both FSDP versions compute with bf16 parameters and accumulate and reduce gradients in fp32:

- FSDP2 (`fully_shard` with param bf16 / reduce fp32) keeps the unsharded gradient of micro-batches whose sync is
  skipped in its reduce dtype, so gradient accumulation stays exact with one reduce-scatter per optimizer step.
- FSDP1 accumulates inside `no_sync` in the parameter dtype (bf16 gradients summed over 16 micro-batches lose
  several bits). Here it reduces in fp32 and skips `no_sync`: every micro-batch's gradient is reduce-scattered in
  fp32 and added to the fp32 gradient shard. Cost: one fp32 reduce-scatter per micro-batch instead of per step
  (with SHARD_GRAD_OP also one bf16 all-gather per micro-batch, as FSDP1 reshards after every synced backward);
  in exchange no unsharded gradient is held between micro-batches.

Sharding strategies map onto FSDP2 as FULL_SHARD -> reshard after forward, SHARD_GRAD_OP -> keep the gathered
parameters until backward, HYBRID_SHARD -> a (replicate = nodes, shard = devices per node) mesh, NO_SHARD -> a
(replicate = all ranks, shard = 1) mesh, i.e. plain replication with an all-reduce of the gradients.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta

import torch
import torch.nn as nn
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.fabric.strategies.fsdp import _FSDPBackwardSyncControl, _setup_activation_checkpointing
from lightning.fabric.strategies.model_parallel import _ParallelBackwardSyncControl
from lightning.fabric.utilities.rank_zero import rank_zero_info

from lit_gpt.model import Block

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
# Compute dtype of each mixed precision; its gradients are accumulated and reduced in fp32.
MIXED_COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _precision_name(strategy: Strategy) -> str:
    return getattr(strategy.precision, "precision", "32-true")


def _replicate_shard_mesh(device_type: str, shape: tuple[int, int]):
    """A 2-D (replicate, shard) mesh; built only once the process group exists."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


class _SyncEveryMicroBatchIfNeeded(_FSDPBackwardSyncControl):
    def __init__(self, strategy: FSDPAnyDeviceStrategy) -> None:
        self._strategy = strategy

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        if enabled and self._strategy.syncs_every_micro_batch:
            return nullcontext()
        return super().no_backward_sync(module, enabled)


class FSDPAnyDeviceStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1) strategy, made to work on CPU and to accumulate mixed-precision gradients in fp32.

    Lightning passes `device_id=None` on CPU (FSDP then fails) and builds hybrid-shard meshes on CUDA only; on CPU
    the shard group of HYBRID_SHARD silently degenerates to size 1 and ranks never sync. Both are fixed here.
    """

    def __init__(self, *args, hybrid_mesh_shape: tuple[int, int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hybrid_mesh_shape = hybrid_mesh_shape
        self._backward_sync_control = _SyncEveryMicroBatchIfNeeded(self)

    @property
    def mixed_precision_config(self):
        config = super().mixed_precision_config
        if config is not None and _precision_name(self) in MIXED_COMPUTE_DTYPES:
            # Lightning reduces in the compute dtype: gradients must be summed over ranks in fp32.
            config = dataclasses.replace(config, reduce_dtype=torch.float32)
        return config

    @property
    def syncs_every_micro_batch(self) -> bool:
        """FSDP1's `no_sync` adds micro-batch gradients in the parameter dtype. Where that is below the reduce dtype
        (bf16 vs fp32), every micro-batch is reduced instead and accumulated in the reduce dtype."""
        mp = self.mixed_precision_config
        return mp is not None and mp.param_dtype not in (None, mp.reduce_dtype)

    def setup_environment(self) -> None:
        super().setup_environment()
        if self._hybrid_mesh_shape is not None:
            # Built only now: the mesh needs the process group, and its device type must match the root device.
            self._fsdp_kwargs["device_mesh"] = _replicate_shard_mesh(self.root_device.type, self._hybrid_mesh_shape)
            replicate, shard = self._hybrid_mesh_shape
            rank_zero_info(f"FSDP HYBRID_SHARD: mesh replicate={replicate} x shard={shard}")

    def setup_module(self, module: nn.Module) -> nn.Module:
        if self.root_device.type != "cpu":
            return super().setup_module(module)
        from torch.distributed.fsdp import FullyShardedDataParallel

        module = FullyShardedDataParallel(
            module=module,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self._fsdp_kwargs,
        )
        _setup_activation_checkpointing(module, self._activation_checkpointing_kwargs)
        return module


class _FSDP2BackwardSyncControl(_ParallelBackwardSyncControl):
    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        # Lightning's context, left with enabled=False, turns gradient sync *off* for every later backward.
        return super().no_backward_sync(module, enabled) if enabled else nullcontext()


def fsdp2_mixed_precision(compute_dtype: torch.dtype | None):
    """FSDP2's policy: parameters gathered in `compute_dtype`, gradients reduced in fp32. Without a dtype FSDP2 gathers
    fp32 parameters; true precisions already hold parameters in their dtype. Forward inputs are not cast (as FSDP1
    leaves them): casting would round RoPE's fp32 cos/sin tables, which every Block takes, to bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None,
                                cast_forward_inputs=False)


def fsdp2_parallelize(module: nn.Module, mesh, **fully_shard_kwargs) -> nn.Module:
    """FSDP2: shard every transformer Block, then the root (embedding, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for block in module.transformer.h:
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(module, mesh=mesh, **fully_shard_kwargs)
    return module


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data parallelism with FSDP2 (`fully_shard`).

    `mesh_shape` (replicate, shard) selects hybrid sharding; None shards over all ranks. The optimizer must be
    created after `setup_module` (it would otherwise hold the unsharded parameters).
    """

    def __init__(self, world_size: int, mesh_shape: tuple[int, int] | None, reshard_after_forward: bool,
                 timeout: timedelta | None = None) -> None:
        super().__init__(parallelize_fn=self._parallelize, data_parallel_size=world_size, tensor_parallel_size=1,
                         **({"timeout": timeout} if timeout else {}))
        self._mesh_shape = mesh_shape
        self._reshard_after_forward = reshard_after_forward
        self._backward_sync_control = _FSDP2BackwardSyncControl()

    def setup_environment(self) -> None:
        super().setup_environment()
        if self._mesh_shape is None:
            self._fsdp_mesh = self.device_mesh["data_parallel"]
        else:
            self._fsdp_mesh = _replicate_shard_mesh(self.root_device.type, self._mesh_shape)
        rank_zero_info(f"FSDP2: mesh {dict(zip(self._fsdp_mesh.mesh_dim_names, self._fsdp_mesh.shape))}, "
                       f"reshard_after_forward={self._reshard_after_forward}")

    def _parallelize(self, module: nn.Module, _lightning_mesh) -> nn.Module:
        compute_dtype = MIXED_COMPUTE_DTYPES.get(_precision_name(self))
        return fsdp2_parallelize(module, self._fsdp_mesh, mp_policy=fsdp2_mixed_precision(compute_dtype),
                                 reshard_after_forward=self._reshard_after_forward)


def make_strategy(
    strategy: str,
    world_size: int,
    num_nodes: int = 1,
    sharding_strategy: str = "FULL_SHARD",
    timeout: timedelta | None = None,
) -> Strategy | str:
    """Build the Fabric strategy named `strategy` for `world_size` processes over `num_nodes` nodes. `timeout` bounds
    the process group's rendezvous and every collective (None: torch's default): a rank that never arrives (a
    misconfigured launch, a dead node) ends the run with an error instead of a wait without end."""
    waiting = {"timeout": timeout} if timeout else {}
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    if sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"--sharding_strategy must be one of {SHARDING_STRATEGIES}, got {sharding_strategy!r}")
    if strategy == "auto":
        return "auto"
    if strategy == "ddp":  # also on one device: DDP's wrapper, bucketing and hooks are what a `ddp` run checks
        return DDPStrategy(find_unused_parameters=False, **waiting)
    # Shard inside a node, replicate across nodes.
    hybrid_mesh = (num_nodes, world_size // num_nodes) if sharding_strategy == "HYBRID_SHARD" else None
    if strategy == "fsdp2":
        if sharding_strategy == "NO_SHARD":
            hybrid_mesh = (world_size, 1)
        # NO_SHARD keeps parameters gathered like SHARD_GRAD_OP: a shard group of one has nothing to free.
        reshard = sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
        return FSDP2Strategy(world_size, hybrid_mesh, reshard_after_forward=reshard, timeout=timeout)
    return FSDPAnyDeviceStrategy(
        auto_wrap_policy={Block},
        sharding_strategy=sharding_strategy,
        state_dict_type="sharded",  # checkpoints are written by lit_gpt.checkpoint, not by the strategy
        use_orig_params=True,
        limit_all_gathers=True,
        hybrid_mesh_shape=hybrid_mesh,
        **waiting,
    )
