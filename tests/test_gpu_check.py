"""bench/gpu_check.sh end to end as a CPU smoke run (GPU_CHECK_DEVICE=cpu, smallest sizes), as the GPU machine would
run it: from a copy of the checkout, with no editable install, and with datatrove, zstandard, wandb, lm_eval, every
flash_attn* and the extra wheels' packages unimportable (an import guard on PYTHONPATH). The script must find the
checkout itself, write its data without datatrove, install the extra wheels from bench/wheels, and summarise every
part that runs on a CPU."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import ROOT

UNAVAILABLE_ON_THE_GPU_MACHINE = ("datatrove", "zstandard", "wandb", "lm_eval")
# Top-level names that must come from the checkout copy (or, for the extra wheels, from the script's OUT/site).
FROM_THE_COPY = ("lit_gpt", "pretrain", "scripts", "bench")

GUARD = '''
"""Import guard (tests/test_gpu_check.py): the packages the GPU machine lacks are unimportable, and the installed
project is hidden, so that the checkout under test has to be on PYTHONPATH."""
import os
import sys
from importlib.machinery import PathFinder

BLOCKED = set(os.environ["IMPORT_GUARD_BLOCK"].split(","))
ALLOWED_ROOTS = tuple(os.environ["IMPORT_GUARD_ROOTS"].split(os.pathsep))
ONLY_FROM_ROOTS = set(os.environ["IMPORT_GUARD_ONLY_FROM_ROOTS"].split(","))


class GuardedPathFinder(PathFinder):
    """The path-based finder that sees neither the blocked packages nor, for the listed names, anything outside the
    allowed roots: they look absent (find_spec None), as on a machine without them."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED or top.startswith("flash_attn"):
            return None
        spec = super().find_spec(name, path, target)
        if spec is not None and top in ONLY_FROM_ROOTS and name == top:
            where = spec.origin or next(iter(spec.submodule_search_locations or []), "")
            if not os.path.abspath(where).startswith(ALLOWED_ROOTS):
                return None
        return spec


# setuptools' editable install puts its own finder on sys.meta_path (from a .pth file, before this runs).
sys.meta_path[:] = [GuardedPathFinder if f is PathFinder else f for f in sys.meta_path
                    if not (getattr(f, "__module__", "") or "").startswith("__editable__")]
'''


def extra_wheel_packages(root: Path) -> list[str]:
    lines = (root / "bench" / "gpu_check_wheels.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def copy_checkout(target: Path) -> Path:
    """The checkout's files without environments, caches and the outputs of runs (what .gitignore names)."""
    anywhere = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
    at_root = {"out", "data", "demo", "gpu_check"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set(anywhere(directory, names))
        if Path(directory) == ROOT:
            skipped |= {n for n in names if n in at_root or n.startswith(".venv")}
        elif Path(directory) == ROOT / "bench":
            skipped |= {"wheels"} & set(names)
        return skipped

    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def guarded_env(copy: Path, out: Path, guard_dir: Path, wheel_packages: list[str]) -> dict:
    guard_dir.mkdir(exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    extras = [r.split("==")[0].replace("-", "_") for r in wheel_packages]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONPATH": str(guard_dir), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "IMPORT_GUARD_BLOCK": ",".join(UNAVAILABLE_ON_THE_GPU_MACHINE),
            "IMPORT_GUARD_ROOTS": os.pathsep.join([str(copy), str(out / "site")]),
            "IMPORT_GUARD_ONLY_FROM_ROOTS": ",".join([*FROM_THE_COPY, *extras]),
            "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_QUICK": "1"}


def importable(env: dict, module: str, cwd: Path) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, cwd=cwd, capture_output=True)
    return probe.returncode == 0


def fetch_wheels(copy: Path) -> str | None:
    """Download the extra wheels into the copy's bench/wheels (as the script's header says); why not, or None."""
    try:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
                                  str(copy / "bench" / "wheels"), "-r", str(copy / "bench" / "gpu_check_wheels.txt")],
                                 capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "pip download timed out"
    return None if fetched.returncode == 0 else (fetched.stderr.strip().splitlines() or ["pip download failed"])[-1]


@pytest.mark.slow
def test_gpu_check_script_runs_every_part_and_summarises(tmp_path):
    copy = copy_checkout(tmp_path / "checkout")
    out = tmp_path / "check"
    wheels = extra_wheel_packages(copy)
    problem = fetch_wheels(copy) if wheels else None
    if problem:  # without a registry only the extra-wheel sub-check is left out, loudly
        warnings.warn(f"extra-wheel sub-check SKIPPED: could not fetch {wheels} ({problem})", stacklevel=1)
        (copy / "bench" / "gpu_check_wheels.txt").write_text("")
        wheels = []
    env = guarded_env(copy, out, tmp_path / "guard", wheels)
    # The guard works: what the GPU machine lacks, and the installed project, are not importable.
    for module in (*UNAVAILABLE_ON_THE_GPU_MACHINE, "flash_attn", "lit_gpt", *(r.split("==")[0] for r in wheels)):
        assert not importable(env, module.replace("-", "_"), tmp_path), f"the import guard lets {module} through"

    result = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=copy, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert f"lit_gpt from {copy / 'lit_gpt' / '__init__.py'}" in summary["environment"]
    for requirement in wheels:
        name, version = requirement.split("==")
        assert f"extra wheel: {name} {version} from {out / 'site'}" in summary["environment"], summary["environment"]

    ran = {name: part for name, part in summary["parts"].items() if part["rc"] is not None}
    assert set(ran) == {"mfu_1b_eager", "attention_bench", "trainer", "memory"}, summary["parts"]
    assert all(p["rc"] == 0 for p in ran.values()), summary["parts"]
    trainer = summary["tests"]["trainer"]
    assert trainer and all(v == "passed" for v in trainer.values()), trainer
    assert {"reference", "fsdp_full_shard", "resume"} <= set(summary["trainer"])
    assert summary["trainer"]["resume"]["max_loss_diff"] <= 1e-5  # on the CPU the resume is exact
    rows = summary["mfu_1b_eager"]
    assert [(r["attn"], r["compile"]) for r in rows] == [("sdpa", False)] and rows[0]["tokens_per_sec"] > 0
    assert "6N" in summary["mfu_setup"]["mfu_convention"] and summary["mfu_setup"]["device"]
    (memory,) = summary["memory"].values()  # the estimate against the measured peak
    assert abs(memory["ratio"] - 1) <= 0.2 and memory["measured_gib"] > 0

    bench = summary["attention_bench"]
    measured = [r for r in bench["rows"] if "skipped" not in r]
    cases = {(r["seq_len"], r["mask"]) for r in bench["rows"]}
    assert cases == {(64, "causal"), (64, "document"), (128, "causal"), (128, "document")}
    assert {(r["seq_len"], r["mask"], r["backend"]) for r in measured} == {
        (*case, kernel) for case in cases for kernel in ("sdpa:flash", "sdpa:math")}
    for r in measured:
        assert r["forward_tflops"] > 0 and r["fwd_bwd_tflops"] > 0
        if r["mask"] == "causal":  # FLOPs from the timing, against 4 D H B T(T+1)/2 counted here
            heads, head_size = int(r["heads"].split("/")[0]), int(r["heads"].split("x")[1])
            flops = 4 * head_size * heads * r["batch"] * r["seq_len"] * (r["seq_len"] + 1) // 2
            assert r["forward_tflops"] * 1e12 * r["forward_ms"] / 1e3 == pytest.approx(flops, rel=1e-9)
    assert {"fa2", "fa3", "fa4", "flex"} <= {r["backend"] for r in bench["rows"] if "skipped" in r}

    report = (out / "gpu_check.md").read_text()
    for heading in ("## Trainer on CUDA", "## Memory", "## Throughput and MFU (LLaMmlein_1B, eager)",
                    "## Attention kernels alone", "MFU on "):
        assert heading in report, heading


def test_gpu_check_names_a_missing_wheel_and_how_to_fetch_it(tmp_path):
    wheels = tmp_path / "wheels.txt"
    wheels.write_text("# an extra wheel nobody fetched\nnot-a-real-package-xyz==1.0\n")
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_WHEELS_LIST": str(wheels), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not-a-real-package-xyz==1.0" in lines[0]
    assert "pip download --no-deps -d bench/wheels -r" in lines[0]
    assert not (tmp_path / "out" / "gpu_check.json").exists()
