"""The cluster recipe without a cluster: the Apptainer definition, the image build script and the Slurm job scripts.

Apptainer cannot run here, so the .def is checked by parsing it (what it installs, from which CUDA, with which C++
standard) and the image's own check and patch scripts run on small stand-ins; the shell scripts run against stand-in
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
BUILDING = ROOT / "cluster" / "building"
BUILD = BUILDING / "build-image.sh"
CHECK = BUILDING / "check_image.py"
PATCH = BUILDING / "patch_flash_attn.py"
TRAIN = ROOT / "cluster" / "exec" / "train_fabric.sh"
CREATE = ROOT / "cluster" / "exec" / "create.sbatch"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;#]+)")
# The CUDA builds PyTorch publishes per release (stable ones, from its release compatibility matrix). A torch pin
# outside this table fails the pairing test until its row is added.
TORCH_CUDA_BUILDS = {"2.13": ("12.6", "13.0")}

sys.path.insert(0, str(BUILDING))
import check_image  # noqa: E402
import patch_flash_attn  # noqa: E402


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins_of(lines: list[str], source: str) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{source}: not an exact pin: {line!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def _pins(path: Path) -> dict[str, str]:
    return _pins_of(path.read_text().splitlines(), path.name)


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


def _assignment(body: str, name: str) -> str:
    m = re.search(rf"^\s*{name}=(\S+)", body, re.M)
    assert m, f"%post sets no {name}"
    return m.group(1)


def _cuda_of_index(url: str) -> str:
    """https://download.pytorch.org/whl/cu130 -> 13.0"""
    m = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", url)
    assert m, f"TORCH_INDEX is not a PyTorch CUDA index: {url}"
    return f"{m.group(1)}.{m.group(2)}"


@pytest.fixture(scope="module")
def definition() -> dict[str, str]:
    return _sections(DEF.read_text())


# ------------------------------------------------- llammlein.def ------------------------------------------------------
def _base_image(definition) -> tuple[str, str]:
    header = dict(re.findall(r"^(\w+):\s*(\S+)", definition["header"], re.M))
    assert header["Bootstrap"] == "docker"
    image, _, tag = header["From"].partition(":")
    return image, tag


def test_def_base_image_is_a_pinned_cuda_devel_tag(definition):
    image, tag = _base_image(definition)
    assert image == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-cudnn-devel-ubuntu\d+\.\d+", tag), (image, tag)


def test_def_pairs_the_base_images_cuda_with_a_torch_build_that_exists(definition):
    """nvcc of the base image compiles FA2/FA3 against torch: both must be the same CUDA major.minor, one PyTorch
    actually publishes for the pinned torch (2.13 has no cu128 build: the old recipe could not build)."""
    _, tag = _base_image(definition)
    base_cuda = ".".join(tag.split(".")[:2])
    index_cuda = _cuda_of_index(_assignment(definition["post"], "TORCH_INDEX"))
    torch_minor = ".".join(_pins(ROOT / "requirements.txt")["torch"].split(".")[:2])
    assert base_cuda == index_cuda, f"base image nvcc is CUDA {base_cuda}, torch comes from the cu{index_cuda} index"
    assert torch_minor in TORCH_CUDA_BUILDS, f"add torch {torch_minor}'s CUDA builds to TORCH_CUDA_BUILDS"
    assert index_cuda in TORCH_CUDA_BUILDS[torch_minor], (
        f"torch {torch_minor} has no CUDA {index_cuda} build (it has {TORCH_CUDA_BUILDS[torch_minor]})")
    # The build stops before compiling anything if the two still disagree, and records nvcc's version for %test.
    post = _script_lines(definition["post"])
    record = post.index("python cluster/building/check_image.py --record-nvcc /opt/llammlein/nvcc-version")
    first_build = next(i for i, line in enumerate(post) if "patch_flash_attn.py" in line)
    assert record < first_build
    assert "--nvcc /opt/llammlein/nvcc-version" in " ".join(_script_lines(definition["test"]))


def test_def_builds_the_extensions_with_the_cxx_standard_of_its_torch(definition):
    """torch >= 2.13 headers need C++20; flash-attention's setup.py asks for C++17 unless patched."""
    torch_version = tuple(int(x) for x in _pins(ROOT / "requirements.txt")["torch"].split(".")[:2])
    cxx_std = _assignment(definition["post"], "CXX_STD")
    assert cxx_std == ("c++20" if torch_version >= (2, 13) else "c++17")
    post = _script_lines(definition["post"])
    for target in ("fa2", "fa3"):
        calls = [line for line in post if line.startswith(f"python cluster/building/patch_flash_attn.py {target} ")]
        assert len(calls) == 1 and calls[0].endswith('--cxx-std "$CXX_STD"'), calls
    assert {p.new for p in patch_flash_attn.patches("fa3", cxx_std) if p.old == "-std=c++17"} == {f"-std={cxx_std}"}


def _installed_by_post(definition) -> tuple[dict[str, str], list[str]]:
    """name -> version of everything %post installs, read from its commands and the requirement files they name."""
    copied = {}
    for line in _script_lines(definition["files"]):
        src, dst = line.split()
        assert (ROOT / src).exists(), f"%files copies {src}, which is not in the repository"
        copied[dst] = ROOT / src
    post = _script_lines(definition["post"])
    assert "cd /opt/llammlein" in post  # relative paths below are inside the baked copy

    def lines_of(ref: str) -> list[str]:
        path = copied.get(ref) or copied.get(f"/opt/llammlein/{ref}")
        assert path is not None, f"%post reads {ref}, which %files does not copy"
        return path.read_text().splitlines()

    derived: dict[str, list[str]] = {}  # files %post writes with grep -v
    variables: dict[str, str] = {}  # VAR=$(grep -E ...): one requirement line
    installed: dict[str, str] = {}
    for line in post:
        if m := re.fullmatch(r"grep -v -E '([^']+)' (\S+) > (\S+)", line):
            derived[m.group(3)] = [x for x in lines_of(m.group(2)) if not re.search(m.group(1), x)]
        elif m := re.fullmatch(r"(\w+)=\$\(grep -E '([^']+)' (\S+)\)", line):
            found = [x for x in lines_of(m.group(3)) if re.search(m.group(2), x)]
            assert len(found) == 1, f"{line}: matches {found}"
            variables[m.group(1)] = found[0]
        elif m := re.fullmatch(r"(\w+)=\S*\$\{(\w+)#[^}]*\}", line):
            variables[m.group(1)] = variables[m.group(2)]  # the unpacked source directory of a pinned sdist
        elif "pip install" in line:
            words = shlex.split(line)
            for i, word in enumerate(words):
                if word == "-r":
                    ref = words[i + 1]
                    installed.update(_pins_of(derived[ref] if ref in derived else lines_of(ref), ref))
                elif word.startswith("$") and word[1:] in variables:
                    installed.update(_pins_of([variables[word[1:]]], word))
    return installed, post


def test_def_installs_every_pinned_requirement_at_its_version(definition):
    """Every pin of requirements.txt and requirements-cuda.txt ends up in the image at exactly that version."""
    installed, post = _installed_by_post(definition)
    for name in ("requirements.txt", "requirements-cuda.txt"):
        for package, version in _pins(ROOT / name).items():
            assert installed.get(package) == version, f"{package}=={version} ({name}): image has {installed.get(package)}"
    # torch is the CUDA build of the requirements.txt pin; the PyPI extras may not move a CPU pin.
    assert 'python -m pip install --index-url "$TORCH_INDEX" "$TORCH_PIN"' in post
    extras = [line for line in post if "-r /tmp/requirements-pypi.txt" in line]
    assert extras and all("-c requirements.txt" in line for line in extras)
    # FA2 is compiled from the patched sdist, never from an unpatched one pip would build by itself.
    patch = post.index('python cluster/building/patch_flash_attn.py fa2 "$FA2_SRC" --cxx-std "$CXX_STD"')
    build = next(i for i, line in enumerate(post) if line.endswith('pip install --no-build-isolation --no-deps "$FA2_SRC"'))
    assert patch < build and "FLASH_ATTENTION_FORCE_BUILD=TRUE" in post[build]
    # The build fails on any drift from either file, and %test checks the same.
    drift = "check_image.py --pins requirements.txt requirements-cuda.txt"
    assert any(drift in line for line in post) and drift in " ".join(_script_lines(definition["test"]))
    assert "python -m pip check" in post
    # No pin in the .def contradicts the requirement files.
    for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"']*)", definition["post"]):
        if _norm(name) in installed and _norm(name) != "pip":
            assert installed[_norm(name)] == version, f"the .def pins {name}=={version}"


def test_def_builds_flash_attention_3_from_a_pinned_release(definition):
    post = definition["post"]
    tag = _assignment(post, "FLASH_ATTN_TAG")
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"FA3 must be built from a release tag, got {tag}"
    assert re.fullmatch(r"[0-9a-f]{40}", _assignment(post, "FLASH_ATTN_COMMIT"))
    lines = _script_lines(post)
    clone = lines.index('git clone --branch "$FLASH_ATTN_TAG" --depth 1 '
                        'https://github.com/Dao-AILab/flash-attention.git /tmp/flash-attention')
    assert lines[clone + 1] == 'if [ "$(git -C /tmp/flash-attention rev-parse HEAD)" != "$FLASH_ATTN_COMMIT" ]; then'
    patch = lines.index('python cluster/building/patch_flash_attn.py fa3 /tmp/flash-attention/hopper --cxx-std "$CXX_STD"')
    cd_hopper = lines.index("cd /tmp/flash-attention/hopper")
    build = lines[cd_hopper + 1]
    assert clone < patch < cd_hopper
    assert "FLASH_ATTENTION_FORCE_BUILD=TRUE" in build and "pip install --no-build-isolation --no-deps ." in build
    # Hopper only, and the head dims the models use (64: 120M, 128: 1B/7B) stay compiled.
    assert "FLASH_ATTENTION_DISABLE_SM80=TRUE" in build
    assert "DISABLE_HDIM64" not in build and "DISABLE_HDIM128" not in build
    # Only what the model calls (bf16, no softcap, no sliding window) is compiled; varlen (document masking) stays.
    for feature in ("FP16", "SOFTCAP", "LOCAL", "FP8", "PAGEDKV", "APPENDKV", "SPLIT"):
        assert f"FLASH_ATTENTION_DISABLE_{feature}=TRUE" in build, feature
    assert "DISABLE_VARLEN" not in build and "DISABLE_BACKWARD" not in build
    # FA2 from PyPI is the same release as the FA3 source.
    assert _pins(ROOT / "requirements-cuda.txt")["flash-attn"] == tag[1:]
    # Bounded build parallelism: MAX_JOBS is set (a number or computed and capped), never left to "all cores".
    assert re.search(r"^\s*MAX_JOBS=\{\{ MAX_JOBS \}\}", post, re.M)
    assert re.search(r'\[ "\$MAX_JOBS" -gt 16 \] && MAX_JOBS=16', post)
    assert "export MAX_JOBS" in post
    assert re.search(r"^\s*MAX_JOBS=\d+", definition["arguments"], re.M)


def test_def_installs_the_infiniband_userspace_nccl_needs(definition):
    """Without the verbs libraries in the image NCCL falls back to TCP between nodes (--nv binds only the driver)."""
    apt = set()
    for line in _script_lines(definition["post"]):
        if line.startswith("apt-get install"):
            apt |= {word for word in line.split()[2:] if not word.startswith("-")}
    assert {"libibverbs1", "ibverbs-providers", "librdmacm1"} <= apt, apt
    assert "--infiniband" in " ".join(_script_lines(definition["test"]))
    assert set(check_image.IB_LIBRARIES) == {"libibverbs.so.1", "librdmacm.so.1"}
    # The job script's default network is InfiniBand, which those libraries serve.
    text = TRAIN.read_text()
    assert '"${LLAMMLEIN_NETWORK:-ib}"' in text
    ib_branch = text.split("    ib)", 1)[1].split(";;", 1)[0]
    assert "NCCL_IB_HCA" in ib_branch and "NCCL_IB_DISABLE" not in ib_branch


def test_def_test_section_checks_what_the_trainer_needs(definition):
    test = " ".join(_script_lines(definition["test"]))
    assert "python cluster/building/check_image.py" in test and "--flash-attention" in test
    assert 'python -c "import lit_gpt"' in test and "pretrain/tinyllama_fabric.py --help" in test
    # Every FlashAttention backend the trainer knows is checked, by the trainer's own test of it.
    from lit_gpt.attention import _FLASH_API

    assert set(check_image.FLASH_ATTENTION) == set(_FLASH_API)


def test_def_environment_and_runscript(definition):
    env = definition["environment"]
    for var in ("PYTHONUNBUFFERED=1", "HF_HOME=", "PIP_CACHE_DIR=", "TRITON_CACHE_DIR="):
        assert f"export {var}" in env, var
    assert 'python pretrain/tinyllama_fabric.py "$@"' in definition["runscript"]
    # The baked code is an installed package; the working directory (a bound checkout) is searched before it.
    assert "export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD" in env
    # CUDA 13.0 on a host driver < 580 (datacenter GPUs): the forward-compatibility libcuda goes first.
    assert "apt-get install -y --no-install-recommends cuda-compat-13-0" in definition["post"]
    assert re.search(r'-lt 580 \] && \[ -e /usr/local/cuda/compat/libcuda\.so\.1 \]', env)
    assert "export LD_LIBRARY_PATH=/usr/local/cuda/compat${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" in env
    assert "pip install --no-deps --no-build-isolation -e /opt/llammlein" in definition["post"]
    assert re.search(r"^\s+README\.md /opt/llammlein/README\.md$", definition["files"], re.M)  # pyproject's readme


@pytest.mark.parametrize("section", ["post", "test", "environment", "runscript"])
def test_def_sections_are_valid_shell(definition, section):
    body = re.sub(r"\{\{ *\w+ *\}\}", "0", definition[section])  # build arguments, as Apptainer substitutes them
    result = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------- check_image.py -----------------------------------------------------
def test_check_image_pins_against_this_environment(tmp_path):
    """The CPU environment holds requirements.txt exactly; a wrong or missing pin is one line naming file and package."""
    assert check_image.pin_problems([ROOT / "requirements.txt"]) == []
    numpy = check_image.version("numpy")
    reqs = tmp_path / "reqs.txt"
    reqs.write_text(f"# comment\nnumpy=={numpy}.1\nno-such-package-xyz==1.0\n--index-url https://example.invalid\n")
    assert check_image.pin_problems([reqs]) == [
        f"reqs.txt: numpy is pinned to {numpy}.1, installed: {numpy}",
        "reqs.txt: no-such-package-xyz is pinned to 1.0, installed: nothing",
    ]


@pytest.mark.parametrize("torch_cuda, nvcc, problem", [
    ("13.0", "13.0", None),
    ("12.6", "12.6", None),
    ("13.0", "12.8", "torch is built for CUDA 13.0 but nvcc is CUDA 12.8"),
    ("13.0", "13.2", "torch is built for CUDA 13.0 but nvcc is CUDA 13.2"),  # the minor version counts too
    (None, "13.0", "CPU-only build"),
    ("13.0", None, "no CUDA compiler version"),
])
def test_check_image_cuda_pairing(torch_cuda, nvcc, problem):
    found = check_image.cuda_pairing_problem(torch_cuda, nvcc)
    assert (found is None) if problem is None else (problem in found), found


def _fake_nvcc(tmp_path: Path, release: str) -> dict:
    bin_dir = tmp_path / "nvccbin"
    bin_dir.mkdir()
    _stub(bin_dir, "nvcc", f'echo "nvcc: NVIDIA (R) Cuda compiler driver"\n'
                           f'echo "Cuda compilation tools, release {release}, V{release}.88"\n')
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_check_image_reads_nvccs_release(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_nvcc(tmp_path, "13.0")["PATH"])
    assert check_image.nvcc_version() == "13.0"


def test_check_image_records_nvcc_only_when_torch_agrees(tmp_path):
    """On CPU torch the pairing fails: one error line, no traceback, nothing recorded."""
    record = tmp_path / "nvcc-version"
    result = subprocess.run([sys.executable, str(CHECK), "--record-nvcc", str(record)], env=_fake_nvcc(tmp_path, "13.0"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: torch is a CPU-only build (torch.version.cuda is None); install it from the CUDA index"]
    assert not record.exists()


def test_check_image_records_and_rereads_the_nvcc_version(tmp_path, monkeypatch):
    record = tmp_path / "nvcc-version"
    monkeypatch.setenv("PATH", _fake_nvcc(tmp_path, "13.0")["PATH"])
    monkeypatch.setattr(check_image, "torch_cuda_version", lambda: "13.0")
    assert check_image.main(["--record-nvcc", str(record)]) == 0
    assert record.read_text() == "13.0\n"
    assert check_image.main(["--nvcc", str(record)]) == 0
    monkeypatch.setattr(check_image, "torch_cuda_version", lambda: "12.6")
    assert check_image.main(["--nvcc", str(record)]) == 1


def test_check_image_flash_attention_imports(capsys):
    # Here (CPU, no flash-attn) every backend is a problem: one error line each, naming the module, exit status 1.
    assert check_image.main(["--flash-attention"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].strip() for line in errors] == list(check_image.FLASH_ATTENTION)
    assert "'flash_attn_interface' is not importable" in errors[0] and "flash_attn" in errors[2]


def test_check_image_infiniband_libraries():
    libc = "libc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6"
    assert check_image.shared_object_problems(("libc.so.6",), libc) == []
    problems = check_image.shared_object_problems(("libibverbs.so.1", "libc.so.6"), libc)
    assert len(problems) == 1 and problems[0].startswith("libibverbs.so.1 is not in the linker cache")
    assert "libibverbs1 ibverbs-providers librdmacm1" in problems[0]
    # Listed but unloadable (a dangling cache entry) is a problem too.
    assert "does not load" in check_image.shared_object_problems(("libno-such-lib.so.1",), "libno-such-lib.so.1 =>")[0]


# ------------------------------------------------- patch_flash_attn.py ------------------------------------------------
# The lines of flash-attention v2.8.3 that the patches change, each with some context.
_FA3_SETUP = '''    if bare_metal_version != Version("12.8"):
        download_and_copy(name="nvcc")
    nvcc_flags = [
        "-O3",
        "-std=c++17",
    ]
    extra_compile_args={"cxx": ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000"]}
'''
_FA3_PIPELINE = "uint32_t const n = params.num_consumers / NumThreadsPerWarpGroup;\n"


def _hopper_tree(tmp_path: Path) -> Path:
    hopper = tmp_path / "hopper"
    hopper.mkdir()
    (hopper / "setup.py").write_text(_FA3_SETUP)
    (hopper / "sm90_pipeline_no_cluster.hpp").write_text(_FA3_PIPELINE)
    return hopper


def _patch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PATCH), *args], capture_output=True, text=True, timeout=60)


def test_patch_flash_attn_fa3(tmp_path):
    hopper = _hopper_tree(tmp_path)
    result = _patch("fa3", str(hopper), "--cxx-std", "c++20")
    assert result.returncode == 0, result.stderr
    setup = (hopper / "setup.py").read_text()
    assert setup.count("-std=c++20") == 2 and "c++17" not in setup
    assert 'if bare_metal_version != Version("12.8") and bare_metal_version < Version("13.0"):' in setup
    assert (hopper / "sm90_pipeline_no_cluster.hpp").read_text() == (
        "uint32_t const n = (params.num_consumers + NumThreadsPerWarpGroup - 1) / NumThreadsPerWarpGroup;\n")
    # Applied patches are recognised: a second run changes nothing and succeeds.
    assert _patch("fa3", str(hopper), "--cxx-std", "c++20").returncode == 0
    assert (hopper / "setup.py").read_text() == setup


def test_patch_flash_attn_refuses_a_changed_source_and_writes_nothing(tmp_path):
    hopper = _hopper_tree(tmp_path)
    (hopper / "sm90_pipeline_no_cluster.hpp").write_text("// fixed differently upstream\n")
    result = _patch("fa3", str(hopper), "--cxx-std", "c++20")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {hopper / 'sm90_pipeline_no_cluster.hpp'}: expected text "), result.stderr
    assert (hopper / "setup.py").read_text() == _FA3_SETUP, "a failed run must leave every file as it was"


def test_patch_flash_attn_fa2_drops_the_fa4_preview(tmp_path):
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text("# preview\n")
    (tmp_path / "flash_attn" / "__init__.py").write_text('__version__ = "2.8.3"\n')
    (tmp_path / "setup.py").write_text('nvcc_flags = ["-O3", "-std=c++17"]\ncompiler_c17_flag=["-O3", "-std=c++17"]\n')
    result = _patch("fa2", str(tmp_path), "--cxx-std", "c++20")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "setup.py").read_text().count("-std=c++20") == 2
    assert not (tmp_path / "flash_attn" / "cute").exists() and (tmp_path / "flash_attn" / "__init__.py").exists()


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
    # FlashAttention-4's kernel disk cache beside the run: a restart loads the kernels instead of compiling them.
    assert job_env["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    assert job_env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"].startswith(str(tmp_path / "runs" / "120m"))


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


def _hang_cluster(tmp_path: Path, trainer_status: int, write_report: bool, container: bool = True):
    """The job script with a trainer that (maybe) writes a hang report naming node-b and exits with a status; a
    host-side scontrol that knows the job excludes node-x already, and an sbatch that records the helper job."""
    _, bin_dir, env = _fake_cluster(tmp_path)
    calls = tmp_path / "host_calls.txt"
    _stub(bin_dir, "scontrol", f'[ "$1 $2" = "show hostnames" ] && {{ echo node-a; exit 0; }}\n'
                               f'[ "$1 $2" = "show job" ] && {{ echo "   ReqNodeList=(null) ExcNodeList=node-x"; '
                               f'exit 0; }}\necho "scontrol $*" >> {calls}\n')
    _stub(bin_dir, "sbatch", f'for a in "$@"; do echo "sbatch $a" >> {calls}; done\necho "Submitted batch job 4712"\n')
    _stub(bin_dir, "srun", 'shift\nexec "$@"\n')  # one task, here; drops --kill-on-bad-exit
    _stub(bin_dir, "apptainer", 'shift 7\nPATH="$APPTAINERENV_PREPEND_PATH:$PATH" exec "$@"\n')
    (bin_dir / "python").symlink_to(sys.executable)
    if not container:
        env.update(LLAMMLEIN_NO_CONTAINER="1", PYTHON=sys.executable)
    report = ("from pathlib import Path\n"
              "d = Path(os.environ['OUT_DIR']) / 'hang-12'\nd.mkdir(parents=True)\n"
              "(d / 'exclude_nodes').write_text('node-b\\n')\n") if write_report else ""
    (tmp_path / "repo" / "pretrain" / "tinyllama_fabric.py").write_text(
        f"import os, sys\n{report}sys.exit({trainer_status})\n")
    result = subprocess.run(["bash", str(TRAIN)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    return result, (calls.read_text().splitlines() if calls.exists() else [])


@pytest.mark.parametrize("container", [True, False])
@pytest.mark.parametrize("status", [75, 143])  # 143: srun ended by another task's SIGTERM; the report counts
def test_train_script_excludes_the_hung_node_and_requeues(tmp_path, status, container):
    result, calls = _hang_cluster(tmp_path, status, write_report=True, container=container)
    assert result.returncode == status, result.stdout + result.stderr
    assert "a training step hung on node-b" in result.stdout and "without node(s) node-x,node-b" in result.stdout
    # A helper job sets the exclusion once the job is pending (a running job's cannot change), then releases it.
    helper = next(c for c in calls if "ExcNodeList" in c)
    assert "scontrol update JobId=4711 ExcNodeList=node-x,node-b; scontrol release 4711" in helper
    assert "sbatch --cpus-per-task=1" in calls and calls[-1] == "scontrol requeuehold 4711", calls


def test_train_script_leaves_an_older_report_and_a_hang_without_a_node_alone(tmp_path):
    out = tmp_path / "runs" / "120m" / "hang-3"
    out.mkdir(parents=True)
    (out / "exclude_nodes").write_text("node-a\n")
    os.utime(out / "exclude_nodes", (1, 1))  # a report of an earlier run
    result, calls = _hang_cluster(tmp_path, 0, write_report=False)
    assert result.returncode == 0 and calls == [], result.stdout + result.stderr
    (tmp_path / "again").mkdir()
    result, calls = _hang_cluster(tmp_path / "again", 75, write_report=False)
    assert result.returncode == 75 and calls == [] and "no node was named; not requeueing" in result.stderr


def test_train_script_relays_the_trainers_sbatch_out_of_the_container(tmp_path):
    """--eval_submit_slurm inside the image (no Slurm there): the trainer's `sbatch` runs on the batch host, outside the
    training job's Slurm environment, and the trainer gets its output and exit status."""
    _, bin_dir, env = _fake_cluster(tmp_path)
    host_calls = tmp_path / "host_sbatch.txt"
    _stub(bin_dir, "sbatch", f'printf "%s\\n" "$PWD" "$@" > {host_calls}\n'
                             f'env | grep -c "^SLURM_JOB_ID=" >> {host_calls}\n'
                             '[ "$2" = fail ] && { echo "sbatch: error: invalid partition" >&2; exit 1; }\necho 777\n')
    _stub(bin_dir, "srun", 'shift\nexec "$@"\n')
    _stub(bin_dir, "apptainer", 'shift 7\nPATH="$APPTAINERENV_PREPEND_PATH:$PATH" exec "$@"\n')
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "repo" / "pretrain" / "tinyllama_fabric.py").write_text(
        "import subprocess, sys\n"
        "r = subprocess.run(['sbatch', '--parsable', sys.argv[-1], 'a b', ''], capture_output=True, text=True,\n"
        "                   cwd='/')\n"
        "print('trainer:', r.returncode, repr(r.stdout), repr(r.stderr))\n")
    env.update(SLURM_CONF="/etc/slurm/test.conf")
    result = subprocess.run(["bash", str(TRAIN), "ok"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trainer: 0 '777\\n' ''" in result.stdout, result.stdout
    assert host_calls.read_text().splitlines() == ["/", "--parsable", "ok", "a b", "", "0"]  # no SLURM_JOB_ID
    failed = subprocess.run(["bash", str(TRAIN), "fail"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert "trainer: 1 '' 'sbatch: error: invalid partition\\n'" in failed.stdout, failed.stdout
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
