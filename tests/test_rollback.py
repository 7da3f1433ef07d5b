"""Loss-spike rollback and goodput, in-process: the detector's arithmetic and its checkpointed state, the training
step -> data step mapping and StepLoader positions with skips, the rollback plan, its records (datapoint log,
metrics.jsonl) across resumes and rollbacks, and the goodput accounting."""
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from test_kill_resume import KILLER, killed_run, records
from test_packed_dataset import write_litpkds
from test_trainer import assert_losses_close, metrics, samples_per_step, train, train_losses

from lit_gpt.data_skips import DataSkips
from lit_gpt.datapoints import DatapointLogger, read_skipped
from lit_gpt.goodput import Goodput
from lit_gpt.litpkds import HEADER_SIZE
from lit_gpt.metrics_log import MetricsLog
from lit_gpt.packed_dataset import PackedDataset, StepLoader
from lit_gpt.rollback import Rollbacks, keeps_rollbacks_to, rollback_record, samples_of_data_steps
from lit_gpt.spikes import Spike, SpikeDetector

DEMO_LOSSES = Path(__file__).parent / "data" / "demo_losses.json"


# ------------------------------------------------------------------ the detector
def test_detector_fires_exactly_above_mean_plus_k_std_once_the_window_is_full():
    detector = SpikeDetector(window=4, sigma=2.0, max_nonfinite=3)
    for step, loss in enumerate([5.0, 4.0, 6.0, 5.0], 1):  # filling the window: never a spike, however high
        assert detector.observe(step, loss * (10 if step == 2 else 1), True) is None
    window = np.array([5.0, 40.0, 6.0, 5.0])
    mean, std = window.mean(), window.std()  # numpy's population std as the reference
    assert detector.statistics() == pytest.approx((mean, std))
    assert detector.observe(5, mean + 2 * std - 1e-9, True) is None  # just below the threshold: enters the window
    window = np.array([40.0, 6.0, 5.0, mean + 2 * std - 1e-9])
    threshold = window.mean() + 2 * window.std()
    spike = detector.observe(6, threshold + 1e-6, True)
    assert spike == Spike(6, threshold + 1e-6, pytest.approx(window.mean()), pytest.approx(window.std()), 0)
    assert list(detector.losses) == pytest.approx(window.tolist())  # the spike's loss stays out of the window
    assert "loss spike at step 6" in spike.describe() and "2.0 standard deviations" in spike.describe()


def test_detector_counts_nonfinite_steps_in_a_row():
    detector = SpikeDetector(window=3, sigma=3.0, max_nonfinite=2)
    assert detector.observe(1, math.nan, False) is None
    assert detector.observe(2, 1.0, True) is None  # a finite step ends the run of non-finite ones
    assert detector.observe(3, math.inf, False) is None
    spike = detector.observe(4, math.nan, False)
    assert spike.nonfinite_in_a_row == 2 and spike.step == 4 and "2 consecutive non-finite steps" in spike.describe()
    assert json.dumps(spike.record(), allow_nan=False)  # metrics.jsonl holds no NaN
    assert list(detector.losses) == [1.0]


def test_detector_state_replays_the_same_decisions():
    rng = random.Random(0)
    losses = [10 * math.exp(-i / 30) + rng.gauss(0, 0.05) + (3 if i in (70, 140) else 0) for i in range(200)]
    finite = [i not in (90, 91) for i in range(200)]

    def decide(detector, start):
        return [(i, s.step) for i in range(start, 200) if (s := detector.observe(i + 1, losses[i], finite[i]))]

    reference = SpikeDetector(20, 4.0, 5)
    expected = decide(reference, 0)
    assert [step for _, step in expected] == [71, 141]
    for cut in (25, 71, 91, 150):  # a run stopped after step `cut` and resumed from its state
        first = SpikeDetector(20, 4.0, 5)
        for i in range(cut):
            first.observe(i + 1, losses[i], finite[i])
        state = json.loads(json.dumps(first.state_dict()))  # plain values, as a weights_only checkpoint holds them
        resumed = SpikeDetector(20, 4.0, 5)
        resumed.load_state_dict(state)
        assert decide(resumed, cut) == [d for d in expected if d[0] >= cut]


def test_defaults_never_fire_on_the_demo_run():
    """The demo's healthy run replayed through the default detector: data/demo_losses.json holds every step's loss of
    scripts/demo.sh's training (fortunes-de, demo_5M, 250 steps on CPU) run with --log_interval 1."""
    from pretrain.tinyllama_fabric import TrainConfig

    cfg = TrainConfig()
    losses = json.loads(DEMO_LOSSES.read_text())
    assert len(losses) == 250 and losses[-1] < losses[0] - 3  # the falling curve, not a placeholder
    detector = SpikeDetector(cfg.spike_window, cfg.spike_sigma, cfg.max_nonfinite_steps)
    fired = [s for i, loss in enumerate(losses) if (s := detector.observe(i + 1, loss, True))]
    assert fired == []
    # and a jump of the size a poisoned batch gives is found on the same curve
    detector = SpikeDetector(cfg.spike_window, cfg.spike_sigma, cfg.max_nonfinite_steps)
    poisoned = losses[:200] + [losses[199] + 2.0]
    assert [s.step for i, loss in enumerate(poisoned) if (s := detector.observe(i + 1, loss, True))] == [201]


# ------------------------------------------------------------------ training step -> data step
def reference_data_steps(skipped: set[int], steps: int) -> list[int]:
    """The t-th data step that is not skipped, by enumeration."""
    return [d for d in range(steps + len(skipped) + 1) if d not in skipped][:steps]


def test_data_skips_map_training_steps_past_the_skipped_data_steps():
    skipped = {3, 4, 5, 9, 10, 20}
    skips = DataSkips().with_skipped([5, 3]).with_skipped([4]).with_skipped([9, 10, 20])
    assert skips.ranges == ((3, 3), (9, 2), (20, 1))  # merged: touching ranges are one
    assert skips.data_steps(0, 30).tolist() == reference_data_steps(skipped, 30)
    assert skips.data_steps(7, 5).tolist() == reference_data_steps(skipped, 12)[7:]
    assert DataSkips(skips.state()) == skips and DataSkips().data_steps(4, 3).tolist() == [4, 5, 6]
    with pytest.raises(ValueError):
        DataSkips([[2, 0]])


@pytest.fixture
def order_data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        write_litpkds(tmp_path / f"c_{i:010d}.bin", rng.integers(3, 500, size=1000))
    return tmp_path  # 4000 tokens: 250 samples of 16 tokens


@pytest.mark.parametrize("world_size,micro", [(1, 2), (2, 2), (4, 1)])
def test_step_loader_reads_past_skipped_data_steps(order_data, world_size, micro):
    G = 8
    ds = PackedDataset([order_data], block_size=15, seed=3)
    skips = DataSkips([[2, 3], [7, 1]])  # data steps 2, 3, 4 and 7
    data_steps = reference_data_steps({2, 3, 4, 7}, 9)  # training steps 0..8
    for start in (0, 3):
        got = {}
        for rank in range(world_size):
            loader = StepLoader(ds, G, micro, rank=rank, world_size=world_size, start_step=start, skips=skips)
            for (step, micro_batches), _ in zip(loader, range(9 - start)):
                got.setdefault(step, []).extend(torch.cat([mb["sample_index"] for mb in micro_batches]).tolist())
                d, per_rank = data_steps[step], G // world_size
                assert loader.positions(step).tolist() == list(range(d * G + rank * per_rank,
                                                                     d * G + (rank + 1) * per_rank))
        for step in range(start, 9):  # the global order's samples at the data step: independent of the split
            assert got[step] == ds.sample_ids(np.arange(data_steps[step] * G, (data_steps[step] + 1) * G)).tolist()


# ------------------------------------------------------------------ the rollback plan and its records
def test_rollback_skips_the_spike_step_and_those_before_it_not_before_the_checkpoint():
    rollbacks = Rollbacks(window=10, sigma=3.0, max_nonfinite=2, max_rollbacks=2, skip_steps=4)
    spike = Spike(step=30, loss=9.0, mean=3.0, std=0.5, nonfinite_in_a_row=0)
    steps, data = rollbacks.skipped_steps(spike, checkpoint=20)
    assert steps.tolist() == [26, 27, 28, 29] and data.tolist() == [26, 27, 28, 29]  # 0-based: step 30 is index 29
    assert rollbacks.skipped_steps(spike, checkpoint=28)[0].tolist() == [28, 29]
    # a second spike after an earlier rollback: the steps read past the first skip, and those data steps are skipped
    before = (DataSkips([[27, 2]]), 1)
    rollbacks.skips, rollbacks.count = before
    steps, data = rollbacks.skipped_steps(spike, checkpoint=25)
    assert steps.tolist() == [26, 27, 28, 29] and data.tolist() == [26, 29, 30, 31]
    rollbacks.load_state_dict({"data_skips": [[27, 2]], "rollbacks": 1})  # the checkpoint's state, then the new skip
    rollbacks.rolled_back(data, before)
    assert rollbacks.skips.ranges == ((26, 6),) and rollbacks.count == 2
    assert rollbacks.exhausted(spike) is not None and "--max_rollbacks 2" in rollbacks.exhausted(spike)
    assert "step 30" in rollbacks.exhausted(spike)
    assert Rollbacks(10, 3.0, 2, 0, 4).observe(11, 1e9, True) is None  # disabled: no loss spikes looked for


def test_rollback_records_survive_rollbacks_and_are_replayed_by_resumes(order_data, tmp_path):
    """The datapoint log's skipped files and metrics.jsonl's rollback records: an in-process rollback to checkpoint
    C keeps the earlier rollbacks to C, a resume at C sets them aside (it replays them), a later resume keeps them."""
    G = 8
    ds = PackedDataset([order_data], block_size=15, seed=3)
    DatapointLogger(tmp_path, rank=0, world_size=1, dataset=ds)
    metrics = MetricsLog(tmp_path, resume_step=None, enabled=True)
    for step in range(1, 5):
        metrics.write({"iter": step, "step": step, "loss": 5.0 - step / 10})
    spike = Spike(step=4, loss=9.0, mean=3.0, std=0.5, nonfinite_in_a_row=0)
    data = np.array([2, 3])
    samples = samples_of_data_steps(ds, data, G)
    assert samples.tolist() == [ds.sample_ids(np.arange(d * G, d * G + G)).tolist() for d in data]
    checkpoint = tmp_path / "iter-00000002-ckpt.pth"

    def roll_back(number):  # what the trainer does at a rollback to step 2
        logger = DatapointLogger(tmp_path, rank=0, world_size=1, dataset=ds, resume_step=2, rolled_back=True)
        logger.write_skipped(number, spike.step, 2, np.array([2, 3]), data, samples)
        metrics = MetricsLog(tmp_path, resume_step=2, enabled=True, keep=keeps_rollbacks_to(2))
        metrics.write(rollback_record(spike, number, checkpoint, np.array([2, 3]), data, samples))
        return metrics

    roll_back(1)
    roll_back(2)
    assert [r["rollback"] for r in read_skipped(tmp_path)] == [1, 2]
    assert np.array_equal(read_skipped(tmp_path)[0]["samples"], samples)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("rollback")) for r in records] == [(1, None), (2, None), (3, 1), (3, 2)]
    assert records[-1]["skipped_samples"] == samples.tolist() and records[-1]["skipped_to_step"] == 4
    assert [line.split(",")[1] for line in (tmp_path / "metrics.csv").read_text().splitlines()] == ["step", "1", "2"]
    # a resume at step 3 (a checkpoint written after the rollbacks) keeps them; one at step 2 replays them
    DatapointLogger(tmp_path, rank=0, world_size=1, dataset=ds, resume_step=3)
    assert len(read_skipped(tmp_path)) == 2
    assert len([r for r in MetricsLog(tmp_path, resume_step=3, enabled=True, existing=None).jsonl.read_text()
                .splitlines()]) == 4
    DatapointLogger(tmp_path, rank=0, world_size=1, dataset=ds, resume_step=2)
    assert read_skipped(tmp_path) == [] and len(list((tmp_path / "datapoints").glob("replaced-at-*/skipped-*")))
    MetricsLog(tmp_path, resume_step=2, enabled=True)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------ goodput
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_goodput_counts_each_second_once_in_its_innermost_phase():
    clock = FakeClock()
    goodput = Goodput(clock)
    clock.now += 10  # start-up
    goodput.lost_until(2)  # steps 0 and 1 had been trained before a restart
    for step in range(4):
        with goodput.training_step(step):
            clock.now += 5
            if step == 3:
                with goodput.phase("checkpoint"):  # nested: taken from the step
                    clock.now += 4
    with goodput.phase("validation"):
        clock.now += 6
    with goodput.phase("rollback"):
        clock.now += 5
    totals = goodput.totals()
    assert totals == {"rework": 10, "step": 10, "checkpoint": 4, "validation": 6, "rollback": 5, "other": 10,
                      "wall": 45}
    assert goodput.share() == pytest.approx(10 / 45)
    assert goodput.summary().startswith("Goodput 22.2% of 45.0 s wall time (")
    with goodput.phase("step"):  # an open phase counts up to now
        clock.now += 5
        assert goodput.totals()["step"] == 15 and goodput.share() == pytest.approx(15 / 50)


# ------------------------------------------------------------------ real runs on a poisoned corpus
G = 8  # test_trainer's global batch
POISONED_STEP = 13  # the data step of random tokens: the 14th optimizer step trains on it
ROLLBACK = dict(max_steps=20, save_interval=4, spike_window=6, spike_sigma=8.0, spike_skip_steps=2, max_rollbacks=2)


def poison(train_dir: Path, data_step: int, seed: int = 0) -> np.ndarray:
    """Overwrite the tokens of every sample of `data_step` (micro: 129 tokens each) in the chunk files with uniformly
    random ones; returns those sample ids. Checksums are not checked without --verify_data."""
    ds = PackedDataset([train_dir], block_size=128, seed=1234)
    ids = ds.sample_ids(np.arange(data_step * G, (data_step + 1) * G))
    source, rng = ds.sources[0], np.random.default_rng(seed)
    for _, start in zip(*ds.locate(ids)):
        for c, chunk in enumerate(source.chunks):
            lo = max(int(start), int(source.offsets[c]))
            hi = min(int(start) + ds.sample_tokens, int(source.offsets[c + 1]))
            if lo < hi:
                tokens = np.memmap(chunk["path"], dtype=chunk["dtype"], mode="r+", offset=HEADER_SIZE)
                tokens[lo - source.offsets[c]:hi - source.offsets[c]] = rng.integers(3, 512, size=hi - lo)
                tokens.flush()
    return ids


@pytest.fixture(scope="module")
def poisoned(prepared_data, tmp_path_factory) -> dict:
    """The test corpus with one step of random tokens, and an uninterrupted run on it."""
    base = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(prepared_data["train"], base / "train")
    data = {**prepared_data, "train": base / "train"}
    samples = poison(base / "train", POISONED_STEP)
    out = train(data, base / "reference", **ROLLBACK)
    return {"data": data, "samples": samples, "reference": base / "reference", "stdout": out.stdout}


@pytest.mark.slow
def test_a_poisoned_step_is_rolled_back_and_skipped_and_a_healthy_run_is_not(prepared_data, poisoned, tmp_path):
    run = poisoned["reference"]
    (event,) = [r for r in metrics(run) if r.get("event") == "rollback"]
    spike = POISONED_STEP + 1
    assert event["spike_step"] == spike and event["checkpoint"] == "iter-00000012-ckpt.pth" and event["step"] == 13
    assert event["spike_loss"] > event["window_mean"] + 8 * event["window_std"]
    # skipped: the data of steps 13 and 14 (data steps 12 and 13), the poisoned samples among them
    ds = PackedDataset([poisoned["data"]["train"]], block_size=128, seed=1234)
    expected = ds.sample_ids(np.arange(12 * G, 14 * G)).reshape(2, G)
    assert event["skipped_data_steps"] == [12, 13] and event["skipped_samples"] == expected.tolist()
    assert expected[1].tolist() == poisoned["samples"].tolist()
    (logged,) = read_skipped(run)
    assert logged["spike_step"] == spike and logged["checkpoint_step"] == 12 and logged["rollback"] == 1
    assert logged["steps"].tolist() == [12, 13] and np.array_equal(logged["samples"], expected)
    # every step logged once; from step 12 on (0-based) two data steps later: the skipped ones are never trained on
    log = samples_per_step(run)
    assert sorted(log) == list(range(20))
    for step in range(20):
        data_step = step if step < 12 else step + 2
        assert log[step] == ds.sample_ids(np.arange(data_step * G, (data_step + 1) * G)).tolist()
    assert sorted(train_losses(run)) == list(range(1, 21)) and max(train_losses(run).values()) < event["spike_loss"]
    assert "rollback 1 of at most 2 to iter-00000012-ckpt.pth" in poisoned["stdout"]
    assert "Goodput" in poisoned["stdout"] and all("goodput" in r for r in metrics(run) if "loss" in r)
    # the same settings on the clean corpus: no rollback; the poisoned run's losses were the same up to the
    # poisoned step (those of steps 13 and 14 before the rollback are in the records it set aside)
    healthy = tmp_path / "healthy"
    train(prepared_data, healthy, **ROLLBACK)
    assert not [r for r in metrics(healthy) if "event" in r] and read_skipped(healthy) == []
    clean, dirty = train_losses(healthy), train_losses(run)
    assert all(clean[s] == dirty[s] for s in range(1, 13)) and dirty[13] != clean[13]
    before = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl.replaced").read_text().splitlines())}
    assert sorted(before) == list(range(1, spike + 1)) and before[13] == clean[13]
    assert before[spike] == event["spike_loss"] > clean[spike] + 1


@pytest.mark.slow
def test_killed_after_a_rollback_resumes_to_the_losses_of_the_run_that_never_stopped(poisoned, tmp_path):
    wrapper = tmp_path / "killer.py"
    wrapper.write_text(KILLER)
    data, run = poisoned["data"], tmp_path / "run"
    # after the rollback, before the next checkpoint: the resume from checkpoint 12 replays the spike and rollback
    killed_run(data, run, wrapper, "step:15", **ROLLBACK)
    out = killed_run(data, run, wrapper, "step:18", resume="auto", **ROLLBACK)
    assert "rollback 1 of at most 2" in out.stdout
    out = train(data, run, resume="auto", **ROLLBACK)  # from checkpoint 16: the skip is in its state
    assert f"Resumed from {run / 'iter-00000016-ckpt.pth'}" in out.stdout and "rollback 1 of" not in out.stdout
    assert train_losses(run) == train_losses(poisoned["reference"])
    assert records(run) == records(poisoned["reference"])
    assert [r["rollback"] for r in read_skipped(run)] == [1]
    assert samples_per_step(run) == samples_per_step(poisoned["reference"])


@pytest.mark.slow
def test_rollbacks_run_out_or_find_no_checkpoint_with_one_error_line(prepared_data, tmp_path):
    shutil.copytree(prepared_data["train"], tmp_path / "train")
    data = {**prepared_data, "train": tmp_path / "train"}
    for step in (POISONED_STEP, POISONED_STEP + 1):  # two poisoned steps, one skipped per rollback: a second spike
        poison(tmp_path / "train", step, seed=step)
    settings = {**ROLLBACK, "max_steps": 16, "spike_skip_steps": 1, "max_rollbacks": 1}
    out = train(data, tmp_path / "out", check=False, **settings)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "rollback 1 of at most 1 to iter-00000012-ckpt.pth" in out.stdout
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: loss spike at step {POISONED_STEP + 1}: loss ")
    assert error.endswith("; the run has rolled back 1 time already (--max_rollbacks 1): giving up")
    out = train(data, tmp_path / "early", check=False, **{**settings, "save_interval": 100})
    assert out.returncode == 1
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: loss spike at step {POISONED_STEP + 1}: loss ") and error.endswith(
        f", and no checkpoint of a step before {POISONED_STEP + 1} to roll back to (the first is saved at step "
        f"--save_interval 100)")


@pytest.mark.slow
def test_nonfinite_steps_roll_back_while_rollbacks_remain(prepared_data, tmp_path):
    # An absurd learning rate blows the weights up in the first update: from step 2 on every step is non-finite, and
    # the only checkpoint before them (step 1) already holds the blown-up weights.
    out = train(prepared_data, tmp_path, check=False, learning_rate=1e30, min_lr=1e30, warmup_steps=0, grad_clip=0,
                max_steps=20, max_nonfinite_steps=3, save_interval=1, max_rollbacks=1)
    assert out.returncode == 1, out.stderr[-2000:]
    assert ("3 consecutive non-finite steps up to step 4: rollback 1 of at most 1 to iter-00000001-ckpt.pth; "
            "skipping the data of steps 2-4") in out.stdout  # --spike_skip_steps 10, none before the checkpoint
    assert out.stderr.strip().splitlines()[-1] == ("error: 3 consecutive non-finite steps up to step 4; the run has "
                                                   "rolled back 1 time already (--max_rollbacks 1): giving up")


@pytest.mark.slow
def test_two_ranks_roll_back_as_one_process(poisoned, tmp_path):
    """FSDP, sharded (so asynchronous) checkpoints: every rank decides the same, restores its shards, skips the same
    data; the losses are those of one process (to reduction-order rounding) and the rollback record the same."""
    train(poisoned["data"], tmp_path, devices=2, strategy="fsdp", state_dict_type="sharded", **ROLLBACK)
    assert_losses_close(train_losses(tmp_path), train_losses(poisoned["reference"]), 1e-5)
    ours, theirs = ([{k: v for k, v in r.items() if k not in ("spike_loss", "window_mean", "window_std")}
                     for r in metrics(run) if "event" in r] for run in (tmp_path, poisoned["reference"]))
    assert ours == theirs and len(ours) == 1
    assert samples_per_step(tmp_path) == samples_per_step(poisoned["reference"])


def test_rollback_state_is_plain_checkpoint_data_and_the_flags_are_checked(tmp_path):
    from pretrain.tinyllama_fabric import InputError, TrainConfig

    rollbacks = Rollbacks(window=3, sigma=2.0, max_nonfinite=2, max_rollbacks=1, skip_steps=1)
    for step, loss in enumerate([3.0, 2.5, 2.7, math.nan], 1):
        rollbacks.observe(step, loss, math.isfinite(loss))
    rollbacks.rolled_back(np.array([7, 8]), (DataSkips([[2, 1]]), 0))
    torch.save(rollbacks.state_dict(), tmp_path / "meta.pt")
    restored = Rollbacks(window=3, sigma=2.0, max_nonfinite=2, max_rollbacks=1, skip_steps=1)
    restored.load_state_dict(torch.load(tmp_path / "meta.pt", weights_only=True))
    assert restored.state_dict() == {"spike_detector": {"losses": [3.0, 2.5, 2.7], "nonfinite_in_a_row": 1},
                                     "data_skips": [[2, 1], [7, 2]], "rollbacks": 1}
    with pytest.raises(InputError, match="--spike_window must be >= 2, got 1"):
        TrainConfig(spike_window=1)


@pytest.mark.slow
def test_spike_attribution_of_the_rolled_back_spike_lists_the_poisoned_batch(poisoned):
    """`datapoints --spike S`, S from the rollback record: the batch the spike trained on (the poisoned samples, not
    the re-trained step's), under the checkpoint the run went back to; the step before it, skipped too, gives back
    the loss the run logged for it before the rollback."""
    run = poisoned["reference"]
    (event,) = [r for r in metrics(run) if r.get("event") == "rollback"]

    def spike(step: int) -> dict:
        out = run_script("scripts/datapoints.py", "--spike", str(step), "--run", str(run), "--top", "0", "--json")
        return json.loads(out.stdout)

    at_spike, before_spike = spike(event["spike_step"]), spike(event["spike_step"] - 1)
    for result, skipped in ((at_spike, event["skipped_samples"][1]), (before_spike, event["skipped_samples"][0])):
        assert result["checkpoint"] == str(run / event["checkpoint"])
        assert result["rollback"] == {"rollback": 1, "spike_step": event["spike_step"], "checkpoint_step": 12}
        assert {d["sample"] for d in result["documents"]} == set(skipped)
    # the log's steps 12 and 13 hold the re-trained steps' other data
    assert set(event["skipped_samples"][0]) != set(samples_per_step(run)[12])
    assert {d["sample"] for d in at_spike["documents"]} == set(poisoned["samples"].tolist())
    # iter-12 holds the weights the 13th step started from: the loss metrics.jsonl had for it before the rollback
    replaced = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl.replaced").read_text().splitlines())}
    assert before_spike["loss"] == pytest.approx(replaced[event["spike_step"] - 1], abs=1e-5)
    # uniformly random tokens cost every model at least their entropy, log(509), on average; each poisoned piece
    # ranks above every piece of the clean batch before it
    assert at_spike["loss"] > math.log(509) - 0.1 > before_spike["loss"] + 1
    poisoned_losses = [d["loss"] for d in at_spike["documents"] if d["loss"] is not None]
    assert min(poisoned_losses) > max(d["loss"] for d in before_spike["documents"] if d["loss"] is not None)
