"""lit_gpt.memory_estimate and --dry_run against independent references: the model's own parameters, the tensors
autograd saves (counted through saved_tensors_hooks), the peak memory of real training steps on the CPU (the process's
resident memory above the one before the model was built, tests/memory_probe.py) and hand-computed figures."""
import shutil
from dataclasses import replace

import pytest
import torch
from memory_probe import measure

from lit_gpt.attention import DocumentMask
from lit_gpt.config import Config, name_to_config
from lit_gpt.memory_estimate import (
    GiB,
    ParameterCounts,
    TrainingSetup,
    activation_bytes,
    estimate_memory,
    largest_micro_batch,
)
from lit_gpt.model import GPT, num_parameters

# The acceptance bound for the whole-step peak on a CPU. fp32 on one process is tighter (measured within 2 %);
# bf16 on a CPU adds oneDNN's own buffers, outside torch's tensors.
CPU_TOLERANCE, FP32_TOLERANCE = 0.20, 0.10


@pytest.mark.parametrize("name", sorted(name_to_config))
def test_parameter_counts_match_the_model(name):
    config = Config.from_name(name)
    with torch.device("meta"):
        model = GPT(config)
    counts = ParameterCounts.of(config)
    assert counts.total == num_parameters(model)
    assert counts.linear == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    block = model.transformer.h[0]
    assert counts.block == num_parameters(block)
    assert counts.block_linear == sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert counts.root == sum(num_parameters(m) for m in (model.transformer.wte, model.transformer.ln_f, model.lm_head))


def saved_bytes(model: GPT, idx: torch.Tensor, precision: str, doc_mask=None) -> int:
    """Bytes of the distinct storages autograd saves for backward during a forward pass, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
            model(idx, doc_mask=doc_mask)
    return sum(storages.values())


CASES = {  # name: (precision, attention, activation checkpointing, key/value heads, document masking)
    "fp32": ("32-true", "sdpa", False, 2, False),
    "bf16_mixed": ("bf16-mixed", "sdpa", False, 2, False),
    "bf16_true": ("bf16-true", "sdpa", False, 2, False),
    "mha": ("32-true", "sdpa", False, 4, False),
    "eager_fp32": ("32-true", "eager", False, 2, False),
    "eager_bf16_mixed": ("bf16-mixed", "eager", False, 2, False),
    "checkpointing": ("bf16-mixed", "sdpa", True, 2, False),
    "document_masking": ("bf16-mixed", "sdpa", False, 2, True),
}


@pytest.mark.parametrize("case", CASES)
def test_activation_model_counts_what_autograd_saves(case):
    precision, impl, checkpointing, kv_heads, masking = CASES[case]
    config = Config.from_name("micro", n_layer=3, n_embd=128, n_head=4, n_query_groups=kv_heads, block_size=96,
                              intermediate_size=320, vocab_size=1000, attn_impl=impl)
    torch.manual_seed(0)
    model = GPT(config)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    model.activation_checkpointing = checkpointing
    B = 3
    idx = torch.randint(0, config.vocab_size, (B, config.block_size))
    doc_mask = DocumentMask.from_doc_ids(torch.arange(config.block_size).div(40, rounding_mode="floor")
                                         .expand(B, -1)) if masking else None
    measured = saved_bytes(model, idx, precision, doc_mask)

    setup = TrainingSetup(config, B, precision=precision, activation_checkpointing=checkpointing, attn_impl=impl,
                          document_masking=masking, device_type="cpu")
    # Autocast's bf16 weight casts are saved too: the estimate counts them as compute copies.
    expected = activation_bytes(setup) + estimate_memory(setup).components.get("compute copies", 0)
    if checkpointing:  # saved in forward: the last Block's cast is made again only when it is recomputed
        expected -= ParameterCounts.of(config).block_linear * 2
    # Not modelled: the RMSNorm scales ([tokens, 1] fp32) and the RoPE tables, shared by all layers (~1 %).
    assert expected <= measured <= expected * 1.03, (measured, expected)


def test_sharding_and_precision_rules_by_hand():
    config = Config.from_name("LLaMmlein_1B")
    N, p = 1_100_310_528, ParameterCounts.of(config)
    one = TrainingSetup(config, 4, micro_batches=2, precision="bf16-mixed", device_type="cpu")
    full = replace(one, strategy="fsdp", sharding_strategy="FULL_SHARD", world_size=16, devices_per_node=4)
    grad_op = replace(full, sharding_strategy="SHARD_GRAD_OP")
    hybrid = replace(full, sharding_strategy="HYBRID_SHARD")
    ddp = replace(one, strategy="ddp", world_size=16, devices_per_node=4)
    c = {name: estimate_memory(s).components for name, s in
         dict(one=one, full=full, grad_op=grad_op, hybrid=hybrid, ddp=ddp,
              fsdp2=replace(full, strategy="fsdp2"), fsdp1_fp32=replace(full, precision="32-true")).items()}
    assert c["one"]["parameters"] == 4 * N and c["one"]["optimizer state"] == 8 * N
    assert c["one"]["compute copies"] == 2 * p.linear  # autocast: every matmul weight in bf16
    assert c["one"]["gradients"] == 4 * N  # accumulated over the 2 micro-batches
    assert c["full"]["parameters"] == 4 * N // 16 and c["hybrid"]["parameters"] == 4 * N // 4
    assert c["full"]["compute copies"] == 2 * (p.root + 2 * p.block)  # root unit + current and prefetched Block
    assert c["grad_op"]["compute copies"] == 2 * N  # everything gathered from forward to backward
    assert c["full"]["gradients"] == 4 * N // 16  # FSDP1 bf16-mixed: reduce-scattered every micro-batch
    assert c["fsdp2"]["unsharded gradients"] == 4 * N and c["fsdp1_fp32"]["unsharded gradients"] == 4 * N
    assert c["ddp"]["gradient buckets (DDP)"] == 4 * N
    # activations grow linearly with the micro batch (no masks: nothing of fixed size)
    twice = estimate_memory(replace(full, micro_batch_size=8)).components
    assert twice["activations"] == 2 * c["full"]["activations"]
    assert c["full"]["activations"] == activation_bytes(full)


def test_largest_micro_batch_is_the_last_that_fits():
    setup = TrainingSetup(Config.from_name("LLaMmlein_1B"), 1, strategy="fsdp", sharding_strategy="FULL_SHARD",
                          world_size=8, devices_per_node=8)
    budget = 40 * GiB
    largest = largest_micro_batch(setup, budget)
    assert 1 < largest < 64
    assert estimate_memory(replace(setup, micro_batch_size=largest)).total <= budget
    assert estimate_memory(replace(setup, micro_batch_size=largest + 1)).total > budget
    assert largest_micro_batch(setup, budget, divides=64) == max(b for b in (1, 2, 4, 8, 16, 32) if b <= largest)
    assert largest_micro_batch(setup, 1 * GiB) == 0  # not even the model states fit
    assert largest_micro_batch(replace(setup, activation_checkpointing=True), budget) > 2 * largest


# ------------------------------------------------------------------ against real training steps on the CPU
def estimate_for(spec: dict):
    config = Config.from_name(spec["model_name"], **spec.get("overrides", {}))
    devices = spec.get("devices", 1)
    return estimate_memory(TrainingSetup(
        config, spec["micro_batch_size"], spec.get("micro_batches", 1), spec["precision"], spec.get("strategy", "auto"),
        spec.get("sharding_strategy", "FULL_SHARD"), devices, devices, spec.get("activation_checkpointing", False),
        device_type="cpu"))


def check_against_cpu(specs: list[dict], tmp_path, tolerance: float = CPU_TOLERANCE) -> None:
    for spec, measured in zip(specs, measure(specs, tmp_path)):
        estimate = estimate_for(spec)
        ratio = estimate.allocated / measured["peak"]
        assert abs(ratio - 1) <= tolerance, (
            f"{spec}: estimate {estimate.allocated / 2**20:.1f} MiB ({estimate.phase}), measured "
            f"{measured['peak'] / 2**20:.1f} MiB {measured['phases']}")


@pytest.mark.slow
def test_estimate_matches_the_peak_of_cpu_training(tmp_path):
    # Two model sizes (5M and 25M parameters), in fp32 on one process.
    check_against_cpu([dict(model_name="demo_5M", micro_batch_size=4, precision="32-true"),
                       dict(model_name="demo_25M", micro_batch_size=1, precision="32-true")], tmp_path, FP32_TOLERANCE)


@pytest.mark.slow
def test_estimate_matches_the_peak_of_cpu_training_in_other_setups(tmp_path):
    check_against_cpu([
        dict(model_name="demo_5M", micro_batch_size=2, precision="bf16-mixed", overrides={"block_size": 128}),
        dict(model_name="demo_25M", micro_batch_size=1, precision="32-true", activation_checkpointing=True,
             overrides={"block_size": 256}),
        dict(model_name="demo_5M", micro_batch_size=1, micro_batches=2, precision="32-true",
             overrides={"block_size": 128}),
    ], tmp_path)


@pytest.mark.slow
def test_estimate_matches_the_peak_of_fsdp_training_on_two_cpu_ranks(tmp_path):
    # The trainer's default: FSDP1 SHARD_GRAD_OP (all bf16 parameters gathered from forward to backward), bf16-mixed
    # (fp32 gradient shards reduce-scattered after every micro-batch), gradient accumulation.
    check_against_cpu([dict(model_name="demo_5M", micro_batch_size=2, micro_batches=2, precision="bf16-mixed",
                            devices=2, strategy="fsdp", sharding_strategy="SHARD_GRAD_OP",
                            overrides={"block_size": 128})], tmp_path)


# ------------------------------------------------------------------ --dry_run
def dry_run(prepared_data, tmp_path, *extra: str) -> int:
    from pretrain.tinyllama_fabric import main

    return main(["--model_name", "micro", "--train_data_dir", str(prepared_data["train"]),
                 "--val_data_dir", str(prepared_data["val"]), "--tokenizer_path", str(prepared_data["tokenizer"]),
                 "--out_dir", str(tmp_path / "out"), "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp",
                 "--sharding_strategy", "FULL_SHARD", "--global_batch_size", "16", "--micro_batch_size", "4",
                 "--dry_run", "true", *extra])


def test_dry_run_reports_and_writes_nothing(prepared_data, tmp_path, capsys):
    assert dry_run(prepared_data, tmp_path, "--max_steps", "10000000000", "--gpu_memory_gb", "0.05") == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    config = Config.from_name("micro")
    setup = TrainingSetup(config, 4, micro_batches=2, strategy="fsdp", sharding_strategy="FULL_SHARD", world_size=2,
                          devices_per_node=2, device_type="cpu")
    estimate = estimate_memory(setup)
    assert f"micro: {num_parameters(GPT(config)):,} parameters" in out
    assert "16 samples x 128 tokens = 2,048 tokens per step; 2 ranks (1 node x 2) x 2 micro-batches of 4" in out
    assert f"{estimate.allocated / 2**20:.1f} MiB" in out and "DOES NOT FIT" not in out
    largest = largest_micro_batch(setup, 0.05 * GiB)
    assert f"largest micro batch   {largest:,} within 0.05 GiB; 8 of those that divide the 8 samples" in out
    # Wall time by hand: 6 N (without the embedding) + 12 L H Q T FLOPs per token at 40 % of an H100's 989 TFLOP/s.
    n_matmul = num_parameters(GPT(config)) - config.padded_vocab_size * config.n_embd
    flops = 1e10 * 16 * 128 * (6 * n_matmul + 12 * 2 * 4 * 16 * 128)
    assert f"{flops / (0.4 * 989e12 * 2) / 3600:.1f} h at 40% MFU on 2 x H100 SXM" in out


def test_dry_run_exits_1_when_the_run_does_not_fit(prepared_data, tmp_path, capsys):
    """Scripts gate on the exit code; `--dry_run` works as a bare switch."""
    setup = TrainingSetup(Config.from_name("micro"), 4, micro_batches=2, strategy="fsdp",
                          sharding_strategy="FULL_SHARD", world_size=2, devices_per_node=2, device_type="cpu")
    needed = estimate_memory(setup).total / GiB
    assert dry_run(prepared_data, tmp_path, "--dry_run", "--gpu_memory_gb", f"{needed * 0.99}") == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and not (tmp_path / "out").exists()
    assert captured.err.strip().splitlines() == [
        f"error: the run needs {needed * 2**10:.1f} MiB per process, more than --gpu_memory_gb {needed * 0.99:g}"]
    assert dry_run(prepared_data, tmp_path, "--dry_run", "--gpu_memory_gb", f"{needed * 1.01}") == 0
    assert "DOES NOT FIT" not in capsys.readouterr().out


def test_dry_run_checks_the_data_paths_before_torch(tmp_path):
    """A missing data directory is reported before torch, the tokenizer or any dataset is touched."""
    from conftest import run_script

    result = run_script("-c", "import sys, runpy\n"
                        "class NoTorch:\n"
                        "    def find_spec(self, name, path=None, target=None):\n"
                        "        if name.split('.')[0] == 'torch': raise ImportError('torch imported')\n"
                        "sys.meta_path.insert(0, NoTorch())\n"
                        "sys.argv = sys.argv[1:]\n"
                        "runpy.run_path(sys.argv[0], run_name='__main__')\n",
                        "pretrain/tinyllama_fabric.py", "--dry_run", "--model_name", "micro",
                        "--train_data_dir", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --train_data_dir {tmp_path / 'nope'}: directory does not exist"


def test_dry_run_still_checks_the_data(prepared_data, tmp_path, capsys):
    # A damaged manifest passes check_inputs (the chunk files are there) and is found when the dataset is opened.
    train = tmp_path / "train"
    shutil.copytree(prepared_data["train"], train)
    (train / "manifest.json").write_text("{")
    assert dry_run({**prepared_data, "train": train}, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --train_data_dir") and "unreadable dataset manifest" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_dry_run_verifies_the_checkpoint_to_resume(prepared_data, tmp_path, capsys):
    damaged = tmp_path / "iter-00000010-ckpt.pth"
    damaged.write_bytes(b"not a checkpoint")
    assert dry_run(prepared_data, tmp_path, "--resume", str(damaged)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: {damaged}") and "Traceback" not in err
