"""The printed speed and ETA follow the last log interval, not an average over the run."""
import pytest

from lit_gpt.speed_monitor import SpeedMonitor


def run_intervals(monitor: SpeedMonitor, seconds_per_interval: list[float], steps: int, tokens_per_step: int) -> None:
    now, step = 100.0, 0
    monitor.update(step, 0, now=now)
    for seconds in seconds_per_interval:
        now, step = now + seconds, step + steps
        monitor.update(step, step * tokens_per_step, now=now)


def test_rate_and_eta_come_from_the_last_interval():
    monitor = SpeedMonitor(flops_per_token=6e6, world_size=2, peak_flops=1e12, window=3)
    # 20 steps of 1,000 tokens per interval: ten slow intervals (20 s each), then the run speeds up to 5 s.
    run_intervals(monitor, [20.0] * 10 + [5.0], steps=20, tokens_per_step=1000)
    assert monitor.tokens_per_sec() == pytest.approx(20 * 1000 / 5.0)  # 4,000, not the run's ~1,100
    # The smoothed rate covers the last 3 intervals: 60,000 tokens in 45 s.
    assert monitor.smoothed_tokens_per_sec() == pytest.approx(60_000 / 45.0)
    assert monitor.mfu() == pytest.approx(4000 * 6e6 / (1e12 * 2))
    # At step 220, 5 s per 20 steps: 80 steps to step 300 take 20 s.
    assert monitor.eta_seconds(300) == pytest.approx(20.0)
    assert monitor.eta_seconds(220) == 0.0


def test_nothing_to_report_before_the_first_interval():
    monitor = SpeedMonitor(flops_per_token=1.0, world_size=1, peak_flops=None)
    monitor.update(7, 700, now=1.0)
    assert monitor.tokens_per_sec() is None and monitor.eta_seconds(10) is None and monitor.mfu() is None
    monitor.update(8, 800, now=2.0)
    assert monitor.tokens_per_sec() == 100.0 and monitor.mfu() is None  # no known peak (CPU)
