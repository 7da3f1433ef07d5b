"""The cluster recipe without a cluster: the Apptainer definition, the image build script and the Slurm job scripts.

Apptainer cannot run here, so the .def is checked by parsing it; the shell scripts run against stand-in
srun/scontrol/apptainer commands that record how they were called.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "llammlein.def"
BUILD = ROOT / "cluster" / "building" / "build-image.sh"
TRAIN = ROOT / "cluster" / "exec" / "train_fabric.sh"
CREATE = ROOT / "cluster" / "exec" / "create.sbatch"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;#]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def _sections(text: str) -> dict[str, str]:
    """Header under "header", then every %section's body (repeated sections are concatenated, as Apptainer does)."""
    sections, name = {"header": ""}, "header"
    for line in text.splitlines():
        m = re.match(r"^%(\w+)", line)
        if m:
            name = m.group(1)
            sections.setdefault(name, "")
            continue
        sections[name] += line + "\n"
    return sections


def _script_lines(body: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def definition() -> dict[str, str]:
    return _sections(DEF.read_text())


# ------------------------------------------------- llammlein.def ------------------------------------------------------
def test_def_base_image_is_a_pinned_cuda_devel_tag(definition):
    header = dict(re.findall(r"^(\w+):\s*(\S+)", definition["header"], re.M))
    assert header["Bootstrap"] == "docker"
    image, _, tag = header["From"].partition(":")
    assert image == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", tag), header["From"]


def test_def_installs_every_pinned_requirement_at_its_version(definition):
    """Every pin of requirements.txt (and requirements-cuda.txt) ends up in the image at exactly that version."""
    copied = {}
    for line in _script_lines(definition["files"]):
        src, dst = line.split()
        copied[dst] = ROOT / src
        assert (ROOT / src).exists(), f"%files copies {src}, which is not in the repository"
    post = _script_lines(definition["post"])
    workdirs = [line.split()[1] for line in post if line.startswith("cd ")]
    installed: dict[str, str] = {}
    for line in post:
        words = shlex.split(line.split("#")[0]) if "pip install" in line else []
        if not words:
            continue
        for i, word in enumerate(words):
            if word == "-r":
                ref = words[i + 1]
                # A -r path is the container path of a %files entry (absolute, or relative to a `cd`).
                target = next((copied[d] for d in copied if d == ref or any(d == f"{w}/{ref}" for w in workdirs)), None)
                if target is None and ref.startswith("/tmp/"):
                    continue  # the build-tools subset, derived from requirements-cuda.txt (checked below)
                assert target is not None, f"%post installs -r {ref}, which %files does not copy"
                installed.update(_pins(target))
            elif PIN.match(word) and not word.startswith("pip=="):
                m = PIN.match(word)
                installed[_norm(m.group(1))] = m.group(2)
    # torch comes from the CUDA index, its pin read out of requirements.txt (not repeated in the .def).
    assert re.search(r"TORCH_PIN=\$\(grep -E '\^torch==' requirements.txt\)", definition["post"])
    assert re.search(r'pip install --index-url "\$TORCH_INDEX" "\$TORCH_PIN"', definition["post"])
    for name, version in _pins(ROOT / "requirements.txt").items():
        assert installed.get(name) == version, f"{name}=={version} (requirements.txt): image has {installed.get(name)}"
    for name, version in _pins(ROOT / "requirements-cuda.txt").items():
        assert installed.get(name) == version, f"{name}=={version} (requirements-cuda.txt): image has {installed.get(name)}"
    # The extras may not move a CPU pin, and the build fails on any drift from either file.
    assert "-r requirements-cuda.txt -c requirements.txt" in " ".join(post)
    for name in ("requirements.txt", "requirements-cuda.txt"):
        assert f"/opt/llammlein/{name}" in definition["post"], f"the drift check must read {name}"
    # No pin in the .def contradicts the requirement files.
    for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"']*)", definition["post"]):
        if _norm(name) in installed and _norm(name) != "pip":
            assert installed[_norm(name)] == version, f"the .def pins {name}=={version}"


def test_def_builds_flash_attention_3_from_a_pinned_release(definition):
    post = definition["post"]
    tag = re.search(r"^\s*FLASH_ATTN_TAG=(\S+)", post, re.M).group(1)
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"FA3 must be built from a release tag, got {tag}"
    assert re.search(r'git clone --branch "\$FLASH_ATTN_TAG" --depth 1 https://github.com/Dao-AILab/flash-attention',
                     post)
    lines = _script_lines(post)
    cd_hopper = next(i for i, line in enumerate(lines) if re.match(r"cd \S*/hopper$", line))
    build = lines[cd_hopper + 1]
    assert "FLASH_ATTENTION_FORCE_BUILD=TRUE" in build and ("pip install" in build or "setup.py install" in build)
    # FA2 from PyPI is the same release as the FA3 source.
    assert _pins(ROOT / "requirements-cuda.txt")["flash-attn"] == tag[1:]
    # Bounded build parallelism: MAX_JOBS is set (a number or computed and capped), never left to "all cores".
    assert re.search(r"^\s*MAX_JOBS=\{\{ MAX_JOBS \}\}", post, re.M)
    assert re.search(r'\[ "\$MAX_JOBS" -gt 16 \] && MAX_JOBS=16', post)
    assert "export MAX_JOBS" in post
    assert re.search(r"^\s*MAX_JOBS=\d+", definition["arguments"], re.M)


def test_def_test_section_imports_what_the_trainer_needs(definition):
    imports = set()
    for line in definition["test"].splitlines():
        m = re.match(r"\s*import (.+)", line)
        if m:
            imports |= {name.strip() for name in m.group(1).split(",")}
    assert {"torch", "lightning", "flash_attn_interface", "lit_gpt"} <= imports, imports


def test_def_environment_and_runscript(definition):
    env = definition["environment"]
    for var in ("PYTHONUNBUFFERED=1", "HF_HOME=", "PIP_CACHE_DIR=", "TRITON_CACHE_DIR="):
        assert f"export {var}" in env, var
    assert 'python pretrain/tinyllama_fabric.py "$@"' in definition["runscript"]


# ------------------------------------------------- build-image.sh -----------------------------------------------------
def _bin_dir(tmp_path: Path, tools=("bash", "dirname", "grep", "sed", "cat", "env")) -> Path:
    """A PATH holding only the listed system tools (so apptainer/singularity are certainly absent)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} missing on this machine"
        (bin_dir / tool).symlink_to(found)
    return bin_dir


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_build_image_fails_clearly_without_apptainer(tmp_path):
    bin_dir = _bin_dir(tmp_path)
    result = subprocess.run([str(bin_dir / "bash"), str(BUILD)], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "apptainer" in result.stderr and "singularity" in result.stderr, result.stderr
    assert not (tmp_path / "llammlein.sif").exists()


def test_build_image_calls_apptainer_from_the_repo_root(tmp_path):
    bin_dir = _bin_dir(tmp_path)
    record = tmp_path / "calls"
    _stub(bin_dir, "apptainer", f'[ "$1" = --version ] && {{ echo "apptainer version 1.3.4"; exit 0; }}\n'
                                f'echo "$PWD $*" >> {record}\n')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "MAX_JOBS": "6"}
    result = subprocess.run([str(bin_dir / "bash"), str(BUILD), "img.sif", "--fakeroot"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    cwd, *args = record.read_text().split()
    assert cwd == str(ROOT)
    assert args[0] == "build" and args[-2:] == [str(tmp_path / "img.sif"), "llammlein.def"]
    assert "--fakeroot" in args and "MAX_JOBS=6" in args



def test_build_image_output_is_optional_before_options(tmp_path):
    """`build-image.sh --fakeroot` must build llammlein.sif with --fakeroot, not an image named "--fakeroot"."""
    bin_dir = _bin_dir(tmp_path)
    record = tmp_path / "calls"
    _stub(bin_dir, "apptainer", f'[ "$1" = --version ] && {{ echo "apptainer version 1.3.4"; exit 0; }}\n'
                                f'echo "$*" >> {record}\n')
    result = subprocess.run([str(bin_dir / "bash"), str(BUILD), "--fakeroot"], env={"PATH": str(bin_dir)},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = record.read_text().split()
    assert "--fakeroot" in args and args[-2:] == [str(tmp_path / "llammlein.sif"), "llammlein.def"], args


# ------------------------------------------------- train_fabric.sh ----------------------------------------------------
def _sbatch_options(path: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("#SBATCH")]


def test_train_script_header():
    opts = _sbatch_options(TRAIN)
    names = [o.split("=")[0] for o in opts]
    assert "--ntasks-per-node" in names and "--nodes" in names
    assert "--ntasks" not in names, "Fabric refuses --ntasks; use --ntasks-per-node"
    assert not re.search(r"--ntasks(=|\s)", TRAIN.read_text()), "no --ntasks anywhere (srun included)"
    assert any(re.fullmatch(r"--signal=(B:)?USR1@\d+", o) for o in opts), opts
    assert "--requeue" in opts and "--open-mode=append" in opts
    assert "--gres=gpu:h100:4" in opts
    assert any(o.startswith("--output=") and "%j" in o for o in opts)
    assert subprocess.run(["bash", "-n", str(TRAIN)]).returncode == 0


def _fake_cluster(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Stand-ins for srun (records argv and environment), scontrol and apptainer; a Slurm-like environment."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {record}\nenv > {record}.env\n')
    _stub(bin_dir, "scontrol", '[ "$1 $2" = "show hostnames" ] && { echo node-a; echo node-b; }\n')
    _stub(bin_dir, "apptainer", "exit 0\n")
    for name in ("data/train", "data/val", "tok", "repo/pretrain"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "repo" / "pretrain" / "tinyllama_fabric.py").write_text("")
    (tmp_path / "img.sif").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "FI_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4711", SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="4", SLURM_CPUS_PER_TASK="16",
               SLURM_SUBMIT_DIR=str(tmp_path / "repo"), MODEL_NAME="LLaMmlein_120M",
               OUT_DIR=str(tmp_path / "runs" / "120m"), TRAIN_DATA_DIR=str(tmp_path / "data" / "train"),
               VAL_DATA_DIR=str(tmp_path / "data" / "val"), TOKENIZER_PATH=str(tmp_path / "tok"),
               LLAMMLEIN_IMAGE=str(tmp_path / "img.sif"), TRAIN_ARGS="--max_steps 100")
    return record, bin_dir, env


def test_train_script_launches_the_trainer_in_the_container(tmp_path):
    record, _, env = _fake_cluster(tmp_path)
    result = subprocess.run(["bash", str(TRAIN), "--learning_rate", "3e-4"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[0] == "--kill-on-bad-exit=1"
    assert argv[1].endswith("apptainer") and argv[2:4] == ["exec", "--nv"]
    binds = argv[argv.index("--bind") + 1].split(",")
    assert binds[0] == str((tmp_path / "repo").resolve())
    assert str((tmp_path / "runs" / "120m").resolve()) in binds and str((tmp_path / "data").resolve()) in binds
    assert str(tmp_path.resolve()) in binds  # the tokenizer's parent
    assert argv[argv.index("--pwd") + 1] == str((tmp_path / "repo").resolve())
    i = argv.index(str(tmp_path / "img.sif"))
    assert argv[i + 1: i + 3] == ["python", "pretrain/tinyllama_fabric.py"]
    trainer = argv[i + 2:]
    assert trainer[trainer.index("--resume") + 1] == "auto"
    assert trainer[trainer.index("--model_name") + 1] == "LLaMmlein_120M"
    assert trainer[-4:] == ["--max_steps", "100", "--learning_rate", "3e-4"]  # TRAIN_ARGS, then script arguments
    job_env = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line)
    assert job_env["MASTER_ADDR"] == "node-a" and int(job_env["MASTER_PORT"]) == 15000 + 4711
    assert job_env["NCCL_DEBUG"] == "WARN" and job_env["NCCL_IB_HCA"] and job_env["NCCL_SOCKET_IFNAME"]
    assert job_env["OMP_NUM_THREADS"] == "16" and job_env["SRUN_CPUS_PER_TASK"] == "16"
    assert job_env["PYTHONUNBUFFERED"] == "1"


def test_train_script_without_container_and_on_efa(tmp_path):
    record, _, env = _fake_cluster(tmp_path)
    env.update(LLAMMLEIN_NO_CONTAINER="1", PYTHON="/opt/py/bin/python3", LLAMMLEIN_NETWORK="efa")
    result = subprocess.run(["bash", str(TRAIN)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    assert argv[1:3] == ["/opt/py/bin/python3", "pretrain/tinyllama_fabric.py"]
    assert not any("apptainer" in a for a in argv)
    job_env = Path(f"{record}.env").read_text()
    assert "FI_PROVIDER=efa" in job_env


def test_train_script_relays_the_trainers_requeue_out_of_the_container(tmp_path):
    """The image has no scontrol: the trainer's `scontrol requeue` becomes a request the batch script carries out."""
    _, bin_dir, env = _fake_cluster(tmp_path)
    host_calls = tmp_path / "host_scontrol.txt"
    _stub(bin_dir, "scontrol",
          f'[ "$1 $2" = "show hostnames" ] && {{ echo node-a; exit 0; }}\necho "$*" >> {host_calls}\n')
    _stub(bin_dir, "srun", 'shift\nexec "$@"\n')  # one task, here; drops --kill-on-bad-exit
    # exec --nv --bind B --pwd D IMAGE cmd...: run cmd with the PATH the container would have.
    _stub(bin_dir, "apptainer", 'shift 7\nPATH="$APPTAINERENV_PREPEND_PATH:$PATH" exec "$@"\n')
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "repo" / "pretrain" / "tinyllama_fabric.py").write_text(
        "import os, subprocess\n"
        "r = subprocess.run(['scontrol', 'requeue', os.environ['SLURM_JOB_ID']], capture_output=True, text=True)\n"
        "print('trainer:', r.returncode, r.stdout.strip())\n")
    result = subprocess.run(["bash", str(TRAIN)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trainer: 0 scontrol requeue 4711: requested from inside the container" in result.stdout, result.stdout
    assert host_calls.read_text().splitlines() == ["requeue 4711"], "the batch script must requeue, once"
    assert not list((tmp_path / "runs" / "120m").glob(".slurm-relay-*")), "relay directory left behind"


@pytest.mark.parametrize("change, message", [
    ({"LLAMMLEIN_IMAGE": "/nonexistent/llammlein.sif"}, "build-image.sh"),
    ({"SLURM_NTASKS_PER_NODE": None}, "--ntasks-per-node"),
    ({"SLURM_JOB_ID": None}, "sbatch"),
    ({"LLAMMLEIN_NETWORK": "carrier-pigeon"}, "LLAMMLEIN_NETWORK"),
])
def test_train_script_errors_name_what_is_missing(tmp_path, change, message):
    record, _, env = _fake_cluster(tmp_path)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    result = subprocess.run(["bash", str(TRAIN)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not record.exists(), "nothing may be launched"


# ------------------------------------------------- create.sbatch ------------------------------------------------------
def test_create_sbatch_wraps_create_sh(tmp_path):
    opts = _sbatch_options(CREATE)
    assert not any(o.startswith("--ntasks=") for o in opts)
    assert subprocess.run(["bash", "-n", str(CREATE)]).returncode == 0
    _, bin_dir, env = _fake_cluster(tmp_path)
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir()
    (repo / "scripts" / "create.sh").write_text(f'printf "%s\\n" "$@" > {tmp_path}/create.txt\n')
    (tmp_path / "ckpt.pth").write_text("")
    env.update(LLAMMLEIN_NO_CONTAINER="1")
    argv = ["bash", str(CREATE), str(tmp_path / "ckpt.pth"), str(tmp_path / "hf"), "--dtype", "bfloat16"]
    result = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "create.txt").read_text().split() == [str(tmp_path / "ckpt.pth"), str(tmp_path / "hf"),
                                                             "--dtype", "bfloat16"]
    missing = subprocess.run(["bash", str(CREATE)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "CHECKPOINT" in missing.stderr


def test_create_sbatch_uses_the_images_python_in_the_container(tmp_path):
    """create.sh prefers the checkout's .venv (a host interpreter); inside the image it must run the image's python."""
    _, bin_dir, env = _fake_cluster(tmp_path)
    _stub(bin_dir, "apptainer", 'shift 6\nexec "$@"\n')  # exec --bind B --pwd D IMAGE cmd...: run cmd
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir()
    (repo / "scripts" / "create.sh").write_text(f'echo "${{PYTHON:-unset}}" > {tmp_path}/python.txt\n')
    (tmp_path / "ckpt.pth").write_text("")
    env.update(PYTHON=str(repo / ".venv" / "bin" / "python"))  # e.g. left over from a host-side export
    result = subprocess.run(["bash", str(CREATE), str(tmp_path / "ckpt.pth"), str(tmp_path / "hf")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "python.txt").read_text().strip() == "python"


@pytest.mark.parametrize("command, version, ok", [
    ("singularity", "apptainer version 1.3.6", True),  # Apptainer's compatibility link
    ("singularity", "singularity-ce version 4.2.1", True),
    ("singularity", "singularity-ce version 3.11.4", False),
    ("apptainer", "apptainer version 1.1.9", False),
])
def test_build_image_checks_the_runtime_version(tmp_path, command, version, ok):
    bin_dir = _bin_dir(tmp_path)
    _stub(bin_dir, command, f'[ "$1" = --version ] && {{ echo "{version}"; exit 0; }}\nexit 0\n')
    result = subprocess.run([str(bin_dir / "bash"), str(BUILD)], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert "too old" in result.stderr
