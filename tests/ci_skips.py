"""In CI (environment variable CI=true, as CI services and .ci/run set it) a skipped test is a failed test: a guarantee
whose test cannot run there (Slurm or munge not installed, a package missing, no root) must turn CI red instead of
disappearing from it. The one allowed skip: tests/gpu without a CUDA GPU (CI machines have none; bench/gpu_check.sh
runs those on one)."""
from __future__ import annotations

import os

import pytest

ALLOWED_SKIP_DIRECTORIES = ("tests/gpu/",)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    where = str(item.path).replace(os.sep, "/")
    if any(directory in where for directory in ALLOWED_SKIP_DIRECTORIES):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, where every test dependency must be installed: {reason}"
