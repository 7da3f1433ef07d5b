"""Adapts the pinned flash-attention sources (v2.8.3) to the image's torch 2.13 + CUDA 13.0 before they are built.

    python patch_flash_attn.py fa2 SDIST_DIR --cxx-std c++20      # FlashAttention-2: the flash-attn sdist
    python patch_flash_attn.py fa3 HOPPER_DIR --cxx-std c++20     # FlashAttention-3: the hopper/ directory

Each patch replaces an exact text and says why. A text that is missing (the pinned source changed) is an error and
nothing is written; a patch already applied is left as it is, so running twice is harmless.
The flash-attn sdist also loses flash_attn/cute/, an early FlashAttention-4 preview: installed after flash-attn-4 it
would overwrite that package's files with older ones.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Patch:
    file: str
    old: str
    new: str
    why: str


def std_patch(file: str, std: str) -> Patch:
    # setup.py passes -std=c++17 explicitly, so torch's cpp_extension does not add the C++20 that 2.13's headers need.
    return Patch(file, "-std=c++17", f"-std={std}", f"torch >= 2.13 headers need {std}")


def patches(target: str, std: str) -> list[Patch]:
    if target == "fa2":
        return [std_patch("setup.py", std)]
    return [
        std_patch("setup.py", std),
        # v2.8.3 swaps in a downloaded nvcc 12.6 for any CUDA but 12.8; on CUDA 13 that compiler would not match torch.
        Patch("setup.py", 'if bare_metal_version != Version("12.8"):',
              'if bare_metal_version != Version("12.8") and bare_metal_version < Version("13.0"):',
              "build with the image's own nvcc on CUDA 13"),
        # Fewer consumer threads than a warp group gave an arrival count of 0 (fixed upstream after v2.8.3).
        Patch("sm90_pipeline_no_cluster.hpp", "params.num_consumers / NumThreadsPerWarpGroup;",
              "(params.num_consumers + NumThreadsPerWarpGroup - 1) / NumThreadsPerWarpGroup;",
              "barrier arrival count rounded up"),
    ]


# Directories of the source that must not be installed (see the module docstring).
REMOVALS = {"fa2": ("flash_attn/cute",), "fa3": ()}


def apply(root: Path, todo: list[Patch], removals: tuple[str, ...] = ()) -> list[str]:
    """Patch the files under root and delete the removals, or return the problems and change nothing."""
    texts: dict[Path, str] = {}
    problems, done = [], []
    for p in todo:
        path = root / p.file
        if path not in texts:
            if not path.is_file():
                problems.append(f"{path}: no such file")
                continue
            texts[path] = path.read_text()
        if p.old in texts[path]:
            texts[path] = texts[path].replace(p.old, p.new)
            done.append(f"{path}: {p.why}")
        elif p.new not in texts[path]:
            problems.append(f"{path}: expected text {p.old!r} not found (the pinned flash-attention source "
                            f"changed; review {Path(__file__).name})")
    if problems:
        return problems
    for path, text in texts.items():
        tmp = path.with_name(path.name + ".patching")
        tmp.write_text(text)
        os.replace(tmp, path)
    for name in removals:
        if (root / name).exists():
            shutil.rmtree(root / name)
            done.append(f"{root / name}: removed")
    for line in done:
        print(f"patched {line}")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("fa2", "fa3"))
    parser.add_argument("source", type=Path, help="flash-attn sdist directory (fa2) or the hopper/ directory (fa3)")
    parser.add_argument("--cxx-std", required=True, choices=("c++17", "c++20"),
                        help="C++ standard of the torch the extension is built against (torch >= 2.13: c++20)")
    args = parser.parse_args(argv)
    problems = apply(args.source, patches(args.target, args.cxx_std), REMOVALS[args.target])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
