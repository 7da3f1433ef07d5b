"""Distributed strategies: mixed-precision gradient accumulation (FSDP1, FSDP2), the FSDP2 sharding layouts and a
2-node x 2-process hybrid-sharded run on localhost against one process, resumed on one node."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script
from test_trainer import assert_losses_close, train, train_losses, trainer_args

WORKER = "tests/grad_accumulation_worker.py"


def accumulate(tmp_path, strategy: str, sharding: str, *extra: str) -> dict:
    report = tmp_path / "report.json"
    run_script(WORKER, strategy, sharding, str(report), *extra)
    return json.loads(report.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,sharding",
    # FSDP1 FULL_SHARD accumulates its gradient shard as SHARD_GRAD_OP (the trainer's default) does.
    [("fsdp", "SHARD_GRAD_OP"), ("fsdp", "NO_SHARD"), ("fsdp2", "FULL_SHARD"), ("fsdp2", "NO_SHARD")],
)
def test_bf16_mixed_accumulates_and_reduces_gradients_in_fp32(tmp_path, strategy, sharding):
    # 2 ranks x 4 micro-batches: the accumulated gradient against the exact sum of the same bf16 micro-batch grads.
    report = accumulate(tmp_path, strategy, sharding)
    assert report["forward_param_dtypes"] == ["torch.bfloat16"]  # bf16 compute ...
    assert all(dtypes in ([], ["torch.float32"]) for dtypes in report["grad_dtypes"])  # ... fp32 gradients
    assert report["grad_dtypes"][-1] == ["torch.float32"]
    assert report["gradient_norm"] > 1.0  # a real gradient, not zeros compared with zeros
    assert report["worst_error_ratio"] <= 1.0, report  # within fp32 rounding of the exact sum


@pytest.mark.slow
def test_the_old_configurations_fail_the_same_checks(tmp_path):
    # Lightning's defaults: FSDP1 sums micro-batches in bf16 under no_sync, FSDP2 gathers fp32 parameters.
    fsdp1 = accumulate(tmp_path, "fsdp", "FULL_SHARD", "--legacy")
    assert fsdp1["grad_dtypes"][0] == ["torch.bfloat16"]
    assert fsdp1["worst_error_ratio"] > 100, fsdp1  # bf16 rounding: ~2^12 times the fp32 bound
    fsdp2 = accumulate(tmp_path, "fsdp2", "FULL_SHARD", "--legacy")
    assert fsdp2["forward_param_dtypes"] == ["torch.float32"]


def test_strategy_layouts_and_mixed_precision_settings():
    from lightning.fabric.plugins.precision import FSDPPrecision

    from lit_gpt.distributed import FSDP2Strategy, FSDPAnyDeviceStrategy, make_strategy

    layouts = {s: make_strategy("fsdp2", 4, num_nodes=2, sharding_strategy=s) for s in
               ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")}
    assert all(isinstance(s, FSDP2Strategy) for s in layouts.values())
    assert {s: (x._mesh_shape, x._reshard_after_forward) for s, x in layouts.items()} == {
        "FULL_SHARD": (None, True), "SHARD_GRAD_OP": (None, False), "HYBRID_SHARD": ((2, 2), True),
        "NO_SHARD": ((4, 1), False)}
    assert make_strategy("fsdp", 8, num_nodes=2, sharding_strategy="HYBRID_SHARD")._hybrid_mesh_shape == (2, 4)
    with pytest.raises(ValueError, match="--sharding_strategy"):
        make_strategy("fsdp2", 2, sharding_strategy="ZERO3")

    fsdp = make_strategy("fsdp", 2)
    assert isinstance(fsdp, FSDPAnyDeviceStrategy)
    for precision, (param, reduce, syncs_every_micro_batch) in {
        "bf16-mixed": (torch.bfloat16, torch.float32, True),  # no_sync would sum micro-batches in bf16
        "bf16-true": (torch.bfloat16, torch.bfloat16, False),
        "32-true": (torch.float32, torch.float32, False),
    }.items():
        fsdp.precision = FSDPPrecision(precision)
        mp = fsdp.mixed_precision_config
        assert (mp.param_dtype, mp.reduce_dtype, fsdp.syncs_every_micro_batch) == (param, reduce, syncs_every_micro_batch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_nodes(data: dict, out_dir, **overrides) -> list[str]:
    """2 "nodes" x 2 processes on localhost, each node started with the variables a multi-node launcher sets."""
    args = trainer_args(data, out_dir, num_nodes=2, devices=2, **overrides)
    common = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**common, "NODE_RANK": str(node)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    return logs


@pytest.mark.slow
@pytest.mark.parametrize("strategy,mesh_line", [("fsdp", "FSDP HYBRID_SHARD: mesh replicate=2 x shard=2"),
                                                ("fsdp2", "FSDP2: mesh {'replicate': 2, 'shard': 2}")],
                         ids=["fsdp", "fsdp2"])
def test_hybrid_shard_on_two_nodes_matches_one_process_and_resumes_on_one_node(
        prepared_data, single_process_ten_steps, tmp_path, strategy, mesh_line):
    # Micro batch 1: 2 micro-batches per rank and step, so accumulation crosses the replicate dimension too.
    common = dict(strategy=strategy, sharding_strategy="HYBRID_SHARD", max_steps=10, state_dict_type="sharded")
    logs = train_on_two_nodes(prepared_data, tmp_path, micro_batch_size=1, stop_at_step=5, **common)
    reference = train_losses(single_process_ten_steps)
    assert_losses_close(train_losses(tmp_path), {s: reference[s] for s in range(1, 6)}, 1e-5)
    assert "world_size=4" in logs[0] and mesh_line in logs[0]
    assert (tmp_path / "iter-00000005-ckpt.pth").is_dir()

    out = train(prepared_data, tmp_path, devices=2, micro_batch_size=2, resume="auto", **common)
    assert "written by 4 ranks, now 2" in out.stdout
    assert_losses_close(train_losses(tmp_path), reference, 1e-5)
