"""tests/ci_skips.py: in CI a skip is a failure (except tests/gpu without a GPU); elsewhere a skip stays a skip."""
import re
import subprocess
import sys

from conftest import ROOT

PROBE = '''
import pytest

def test_missing_cluster():
    pytest.skip("slurm-wlm not installed")

@pytest.mark.skipif(True, reason="munge not installed")
def test_marked_skip():
    pass

def test_missing_package():
    pytest.importorskip("a_package_that_is_not_installed")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
'''
GPU_PROBE = '''
import pytest

def test_needs_cuda():
    pytest.skip("needs a CUDA GPU")
'''


def outcome_counts(tmp_path, ci: str | None) -> dict:
    (tmp_path / "tests" / "gpu").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tests" / "test_probe.py").write_text(PROBE)
    (tmp_path / "tests" / "gpu" / "test_gpu_probe.py").write_text(GPU_PROBE)
    env = {"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin", **({"CI": ci} if ci is not None else {})}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ci_skips",
                             "tests"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    summary = result.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


def test_skips_fail_in_ci_except_gpu_tests(tmp_path):
    # skipif is decided during setup, so it fails as a setup error; both make the run fail.
    assert outcome_counts(tmp_path, "true") == {"failed": 2, "error": 1, "passed": 1, "skipped": 1, "xfailed": 1}


def test_skips_stay_skips_outside_ci(tmp_path):
    for ci in (None, "false"):
        assert outcome_counts(tmp_path, ci) == {"passed": 1, "skipped": 4, "xfailed": 1}
