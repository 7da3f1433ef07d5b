"""Checks that the training image holds what llammlein.def promises; run at build time (%post) and by `apptainer test`.

    python check_image.py --record-nvcc FILE        # build time: torch's CUDA == nvcc's, then write nvcc's version
    python check_image.py --pins requirements.txt requirements-cuda.txt --nvcc FILE --flash-attention --infiniband

Every check runs; each problem is one line on stderr and the exit status is 1. No GPU is needed: the FlashAttention
imports only load the extensions (a libcuda stub on LD_LIBRARY_PATH satisfies their link on a build host).
"""
from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;#]+)")
# The FlashAttention backends the image provides (lit_gpt.attention checks each one's module, functions and keywords).
FLASH_ATTENTION = ("fa3", "fa4", "fa2")
# NCCL's InfiniBand transport dlopens these; without them it falls back to TCP sockets across nodes, silently.
IB_LIBRARIES = ("libibverbs.so.1", "librdmacm.so.1")


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def pin_problems(paths: list[Path]) -> list[str]:
    problems = []
    for path in paths:
        for name, pinned in read_pins(path).items():
            try:
                # A local label is the build variant, not a different release: 2.13.0+cu130 satisfies 2.13.0.
                installed = version(name).split("+")[0]
            except PackageNotFoundError:
                installed = None
            if installed != pinned:
                problems.append(f"{path.name}: {name} is pinned to {pinned}, installed: {installed or 'nothing'}")
    return problems


def cuda_major_minor(text: str | None) -> str | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def nvcc_version() -> str | None:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_pairing_problem(torch_cuda: str | None, nvcc: str | None) -> str | None:
    """torch's CUDA build and the nvcc that compiles the extensions against it must agree on major.minor."""
    if torch_cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None); install it from the CUDA index"
    if nvcc is None:
        return "no CUDA compiler version (nvcc missing from PATH, or no version recorded at build time)"
    if cuda_major_minor(torch_cuda) != cuda_major_minor(nvcc):
        return (f"torch is built for CUDA {torch_cuda} but nvcc is CUDA {nvcc}: change the From: tag or "
                "TORCH_INDEX of llammlein.def so that both name the same CUDA major.minor")
    return None


def torch_cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def flash_attention_problems(backends: tuple[str, ...]) -> list[str]:
    """The trainer's own check of each backend (module importable, the functions it calls with the keywords it
    passes), so that the image cannot pass with a FlashAttention the trainer would refuse."""
    from lit_gpt.attention import flash_backend_problem  # installed in the image before %test runs this
    return [f"{impl}: {problem}" for impl in backends if (problem := flash_backend_problem(impl))]


def ldconfig_libraries() -> str:
    return subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout


def shared_object_problems(names: tuple[str, ...], ld_cache: str) -> list[str]:
    problems = []
    for name in names:
        if name not in ld_cache:
            problems.append(f"{name} is not in the linker cache (ldconfig -p): install the InfiniBand user-space "
                            "packages (libibverbs1 ibverbs-providers librdmacm1)")
            continue
        try:
            ctypes.CDLL(name)
        except OSError as e:
            problems.append(f"{name} does not load: {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pins", nargs="+", type=Path, default=[], metavar="FILE",
                        help="requirement files whose name==version pins must all be installed at exactly that version")
    parser.add_argument("--record-nvcc", type=Path, metavar="FILE",
                        help="compare torch's CUDA with nvcc's now, then write nvcc's major.minor to FILE")
    parser.add_argument("--nvcc", type=Path, metavar="FILE",
                        help="compare torch's CUDA with the nvcc version recorded at build time in FILE")
    parser.add_argument("--flash-attention", action="store_true",
                        help="FlashAttention-2, -3 and -4 import with the functions the attention backends call")
    parser.add_argument("--infiniband", action="store_true", help="the InfiniBand verbs libraries NCCL loads")
    args = parser.parse_args(argv)

    problems = pin_problems(args.pins)
    if args.record_nvcc or args.nvcc:
        if args.record_nvcc:
            nvcc = nvcc_version()
        else:
            nvcc = args.nvcc.read_text().strip() if args.nvcc.is_file() else None
        problem = cuda_pairing_problem(torch_cuda_version(), nvcc)
        if problem:
            problems.append(problem)
        elif args.record_nvcc:
            args.record_nvcc.write_text(nvcc + "\n")
    if args.flash_attention:
        problems += flash_attention_problems(FLASH_ATTENTION)
    if args.infiniband:
        problems += shared_object_problems(IB_LIBRARIES, ldconfig_libraries())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print("image check passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
