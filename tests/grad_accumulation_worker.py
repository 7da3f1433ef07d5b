"""Gradient accumulation of one optimizer step under a Fabric strategy, on 2 CPU ranks (run by test_distributed.py).

usage: grad_accumulation_worker.py STRATEGY SHARDING OUT.json [--legacy]

Each rank accumulates MICRO_BATCHES micro-batches the way the trainer does (`fabric.no_backward_sync` on all but the
last). The reference is the exact (fp64) sum of the very same bf16-computed micro-batch gradients, each taken in a
separate synced backward in which only one rank contributes (the others multiply their loss by 0, so the reduced
gradient is that rank's bf16 gradient, scaled exactly by 1/world size). Any difference between the two is therefore
rounding of the accumulation and reduction, which fp32 keeps below (terms - 1) * 2^-24 * sum|terms| per element.

Rank 0 writes a JSON report: the parameter dtypes seen in forward, the gradient dtypes after each micro-batch and
the worst ratio of the accumulation error to that fp32 bound. `--legacy` builds the configuration before the fix
(Lightning's bf16 reduce and `no_sync` for FSDP1; no mixed-precision policy for FSDP2), which must fail.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402

from lit_gpt.config import Config  # noqa: E402
from lit_gpt.distributed import make_strategy  # noqa: E402
from lit_gpt.model import GPT, Block  # noqa: E402

MICRO_BATCHES, WORLD_SIZE, MICRO_BATCH_SIZE = 4, 2, 2
FP32_UNIT_ROUNDOFF = 2.0**-24


def legacy_strategy(kind: str, sharding: str):
    """The configuration before the fix: Lightning's bf16 reduce and always `no_sync` (FSDP1); FSDP2 sharded over
    all ranks without a mixed-precision policy."""
    from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy
    from lightning.fabric.strategies.fsdp import _FSDPBackwardSyncControl

    from lit_gpt.distributed import FSDPAnyDeviceStrategy, fsdp2_parallelize

    if kind == "fsdp":
        class LightningMixedPrecision(FSDPAnyDeviceStrategy):
            mixed_precision_config = FSDPStrategy.mixed_precision_config

            def __init__(self, **kwargs) -> None:
                super().__init__(**kwargs)
                self._backward_sync_control = _FSDPBackwardSyncControl()

        return LightningMixedPrecision(auto_wrap_policy={Block}, sharding_strategy=sharding, use_orig_params=True)
    return ModelParallelStrategy(parallelize_fn=lambda module, mesh: fsdp2_parallelize(module, mesh["data_parallel"]),
                                 data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)


def full_gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole (reduced) gradient in fp64, on every rank (collective)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(module, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(module, with_grads=True):
            return {n: p.grad.double().clone() for n, p in module.named_parameters()}
    return {n: p.grad.full_tensor().double() for n, p in module.named_parameters()}


def main() -> None:
    kind, sharding, out = sys.argv[1:4]
    legacy = "--legacy" in sys.argv
    strategy = legacy_strategy(kind, sharding) if legacy else make_strategy(kind, WORLD_SIZE, sharding_strategy=sharding)
    fabric = Fabric(accelerator="cpu", devices=WORLD_SIZE, precision="bf16-mixed", strategy=strategy)
    fabric.launch()
    fabric.seed_everything(1234)
    config = Config.from_name("micro")
    model = fabric.setup_module(GPT(config))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.0))
    module = model._forward_module

    forward_dtypes = set()
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Embedding)):
            layer.register_forward_pre_hook(lambda m, _: forward_dtypes.add(str(m.weight.dtype)))

    generator = torch.Generator().manual_seed(100 + fabric.global_rank)  # different data on each rank
    tokens = torch.randint(0, config.vocab_size, (MICRO_BATCHES, MICRO_BATCH_SIZE, config.block_size + 1),
                           generator=generator)

    def backward(m: int, weight: float) -> None:
        logits = model(tokens[m, :, :-1])
        fabric.backward(weight * F.cross_entropy(logits.float().flatten(0, 1), tokens[m, :, 1:].flatten()))

    grad_dtypes = []
    for m in range(MICRO_BATCHES):
        with fabric.no_backward_sync(model, enabled=m < MICRO_BATCHES - 1):
            backward(m, 1.0)
        grad_dtypes.append(sorted({str(p.grad.dtype) for p in module.parameters() if p.grad is not None}))
    accumulated = full_gradients(module)
    optimizer.zero_grad(set_to_none=True)

    exact = {n: torch.zeros_like(g) for n, g in accumulated.items()}
    magnitude = {n: torch.zeros_like(g) for n, g in accumulated.items()}
    for rank in range(WORLD_SIZE):
        for m in range(MICRO_BATCHES):
            with fabric.no_backward_sync(model, enabled=False):  # synced
                backward(m, float(fabric.global_rank == rank))
            for n, g in full_gradients(module).items():
                exact[n] += g
                magnitude[n] += g.abs()
            optimizer.zero_grad(set_to_none=True)

    bound = (WORLD_SIZE * MICRO_BATCHES - 1) * FP32_UNIT_ROUNDOFF
    worst = max(((accumulated[n] - exact[n]).abs() / (bound * magnitude[n]).clamp(min=1e-30)).max().item()
                for n in exact)
    if fabric.global_rank == 0:
        Path(out).write_text(json.dumps({
            "forward_param_dtypes": sorted(forward_dtypes), "grad_dtypes": grad_dtypes, "worst_error_ratio": worst,
            "gradient_norm": sum(g.pow(2).sum() for g in exact.values()).sqrt().item(),
        }))


if __name__ == "__main__":
    main()
