"""Fabric strategies for FSDP, FSDP2, DDP and a single device that run the same on CUDA (NCCL) and CPU (gloo)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

from lit_gpt.model import Block

STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")


class FSDPAnyDeviceStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, made to work on CPU as well.

    Lightning passes `device_id=None` on CPU (FSDP then fails) and builds hybrid-shard meshes on CUDA only; on CPU
    the shard group of HYBRID_SHARD silently degenerates to size 1 and ranks never sync. Both are fixed here.
    """

    def __init__(self, *args, hybrid_mesh_shape: Optional[tuple[int, int]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hybrid_mesh_shape = hybrid_mesh_shape

    def setup_environment(self) -> None:
        super().setup_environment()
        if self._hybrid_mesh_shape is not None:
            from torch.distributed.device_mesh import init_device_mesh

            # Built only now: the mesh needs the process group, and its device type must match the root device.
            self._fsdp_kwargs["device_mesh"] = init_device_mesh(self.root_device.type, self._hybrid_mesh_shape)

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


def fsdp2_parallelize(module: nn.Module, device_mesh) -> nn.Module:
    """FSDP2: shard every transformer Block, then the root (embedding, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in module.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def make_strategy(
    strategy: str,
    world_size: int,
    num_nodes: int = 1,
    sharding_strategy: str = "FULL_SHARD",
) -> Strategy | str:
    """Build the Fabric strategy named `strategy` for `world_size` processes over `num_nodes` nodes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto" or world_size == 1 and strategy == "ddp":
        return "auto"
    if strategy == "ddp":
        return DDPStrategy(find_unused_parameters=False)
    if strategy == "fsdp2":
        # Parameters of each Block are sharded over all ranks; the optimizer must be created after setup_module.
        return ModelParallelStrategy(
            parallelize_fn=fsdp2_parallelize, data_parallel_size=world_size, tensor_parallel_size=1
        )
    if sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"--sharding_strategy must be one of {SHARDING_STRATEGIES}, got {sharding_strategy!r}")
    hybrid_mesh = None
    if sharding_strategy == "HYBRID_SHARD":
        # Shard inside a node, replicate across nodes.
        hybrid_mesh = (num_nodes, world_size // num_nodes)
    return FSDPAnyDeviceStrategy(
        auto_wrap_policy={Block},
        sharding_strategy=sharding_strategy,
        state_dict_type="sharded",  # checkpoints are written by lit_gpt.checkpoints, not by the strategy
        use_orig_params=True,
        limit_all_gathers=True,
        hybrid_mesh_shape=hybrid_mesh,
    )
