"""Loss-spike rollback and goodput, in-process: the detector's arithmetic and its checkpointed state, the training
step -> data step mapping and StepLoader positions with skips, the rollback plan, its records (datapoint log,
metrics.jsonl) across resumes and rollbacks, and the goodput accounting."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_packed_dataset import write_litpkds

from lit_gpt.data_skips import DataSkips
from lit_gpt.datapoints import DatapointLogger, read_skipped
from lit_gpt.goodput import Goodput
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
    """The demo's healthy run (scripts/demo.sh, every step's loss) replayed through the default detector."""
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
