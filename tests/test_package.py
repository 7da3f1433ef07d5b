"""The checkout as an installed package: declared dependencies agree with the pins, every llammlein-* command runs
the same code as its script, no script edits sys.path, and the tree passes the linter CI runs."""
import ast
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = {  # command -> the script it stands for
    "llammlein-train": "pretrain/tinyllama_fabric.py",
    "llammlein-train-tokenizer": "scripts/train_tokenizer.py",
    "llammlein-prepare-data": "scripts/prepare_data.py",
    "llammlein-export": "scripts/convert_lit_checkpoint.py",
    "llammlein-import": "scripts/convert_hf_checkpoint.py",
    "llammlein-generate": "scripts/generate.py",
    "llammlein-evaluate": "scripts/evaluate.py",
    "llammlein-datapoints": "scripts/datapoints.py",
    "llammlein-plot": "scripts/plot_run.py",
    "llammlein-summarize": "scripts/summarize_run.py",
}


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line):
            found[m.group(1).lower()] = m.group(2)
    return found


def test_declared_dependencies_are_the_pinned_ones():
    pinned = pins(ROOT / "requirements.txt")
    project = PYPROJECT["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["eval"]]
    for req in declared:
        assert req.name.lower() in pinned, f"pyproject.toml declares {req.name}, requirements.txt does not pin it"
        assert req.specifier.contains(pinned[req.name.lower()]), \
            f"{req.name}=={pinned[req.name.lower()]} (requirements.txt) is outside {req.specifier} (pyproject.toml)"
    # Every pin is declared (or is a dependency of a declared package, listed here with the reason).
    transitive = {"dill", "multiprocess", "loguru", "humanize"}  # datatrove's, pinned for reproducible preparation
    assert set(pinned) - {r.name.lower() for r in declared} == transitive


def test_every_command_is_installed_and_points_at_its_script():
    assert set(PYPROJECT["project"]["scripts"]) == set(COMMANDS)
    installed = {ep.name: ep for ep in importlib.metadata.distribution("llammlein-pretrain").entry_points
                 if ep.group == "console_scripts"}
    assert set(installed) == set(COMMANDS)
    for command, script in COMMANDS.items():
        origin = importlib.util.find_spec(installed[command].module).origin
        if command == "llammlein-train":  # runs the trainer as __main__ (flags before torch), through a launcher
            assert str(ROOT / script) == str(Path(origin).with_name("tinyllama_fabric.py"))
            origin = ROOT / "pretrain" / "launch.py"
            script = "pretrain/launch.py"
        assert Path(origin).resolve() == (ROOT / script).resolve(), f"{command} runs {origin}, not {script}"
        assert installed[command].attr == "main"
        assert shutil.which(command, path=str(Path(sys.executable).parent)), f"{command} is not on the venv's PATH"


@pytest.mark.parametrize("command,args", [
    ("llammlein-train", ["--print_config", "--model_name", "micro", "--max_steps", "7"]),
    ("llammlein-prepare-data", ["--help"]),
    ("llammlein-plot", ["--help"]),
])
def test_command_answers_like_the_script(tmp_path, command, args):
    """Run from an unrelated folder: neither the command nor `python SCRIPT` may depend on the working directory."""
    script = subprocess.run([sys.executable, str(ROOT / COMMANDS[command]), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    console = subprocess.run([str(Path(sys.executable).parent / command), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert script.returncode == 0 and console.returncode == 0, script.stderr[-2000:] + console.stderr[-2000:]
    # argparse names the program after argv[0] (and wraps the usage to its length): the only allowed difference.
    def normalise(text: str) -> str:
        return " ".join(text.replace(Path(COMMANDS[command]).name, "PROG").replace(command, "PROG").split())

    assert normalise(console.stdout) == normalise(script.stdout)
    if command == "llammlein-train":
        assert "max_steps: 7" in console.stdout


def test_no_script_edits_sys_path():
    offenders = []
    for folder in ("lit_gpt", "pretrain", "scripts", "bench", "cluster"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append")
                        and ast.unparse(node.value) == "sys.path"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_tree_passes_the_linter():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed (requirements-dev.txt)")
    result = subprocess.run([str(ruff), "check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]


# A finder that fails every import of torch or Lightning: the command must answer without them.
NO_TORCH = """
import importlib, runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'lightning'):
            raise ImportError(f'{name} imported before the flags were checked')
sys.meta_path.insert(0, NoTorch())
form, target, *sys.argv[1:] = sys.argv[1:]
if form == 'script':
    sys.argv[0] = target
    runpy.run_path(target, run_name='__main__')
else:  # what the console-script wrapper of `module:main` does
    module, function = target.split(':')
    sys.argv[0] = module
    sys.exit(getattr(importlib.import_module(module), function)())
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("form", ["script", "command"])
def test_help_and_a_bad_flag_answer_without_torch(command, form):
    target = str(ROOT / COMMANDS[command]) if form == "script" else PYPROJECT["project"]["scripts"][command]
    for args, code in ((["--help"], 0), (["--bogus_flag", "1"], 2)):
        result = subprocess.run([sys.executable, "-c", NO_TORCH, form, target, *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == code, f"{command} {args}: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        if code == 0:
            assert "usage:" in result.stdout
        else:
            errors = [line for line in result.stderr.splitlines() if "error:" in line]
            assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
