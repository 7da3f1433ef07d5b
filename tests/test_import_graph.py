"""No import cycles among the project's modules, and the run directory's file names spelt in one place."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

RUN_DIR_NAMES = {"hparams.json", "model_config.json", "metrics.jsonl", "metrics.csv", "wandb_run_id"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it: at module level and inside functions (a deferred import
    closes a cycle just the same once it runs). `from package import name` counts `package.name` when that is a
    module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "lit_gpt").rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it reaches is explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lit_gpt_has_no_import_cycles():
    modules = project_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    assert graph["lit_gpt.checkpoint.load"] >= {"lit_gpt.checkpoint.original", "lit_gpt.run_dir"}  # the graph sees
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_run_dir_names_are_spelt_only_by_run_dir():
    """Code (not docstrings or comments) outside lit_gpt/run_dir.py never names a run directory's files."""
    offenders = []
    for folder in ("lit_gpt", "scripts", "pretrain", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "lit_gpt" / "run_dir.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                        and (node.value in RUN_DIR_NAMES or node.value.endswith("-ckpt.pth")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)


def test_checkpoint_api_resolves_and_light_modules_need_no_torch():
    """Every name `lit_gpt.checkpoint` exports resolves; publishing, verifying and the run directory's layout import
    without torch (data preparation and run records use them before torch is needed)."""
    import lit_gpt.checkpoint as checkpoint

    for name in checkpoint.__all__:
        assert getattr(checkpoint, name) is not None, name
    probe = ("import sys\n"
             "import lit_gpt.checkpoint.publish, lit_gpt.checkpoint.verify, lit_gpt.run_dir, lit_gpt.tokenizer\n"
             "from lit_gpt.checkpoint import set_aside, sha256_file\n"
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
