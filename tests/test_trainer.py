"""The trainer end to end on CPU: strategies against one process, exact/elastic resume, crash safety, pre-emption,
the LR schedule, non-finite steps and input errors. Every run is a real subprocess of pretrain/tinyllama_fabric.py."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run_script
from test_packed_dataset import write_litpkds

TRAINER = "pretrain/tinyllama_fabric.py"
STEPS = 5


def trainer_args(data: dict, out_dir: Path, **overrides) -> list[str]:
    hp = dict(model_name="micro", out_dir=out_dir, train_data_dir=data["train"], val_data_dir="",
              tokenizer_path=data["tokenizer"], global_batch_size=8, micro_batch_size=2, max_steps=STEPS,
              learning_rate=3e-3, min_lr=3e-4, warmup_steps=2, log_interval=1, eval_interval=0, save_interval=1000,
              accelerator="cpu", devices=1, strategy="auto", precision="32-true", num_workers=0, seed=1234)
    hp.update(overrides)
    return [TRAINER] + [f"--{k}={v}" for k, v in hp.items()]


def train(data: dict, out_dir: Path, check: bool = True, **overrides) -> subprocess.CompletedProcess:
    return run_script(*trainer_args(data, out_dir, **overrides), check=check)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def assert_losses_close(a: dict, b: dict, tol: float) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst <= tol, f"max loss difference {worst:.2e} > {tol:.0e}: {a} vs {b}"


def samples_per_step(out_dir: Path) -> dict[int, list[int]]:
    """The global sample ids of every logged step, in global order, whatever world size trained it."""
    from lit_gpt.datapoints import DatapointLog

    log = DatapointLog(out_dir)
    return {step: log.samples(step).tolist() for step in log.steps}


@pytest.fixture(scope="module")
def single_process(prepared_data, tmp_path_factory) -> Path:
    """The reference: one process, micro batch 4 (= 2 ranks x micro batch 2)."""
    out = tmp_path_factory.mktemp("single")
    train(prepared_data, out, micro_batch_size=4)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,sharding",
    [("fsdp", "FULL_SHARD"), ("fsdp", "SHARD_GRAD_OP"), ("fsdp", "HYBRID_SHARD"), ("fsdp", "NO_SHARD"),
     ("fsdp2", "FULL_SHARD"), ("fsdp2", "SHARD_GRAD_OP"), ("fsdp2", "NO_SHARD"), ("ddp", "FULL_SHARD")],
)
def test_two_ranks_match_one_process(prepared_data, single_process, tmp_path, strategy, sharding):
    train(prepared_data, tmp_path, devices=2, strategy=strategy, sharding_strategy=sharding)
    losses = train_losses(tmp_path)
    assert len(losses) == STEPS
    assert_losses_close(losses, train_losses(single_process), 1e-5)
    # Losses must actually move: a run whose optimizer updates nothing would also "match" step 1.
    assert losses[STEPS] < losses[1] - 0.05


@pytest.mark.slow
def test_exact_resume_matches_uninterrupted(prepared_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(prepared_data, full, max_steps=2 * STEPS, state_dict_type="full")
    train(prepared_data, split, max_steps=2 * STEPS, stop_at_step=STEPS)
    assert (split / f"iter-{STEPS:08d}-ckpt.pth").is_file()
    out = train(prepared_data, split, max_steps=2 * STEPS, resume=split / f"iter-{STEPS:08d}-ckpt.pth")
    assert "Resumed from" in out.stdout
    assert_losses_close(train_losses(split), train_losses(full), 1e-6)
    assert samples_per_step(split) == samples_per_step(full)
    assert sorted(samples_per_step(full)) == list(range(2 * STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("strategy,state_dict_type", [("fsdp", "sharded"), ("ddp", "full")])
def test_elastic_resume_two_ranks_to_one(prepared_data, single_process_ten_steps, tmp_path, strategy,
                                        state_dict_type):
    # The reference is one process (test_two_ranks_match_one_process shows 2 ranks give its losses), shared.
    reference, elastic = single_process_ten_steps, tmp_path / "elastic"
    assert 2 * STEPS == 10
    common = dict(max_steps=2 * STEPS, strategy=strategy, state_dict_type=state_dict_type)
    train(prepared_data, elastic, devices=2, stop_at_step=STEPS, **common)
    ckpt = elastic / f"iter-{STEPS:08d}-ckpt.pth"
    assert ckpt.is_dir() if state_dict_type == "sharded" else ckpt.is_file()
    train(prepared_data, elastic, devices=1, resume="auto", **{**common, "strategy": "auto"})
    assert_losses_close(train_losses(elastic), train_losses(reference), 1e-5)
    assert samples_per_step(elastic) == samples_per_step(reference)
    assert sorted(samples_per_step(reference)) == list(range(2 * STEPS))


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(prepared_data, tmp_path):
    # Kill the process from inside torch.save while it writes the step-4 checkpoint (after the step-2 one).
    wrapper = tmp_path / "crash_on_save.py"
    wrapper.write_text(
        "import os, runpy, signal, sys, torch\n"
        "real_save = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if 'iter-00000004' in str(f):\n"
        "        with open(f, 'wb') as h: h.write(b'partial checkpoint bytes')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_save(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    args = trainer_args(prepared_data, tmp_path / "run", max_steps=6, save_interval=2)
    crashed = run_script(str(wrapper), *args, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    run = tmp_path / "run"
    assert (run / "iter-00000004-ckpt.pth.tmp").exists() and not (run / "iter-00000004-ckpt.pth").exists()
    out = train(prepared_data, run, max_steps=6, save_interval=2, resume="auto")
    assert f"Resumed from {run / 'iter-00000002-ckpt.pth'}" in out.stdout
    assert (run / "iter-00000006-ckpt.pth").is_file()


@pytest.mark.slow
def test_sigusr1_checkpoints_at_next_step_and_exits(prepared_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *trainer_args(prepared_data, out, max_steps=100_000, warmup_steps=10)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    last_logged = max(train_losses(out))
    ckpts = sorted(out.glob("iter-*-ckpt.pth"))
    assert len(ckpts) == 1, log
    step = int(ckpts[0].name[5:13])
    assert last_logged == step and step < 100_000  # saved at the step boundary right after the signal
    assert torch.load(ckpts[0], weights_only=True)["step_count"] == step


@pytest.mark.slow
def test_lr_is_set_per_optimizer_step_not_micro_step(prepared_data, tmp_path):
    # 2 ranks x 2 micro-batches per step: a per-micro-step schedule would advance 2x (LLäMmlein's defect).
    from lit_gpt.schedule import LRSchedule

    train(prepared_data, tmp_path, devices=2, strategy="ddp", global_batch_size=8, micro_batch_size=2,
          warmup_steps=3, max_steps=6)
    lr_at = LRSchedule(learning_rate=3e-3, min_lr=3e-4, warmup_steps=3, max_steps=6)
    records = [r for r in metrics(tmp_path) if "lr" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1), rel=1e-12)
        assert r["iter"] == 2 * r["step"]  # micro-steps per rank


def test_nonfinite_step_is_skipped_on_the_device_and_a_finite_one_is_plain_adamw():
    """The loop queues optimizer.step() before it reads the loss, with `found_inf` telling the fused AdamW to skip."""
    sys.path.insert(0, str(ROOT))
    from pretrain.tinyllama_fabric import TrainConfig, make_optimizer

    defaults = TrainConfig()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    reference.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, defaults)
    twin = dict(zip(model.parameters(), reference.parameters()))
    plain = torch.optim.AdamW([{"params": [twin[p] for p in group["params"]], "weight_decay": group["weight_decay"]}
                               for group in optimizer.param_groups],
                              lr=defaults.learning_rate, betas=(defaults.beta1, defaults.beta2), foreach=False)
    for found_inf in (0.0, 1.0, 0.0):
        for net in (model, reference):
            net.zero_grad()
            net(torch.randn(4, 8, generator=torch.Generator().manual_seed(7))).square().sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        state_before = {k: v.clone() for k, v in optimizer.state[model[0].weight].items()} if found_inf else None
        if found_inf:
            model[0].weight.grad[0, 0] = float("nan")
        optimizer.found_inf = torch.tensor(found_inf)
        optimizer.step()
        if found_inf:  # parameters, moments and the step count stay exactly as they were
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert all(torch.equal(state_before[k], v) for k, v in optimizer.state[model[0].weight].items())
        else:
            plain.step()
            for a, b in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_run_stops(prepared_data, tmp_path):
    # An absurd learning rate blows the weights up after the first update; every later step is non-finite.
    out = train(prepared_data, tmp_path, check=False, learning_rate=1e30, min_lr=1e30, warmup_steps=0,
                grad_clip=0, max_steps=50, max_nonfinite_steps=3, save_interval=1000, keep_last_checkpoints=0)
    assert out.returncode == 1, out.stderr
    assert "3 consecutive non-finite steps; stopping. No checkpoint was written before." in out.stderr
    assert "update skipped: non-finite loss (nan) and gradient norm (nan)" in out.stdout
    skipped = [r["skipped_steps"] for r in metrics(tmp_path) if "skipped_steps" in r]
    assert skipped[-1] == 3
    assert len(skipped) < 50


def test_yaml_config_then_command_line(tmp_path):
    sys.path.insert(0, str(ROOT))
    from pretrain.tinyllama_fabric import InputError, parse_args

    config = tmp_path / "run.yaml"
    # YAML reads 1e-3 as a string and `yes` as a bool: the parser's types convert them.
    config.write_text("learning_rate: 1e-3\nmax_steps: 10\nactivation_checkpointing: yes\nn_layer: 2\n")
    cfg, overrides, _ = parse_args(["--config", str(config), "--max_steps", "20", "--n_embd", "64"])
    assert cfg.learning_rate == 1e-3 and type(cfg.learning_rate) is float
    assert cfg.max_steps == 20 and type(cfg.max_steps) is int and cfg.activation_checkpointing is True  # CLI wins
    assert overrides == {"n_layer": 2, "n_embd": 64} and all(type(v) is int for v in overrides.values())
    name = f"--config {config}: "
    for text, message in [("max_stepz: 3", name + "Option 'max_stepz' is not accepted"),
                          ("max_steps: lots", name + "max_steps: Not of type NonNegativeInt"),
                          ("compile: maybe", name + "compile: Expected a <class 'bool'>"),
                          ("- 1", name + "Unexpected config"),
                          # Values of the wrong shape or an absurd size are one error, never stringified.
                          ("out_dir: [1, 2]", name + "out_dir: Expected a <class 'str'>. Got value: [1, 2]"),
                          ("max_steps: 1e400", name + "max_steps: Not of type NonNegativeInt: inf not an integer"),
                          ("learning_rate: 1e400", "--learning_rate must be a finite number, got inf"),
                          ("1: 2", name + "Key must be a string"),
                          ("n_layer: 0", name + "n_layer must be > 0, got 0")]:
        config.write_text(text + "\n")
        with pytest.raises(InputError, match=re.escape(message)):
            parse_args(["--config", str(config)])


def test_boolean_flags_work_bare_and_with_a_value():
    sys.path.insert(0, str(ROOT))
    from pretrain.tinyllama_fabric import InputError, parse_args

    assert parse_args([])[0].compile is False
    for argv, expected in ((["--compile"], True), (["--compile", "true"], True), (["--compile", "false"], False),
                           (["--compile=no"], False), (["--compile", "--dry_run"], True)):
        assert parse_args(argv)[0].compile is expected, argv
    cfg = parse_args(["--dry_run", "--verify_data", "--document_masking", "yes", "--max_steps", "3"])[0]
    assert (cfg.dry_run, cfg.verify_data, cfg.document_masking, cfg.max_steps) == (True, True, True, 3)
    with pytest.raises(InputError, match=re.escape("--dry_run: Expected a <class 'bool'>. Got value: maybe")):
        parse_args(["--dry_run", "maybe"])


def test_print_config_prints_what_was_set_and_follows_another_model_name(tmp_path):
    """A config printed from a 120M run, fed back with --model_name LLaMmlein_1B, gives the 1B model: nothing the
    model name implies (its dimensions, out_dir) is pinned in the YAML."""
    sys.path.insert(0, str(ROOT))
    from lit_gpt.config import Config
    from pretrain.tinyllama_fabric import resolve

    def resolved(argv):
        cfg, config, printed, _ = resolve(argv)
        return cfg, config, printed

    cfg, config, printed = resolved(["--model_name", "LLaMmlein_120M", "--max_tokens", "1000000", "--n_layer", "12",
                                     "--n_head", "16", "--compile", "--devices", "2"])
    # Set and different from the defaults / the named model: printed; n_layer 12 is the 120M's own: not printed.
    assert yaml.safe_load(printed) == {"model_name": "LLaMmlein_120M", "max_tokens": 1000000, "devices": 2,
                                       "compile": True, "n_head": 16}
    assert (cfg.out_dir, cfg.max_steps) == ("out/LLaMmlein_120M", 1)  # derived, after printing
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(printed)
    again_cfg, again_config, again = resolved(["--config", str(run_yaml)])
    assert again == printed and again_cfg == cfg and again_config == config  # the same run
    big_cfg, big, _ = resolved(["--config", str(run_yaml), "--model_name", "LLaMmlein_1B"])
    assert big == Config.from_name("LLaMmlein_1B", n_head=16)  # the YAML's own override stays, the rest is 1B's
    assert big_cfg.out_dir == "out/LLaMmlein_1B" and big_cfg.compile is True
    assert (big.n_layer, big.n_embd) == (22, 2048)


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(model_name="LLaMmlein_12M"), "--model_name"),
        # Checked after torch is imported (~10 s each): slow; tests/test_fast_guarantees.py checks some in-process.
        pytest.param(dict(train_data_dir="does/not/exist"), "--train_data_dir", marks=pytest.mark.slow),
        pytest.param(dict(train_data_dir="EMPTY"), "--train_data_dir", marks=pytest.mark.slow),
        pytest.param(dict(n_embd=64, vocab_size=256), "--tokenizer_path", marks=pytest.mark.slow),
        pytest.param(dict(out_dir="FILE/sub"), "--out_dir", marks=pytest.mark.slow),
        pytest.param(dict(global_batch_size=8, micro_batch_size=3), "--micro_batch_size", marks=pytest.mark.slow),
        # Edge values that crashed mid-run (step % 0), logged a val loss of 0 or trained silently wrong.
        (dict(save_interval=0), "--save_interval"),
        (dict(log_interval=0), "--log_interval"),
        (dict(eval_iters=0, val_data_dir="VAL"), "--eval_iters"),
        (dict(max_nonfinite_steps=0), "--max_nonfinite_steps"),
        (dict(max_steps=-1), "--max_steps"),
        (dict(min_lr=1e-2), "--learning_rate"),
        (dict(lr_schedule="wsd", decay_fraction=1.5), "--decay_fraction"),
        (dict(num_workers=-1), "--num_workers"),
        (dict(train_data_weights="0.7,0.3"), "--train_data_weights"),
        (dict(precision="16-mixed"), "--precision"),
        # fails inside the launched run: nothing may stay behind
        pytest.param(dict(init_from="TOKFILE"), "--init_from", marks=pytest.mark.slow),
        (dict(devices=0), "--devices"),
        (dict(devices=-1), "--devices"),
        (dict(learning_rate="inf"), "--learning_rate"),
        (dict(block_size=0), "--block_size"),
        (dict(meta_init="yes"), "--meta_init"),
        # Tracebacks after ~40 s, a wait without end, a run on one padded sample (issue 22).
        (dict(seed=-1), "--seed"),
        (dict(seed=99999999999999), "--seed"),
        (dict(num_nodes=2), "--num_nodes"),
        (dict(block_size=129), "--block_size"),  # above micro's 128
        (dict(out_dir="LOOP"), "--out_dir"),
        (dict(out_dir="LOOP/run"), "--out_dir"),
        (dict(resume="HFDIR"), "--resume"),
        (dict(val_data_dir="TINY"), "--block_size 128"),  # a split of 50 tokens: not one sample of 129
    ],
)
def test_bad_inputs_fail_before_training(prepared_data, tmp_path, overrides, flag):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "hf").mkdir()  # an exported model
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "tiny").mkdir()
    write_litpkds(tmp_path / "tiny" / "val_0000000000.bin", range(3, 53))
    places = {"EMPTY": empty, "FILE": tmp_path / "file", "VAL": prepared_data["val"],
              "TOKFILE": prepared_data["tokenizer"] / "tokenizer.model", "HFDIR": tmp_path / "hf",
              "TINY": tmp_path / "tiny"}
    overrides = {k: places.get(str(v), str(v).replace("FILE", str(tmp_path / "file"))
                               .replace("LOOP", str(tmp_path / "loop"))) for k, v in overrides.items()}
    out_dir = Path(overrides.pop("out_dir", tmp_path / "out"))
    launcher_free = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
                     and k not in ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *trainer_args(prepared_data, out_dir, **overrides)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**launcher_free, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "no checksums" not in result.stderr
    assert time.perf_counter() - start < 120  # before training (a multi-node run without a launcher waited forever)
    assert not out_dir.exists(), list(out_dir.rglob("*"))  # a failed start leaves no (empty) out_dir behind


@pytest.mark.slow
def test_fresh_run_refuses_an_out_dir_with_checkpoints(prepared_data, tmp_path):
    old = tmp_path / "iter-00000002-ckpt.pth"
    old.write_bytes(b"an earlier run's checkpoint")
    result = train(prepared_data, tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert "error: --out_dir" in result.stderr and "--resume auto" in result.stderr
    assert old.read_bytes() == b"an earlier run's checkpoint" and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resume_into_another_model_or_data_is_one_clear_error(prepared_data, tmp_path):
    train(prepared_data, tmp_path, max_steps=4, stop_at_step=2)
    ckpt = tmp_path / "iter-00000002-ckpt.pth"
    for overrides, flag in [(dict(n_layer=3), "--resume"), (dict(train_data_dir=prepared_data["val"]), "--train_data_dir")]:
        result = train(prepared_data, tmp_path, check=False, max_steps=4, resume=ckpt, **overrides)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {flag}"), result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.glob("iter-*")) == [ckpt.name]  # nothing written, nothing lost


@pytest.mark.slow
def test_loader_workers_node_cache_and_activation_checkpointing_change_no_number(prepared_data, tmp_path):
    plain, options = tmp_path / "plain", tmp_path / "options"
    train(prepared_data, plain, max_steps=3)
    train(prepared_data, options, max_steps=3, num_workers=2, cache_dir=tmp_path / "cache", cache_max_gb=1,
          activation_checkpointing="true")
    assert_losses_close(train_losses(options), train_losses(plain), 0.0)
    assert list((tmp_path / "cache").rglob("*.bin"))  # the node-local cache was filled and read


@pytest.mark.slow
def test_document_masked_loss_equals_an_in_process_reference(prepared_data, tmp_path):
    # The trainer's first logged loss, recomputed here from the same initial weights and the same samples.
    from lightning.fabric.utilities.seed import seed_everything

    from lit_gpt.config import Config
    from lit_gpt.loss import token_losses
    from lit_gpt.model import GPT
    from lit_gpt.packed_dataset import PackedDataset, StepLoader

    train(prepared_data, tmp_path, max_steps=1, document_masking="true", z_loss=1e-3)
    logged = train_losses(tmp_path)[1]

    seed_everything(1234)
    model = GPT(Config.from_name("micro"))
    data = PackedDataset([prepared_data["train"]], block_size=model.config.block_size, seed=1234, with_doc_ids=True)
    _, micro_batches = next(iter(StepLoader(data, global_batch_size=8, micro_batch_size=2)))
    assert any(len(mb["doc_ids"].unique()) > 1 for mb in micro_batches)  # documents are packed together
    with torch.no_grad():
        def loss(masked: bool) -> float:
            total = sum(token_losses(model(mb["input_ids"], doc_ids=mb["doc_ids"] if masked else None), mb["labels"],
                                     0.0)[0] for mb in micro_batches)
            return (total / sum((mb["labels"] != -100).sum() for mb in micro_batches)).item()

        assert logged == pytest.approx(loss(masked=True), abs=1e-5)  # the logged loss is the CE, without z-loss
        assert abs(logged - loss(masked=False)) > 1e-4  # and the mask matters


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_track_fp32(prepared_data, single_process, tmp_path, precision):
    train(prepared_data, tmp_path, micro_batch_size=4, precision=precision)
    losses, reference = train_losses(tmp_path), train_losses(single_process)
    assert sorted(losses) == sorted(reference)
    assert max(abs(losses[s] - reference[s]) for s in losses) < 0.05  # bf16 rounding, not a different computation
    assert losses != reference  # and bf16 really was used


@pytest.mark.slow
def test_resume_past_stop_at_step_is_one_clear_error(prepared_data, tmp_path):
    # Before: `step == stop_at_step` never held again and the job silently trained on to max_steps.
    train(prepared_data, tmp_path, stop_at_step=2)
    result = train(prepared_data, tmp_path, check=False, stop_at_step=2, resume="auto")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --stop_at_step 2"), result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("iter-*")) == ["iter-00000002-ckpt.pth"]
    assert max(train_losses(tmp_path)) == 2


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(prepared_data, tmp_path):
    # Resuming at step 2 replaces the continuation that wrote steps 4 and 6; a later `--resume auto` (a pre-empted,
    # requeued job) must continue this run (step 3), not jump to the abandoned step-6 checkpoint.
    train(prepared_data, tmp_path, max_steps=6, save_interval=2)
    train(prepared_data, tmp_path, max_steps=6, save_interval=2, stop_at_step=3, learning_rate=1e-3,
          resume=tmp_path / "iter-00000002-ckpt.pth")
    out = train(prepared_data, tmp_path, max_steps=6, save_interval=2, learning_rate=1e-3, resume="auto")
    assert f"Resumed from {tmp_path / 'iter-00000003-ckpt.pth'}" in out.stdout
    assert (tmp_path / "iter-00000006-ckpt.pth.abandoned").is_file()


@pytest.mark.slow
def test_tensorboard_after_resume_holds_each_step_once(prepared_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(prepared_data, tmp_path, save_interval=2)
    train(prepared_data, tmp_path, save_interval=2, learning_rate=1e-3, resume=tmp_path / "iter-00000002-ckpt.pth")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert [e.step for e in events.Scalars("loss")] == list(range(1, STEPS + 1))  # steps 3-5 once, not twice
    assert logged == pytest.approx(train_losses(tmp_path))  # and the resumed run's values (other LR), as in metrics


@pytest.mark.slow
def test_preemption_signal_during_setup_checkpoints_instead_of_killing(prepared_data, tmp_path):
    # SIGUSR1 (Slurm's warning) while the model is being set up: the default action would kill the job unsaved.
    wrapper = tmp_path / "signal_in_setup.py"
    wrapper.write_text(
        "import os, runpy, signal, sys\n"
        "import lightning.fabric\n"
        "real = lightning.fabric.Fabric.setup_module\n"
        "def setup_module(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    return real(self, *a, **k)\n"
        "lightning.fabric.Fabric.setup_module = setup_module\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = run_script(str(wrapper), *trainer_args(prepared_data, tmp_path / "run"), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Stopped at step 1" in out.stdout
    assert [p.name for p in (tmp_path / "run").glob("iter-*")] == ["iter-00000001-ckpt.pth"]


@pytest.mark.slow
def test_validation_loss_is_the_same_on_one_and_two_ranks(prepared_data, tmp_path):
    # eval_iters batches of global_batch_size samples: the same samples (and loss) whatever the world size.
    # More eval_iters than the split holds: all of it, said once.
    common = dict(val_data_dir=prepared_data["val"], max_steps=2, eval_interval=1, eval_iters=1000)
    one = train(prepared_data, tmp_path / "one", **common)  # micro batch 2 on 1 rank, 2 x 2 on 2 ranks
    assert one.stdout.count("--eval_iters 1000: the validation split holds ") == 1
    train(prepared_data, tmp_path / "two", devices=2, strategy="ddp", **common)
    val = {run: {r["step"]: r["val_loss"] for r in metrics(tmp_path / run) if "val_loss" in r} for run in ("one", "two")}
    assert sorted(val["one"]) == [0, 1, 2]
    assert val["one"] == pytest.approx(val["two"], abs=1e-6)


def test_every_flag_is_documented_and_its_choices_match_the_code():
    """--help has a description for every flag, and the choices of the annotations are the ones the code accepts."""
    sys.path.insert(0, str(ROOT))
    import typing

    from lit_gpt.config import ATTN_IMPLS
    from lit_gpt.distributed import SHARDING_STRATEGIES, STRATEGIES
    from pretrain.tinyllama_fabric import MODEL_FIELDS, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert set(typing.get_args(hints["attn_impl"])) == set(ATTN_IMPLS)
    assert set(typing.get_args(hints["strategy"])) == set(STRATEGIES)
    assert set(typing.get_args(hints["sharding_strategy"])) == set(SHARDING_STRATEGIES)
    help_text = run_script(TRAINER, "--help").stdout
    flags = re.findall(r"^  (--\w+)(?: (\S+))?\s*(.*)$", help_text, flags=re.M)
    documented = {flag for flag, _, text in flags}
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert documented >= {f"--{name}" for name in [*names, *MODEL_FIELDS, "config", "print_config"]}
    for f in [*dataclasses.fields(TrainConfig), *(f for _, f in MODEL_FIELDS.values())]:
        assert len(f.metadata["help"].split()) >= 2, f"--{f.name} has no description"
