"""Read training checkpoints outside the trainer (export, generation, evaluation) and write converted ones safely.

`load_checkpoint(path)` accepts both layouts the trainer writes (see `lit_gpt.checkpoints`): a full `.pth` file,
memory-mapped so that nothing is read until used, or a sharded torch-distributed-checkpoint directory, read one
tensor at a time through torch's own DCP loader without a process group. Either way the model tensors come back
behind a lazy mapping with clean lit-gpt keys (wrapper prefixes such as `_forward_module.` stripped), so a
converter holds about one tensor at a time, not the whole model and never the optimizer state.
"""
from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lit_gpt.config import Config
from lit_gpt.errors import InputError
from lit_gpt.integrity import DamagedError, verify_checkpoint
from lit_gpt.tokenizer import HF_TOKENIZER_FILES

META_FILE = "meta.pt"
TOKENIZER_FILES = ("tokenizer.model", *HF_TOKENIZER_FILES)
# Module wrappers that insert a name component: Fabric, torch.compile, activation checkpointing, FSDP1.
WRAPPER_PARTS = {"_forward_module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
# Config fields that describe the trained weights (the rest are runtime choices or derived).
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "n_query_groups", "head_size", "intermediate_size",
               "padded_vocab_size", "norm_eps", "rope_base")


class CheckpointError(InputError, ValueError):
    """Bad input to a conversion/generation script; the message names the file or flag."""


def clean_key(key: str) -> str:
    parts = [p for p in key.split(".") if p not in WRAPPER_PARTS]
    if parts and parts[0] == "module":  # a DDP module's own state_dict
        parts = parts[1:]
    return ".".join(parts)


# ------------------------------------------------------------------ lazy model state
class LazyStateDict(Mapping):
    """Model tensors by clean key; `shapes` needs no reads; `release(key)` frees a tensor once the caller is done."""

    shapes: dict[str, tuple[int, ...]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def as_dtype(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in `dtype` (the stored tensor itself when it already is)."""
        return self[key].to(dtype)

    def release(self, key: str) -> None:
        pass


class MmapStateDict(LazyStateDict):
    """Tensors of a memory-mapped `torch.load`: pages are read on first touch.

    Touched file pages stay mapped, and count as our memory, until dropped: `release` and the chunked `as_dtype`
    drop them, so that converting a large checkpoint holds about one chunk of source pages rather than all of them
    (pages would simply be re-read from the file if touched again).
    """

    CHUNK_BYTES = 64 << 20

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self.shapes = {k: tuple(t.shape) for k, t in tensors.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def as_dtype(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        source = self._tensors[key]
        if source.dtype == dtype:
            return source
        if source.dim() == 0 or not source.is_contiguous():
            return source.to(dtype)
        out = torch.empty(source.shape, dtype=dtype)
        rows = max(1, self.CHUNK_BYTES // max(1, source[0].nbytes))
        for start in range(0, source.shape[0], rows):
            out[start:start + rows].copy_(source[start:start + rows])
            _drop_pages(source[start:start + rows])
        return out

    def release(self, key: str) -> None:
        _drop_pages(self._tensors[key])


_LIBC = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None


def _drop_pages(t: torch.Tensor) -> None:
    """madvise(DONTNEED) the whole pages inside a contiguous tensor of a read-only file mapping."""
    if _LIBC is None or not t.is_contiguous():
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.nbytes) // page * page
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


class DCPStateDict(LazyStateDict):
    """The "model" entries of a torch distributed checkpoint, each loaded (resharded to one full tensor) on access."""

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        try:
            metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # torch raises many types for a damaged .metadata
            raise CheckpointError(f"{self.path / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
        planner_data = metadata.planner_data or {}
        self._items: dict[str, tuple[str, TensorStorageMetadata]] = {}
        model_fqns = set()
        for fqn, item in metadata.state_dict_metadata.items():
            nested = planner_data.get(fqn, tuple(fqn.split(".", 1)))
            if isinstance(item, TensorStorageMetadata) and len(nested) == 2 and nested[0] == "model":
                self._items[clean_key(nested[1])] = (nested[1], item)
                model_fqns.add(fqn)
        self.shapes = {k: tuple(item.size) for k, (_, item) in self._items.items()}
        # Shard files are read lazily, tensor by tensor: check up front that those of the model are all there
        # (a partial copy of the directory), rather than failing halfway through an export.
        for index, info in metadata.storage_data.items():
            shard = self.path / info.relative_path
            if index.fqn in model_fqns and (not shard.is_file() or shard.stat().st_size < info.offset + info.length):
                raise CheckpointError(f"{self.path}: shard file {info.relative_path} is missing or truncated")

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        stored_key, item = self._items[key]
        target = {"model": {stored_key: torch.empty(item.size, dtype=item.properties.dtype)}}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, checkpoint_id=self.path, no_dist=True)  # reads only this tensor's shards
        return target["model"][stored_key]


# ------------------------------------------------------------------ loading
def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint as {"model": LazyStateDict, "config": dict | None, "iter_num", "step_count",
    "tokens_seen", "hparams", "data", "verified", ...}; the optimizer state is never used. A damaged checkpoint (see
    `lit_gpt.integrity`) is a CheckpointError; "verified" is False for one that has no checksums to check."""
    from lit_gpt.original_checkpoint import as_our_checkpoint

    path = Path(path)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a file that is not a checkpoint
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
        if "model" not in state and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            state = {"model": state}  # a bare state dict (e.g. lit-gpt's lit_model.pth)
        if not isinstance(state.get("model"), dict):
            raise CheckpointError(f"{path}: no 'model' state dict in this checkpoint")
        state = as_our_checkpoint(state, path)  # the original TinyLlama/LLäMmlein trainer's checkpoints
        model = MmapStateDict({clean_key(k): v for k, v in state.pop("model").items() if isinstance(v, torch.Tensor)})
    elif path.is_dir():
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path}: not a sharded checkpoint directory (no .metadata file)")
        model = DCPStateDict(path)
        state = {}
        if (path / META_FILE).is_file():
            try:
                state = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
            except Exception as e:  # as for a full checkpoint: many types for a file that is not one
                raise CheckpointError(f"{path / META_FILE}: not a readable torch file ({type(e).__name__}: {e})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path / META_FILE}: holds a {type(state).__name__}, not a metadata dict")
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if not len(model):
        raise CheckpointError(f"{path}: the checkpoint holds no model tensors")
    state["verified"] = _verify(path)
    state.pop("optimizer", None)
    state.setdefault("config", None)
    for key in ("iter_num", "step_count", "tokens_seen", "hparams"):
        state.setdefault(key, None)
    return {**state, "model": model}


def _verify(path: Path) -> bool:
    """After the structural checks (whose messages are more specific): the bytes against their checksums. False for
    a checkpoint without any (a sharded one written before they were recorded)."""
    try:
        return verify_checkpoint(path)
    except DamagedError as e:
        raise CheckpointError(str(e)) from None


def resolve_config(ckpt: dict, path: Path, model_name: str | None = None) -> Config:
    """The model config of a checkpoint: stored in it, else `model_config.json` beside it, else `--model_name`.

    With `--model_name`, the named config must agree with what the checkpoint records and with its tensor shapes.
    """
    path = Path(path)
    stored, where = ckpt.get("config"), f"{path}: field 'config'"
    beside = path.parent / "model_config.json"
    if stored is None and beside.is_file():
        try:
            stored, where = json.loads(beside.read_text()), str(beside)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{beside}: unreadable ({e})") from None
    trained = None if stored is None else _config_from(stored, where)
    if model_name:
        try:
            config = Config.from_name(model_name)
        except ValueError as e:
            raise CheckpointError(f"--model_name: {e}") from None
        if trained is not None:
            diff = [f"{f}={getattr(trained, f)} (named: {getattr(config, f)})" for f in ARCH_FIELDS
                    if getattr(trained, f) != getattr(config, f)]
            if diff:
                raise CheckpointError(f"--model_name {model_name}: does not match the checkpoint {path}, which was "
                                      f"trained with {', '.join(diff)}")
            config = config.replace(vocab_size=trained.vocab_size, block_size=trained.block_size)
        source = f"--model_name {model_name}"
    elif trained is not None:
        config, source = trained, str(path)
    else:
        raise CheckpointError(f"{path}: records no model config and there is no {beside.name} beside it; "
                              "pass --model_name")
    check_shapes(ckpt["model"], config, source, path)
    # The attention kernel is a runtime choice of the training run (e.g. fa3 on H100), not part of the weights:
    # export, generation and evaluation run where that kernel may not (CPU), so pick one that can run here.
    return config.replace(attn_impl="auto")


def _config_from(stored: Any, where: str) -> Config:
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where}: holds a {type(stored).__name__}, not a model config")
    try:
        return Config.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a valid model config ({e})") from None


def check_shapes(model: LazyStateDict, config: Config, source: str, path: Path) -> None:
    from lit_gpt.hf_convert import lit_model_shapes

    expected = lit_model_shapes(config)
    missing = sorted(set(expected) - set(model.shapes))
    extra = sorted(set(model.shapes) - set(expected))
    wrong = [f"{k} {list(model.shapes[k])} (expected {list(v)})" for k, v in expected.items()
             if k in model.shapes and model.shapes[k] != v]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"shape {wrong[0]}" if wrong else ""]))
        raise CheckpointError(f"{source}: config {config.name or '(custom)'} does not match the weights in {path}: "
                              f"{detail}")


def check_tokenizer_dir(directory: Path, flag: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{flag} {directory}: tokenizer directory not found")
    if not any((directory / f).is_file() for f in TOKENIZER_FILES[:2]):
        raise CheckpointError(f"{flag} {directory}: holds neither tokenizer.model nor tokenizer.json")
    return directory


def find_tokenizer(checkpoint: Path, explicit: Path | None = None) -> Path:
    """`--tokenizer DIR`, else the `tokenizer/` directory the trainer writes beside its checkpoints."""
    if explicit:
        return check_tokenizer_dir(explicit, "--tokenizer")
    return check_tokenizer_dir(Path(checkpoint).parent / "tokenizer", "no --tokenizer DIR given; default")


def load_gpt(source: Path, model_name: str | None = None, tokenizer: Path | None = None,
             dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """A GPT in eval mode from a training checkpoint (file or sharded dir) or an HF export directory.

    Returns (model, config, tokenizer_dir or None without `with_tokenizer`, checkpoint metadata).
    """
    from lit_gpt.hf_convert import is_hf_dir, read_hf_checkpoint
    from lit_gpt.model import GPT

    source = Path(source)
    tok_dir = None
    if is_hf_dir(source):
        vocab = None
        if with_tokenizer:
            tok_dir = check_tokenizer_dir(tokenizer or source, "--tokenizer" if tokenizer else "model directory")
            vocab = _tokenizer_vocab_size(tok_dir)
        try:
            config, tensors = read_hf_checkpoint(source, vocab_size=vocab)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        state, meta = {k: t.to(dtype) for k, t in tensors}, {}
    else:
        ckpt = load_checkpoint(source)
        config = resolve_config(ckpt, source, model_name)
        if with_tokenizer:
            tok_dir = find_tokenizer(source, tokenizer)
        state = {k: ckpt["model"].as_dtype(k, dtype) for k in ckpt["model"]}
        meta = {k: v for k, v in ckpt.items() if k != "model"}
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    return model.eval(), config, tok_dir, meta


def _tokenizer_vocab_size(directory: Path) -> int:
    from lit_gpt.tokenizer import Tokenizer

    try:
        return Tokenizer(directory).vocab_size
    except ValueError as e:
        raise CheckpointError(f"tokenizer {directory}: {e}") from None


# ------------------------------------------------------------------ writing converted outputs
def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(src) / name, dst / name)
    return copied


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def publish(directory: Path) -> None:
    """Give `directory` and everything in it the permissions the umask grants new files (and fsync the files).

    Some writers ignore the umask: mkdtemp makes the directory private and safetensors writes its files 0600,
    while a model directory is meant to be shared like any other output."""
    umask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# Temp dirs of atomic_output_dir, named after their owner: .NAME.tmp-HOST-PID-RANDOM (.old- while swapping)
_OWNED_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")


@contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool, flag: str = "--out_dir",
                      inputs: dict[str, Path | None] | None = None) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out_dir`; it becomes `out_dir` only if the block finishes without error.

    `inputs` ({flag: path}) are what the block reads: replacing an `out_dir` that holds one of them (e.g. the run
    directory of the checkpoint being exported) would delete it, so that is refused, --overwrite or not.
    The temp dir's name records this host and process: those a killed run left beside `out_dir` are cleaned up here
    once their process is gone (see `remove_stale_temp_dirs`). A full disk is one CheckpointError; nothing is replaced.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{flag} {out_dir}: exists and is not a directory")
    for input_flag, path in (inputs or {}).items():
        if path is not None and out_dir.exists() and (
                Path(path).resolve() == out_dir.resolve() or out_dir.resolve() in Path(path).resolve().parents):
            raise CheckpointError(f"{flag} {out_dir}: holds the input {input_flag} {path}, which replacing it would "
                                  f"delete; choose another {flag}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir.parent)  # may put back an out_dir that a killed run had moved aside
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{flag} {out_dir}: exists and is not empty (pass --overwrite to replace it)")
    owner = f"{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{owner}", dir=out_dir.parent))
    try:
        yield tmp
        publish(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{owner}", dir=out_dir.parent))
            out_dir.rename(old / "replaced")
            try:
                tmp.rename(out_dir)
            except OSError:
                (old / "replaced").rename(out_dir)  # the old directory goes back where it was
                old.rmdir()
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"{flag} {out_dir}: no space left on device (writing {e.filename or tmp}); "
                                  f"nothing was replaced") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp_dirs(parent: Path) -> None:
    """Remove the temp dirs of `atomic_output_dir` in `parent` whose process is gone from this host (killed runs
    leave full-size copies behind). A directory moved aside for replacing goes back if nothing took its place."""
    host = socket.gethostname()
    for entry in Path(parent).iterdir():
        match = _OWNED_TEMP.match(entry.name)
        if not match or match["host"] != host or _process_alive(int(match["pid"])) or not entry.is_dir():
            continue
        target, aside = entry.with_name(match["name"]), entry / "replaced"
        try:
            if match["kind"] == "old" and aside.is_dir() and not target.exists():
                aside.rename(target)
                print(f"note: put back {target}, which a killed process ({match['pid']}) had moved aside",
                      file=sys.stderr)
            shutil.rmtree(entry)
            print(f"note: removed {entry}, left by a killed process ({match['pid']})", file=sys.stderr)
        except OSError as e:  # e.g. another user's: not ours to clean
            print(f"note: cannot remove {entry}, left by a killed process ({e.strerror or e})", file=sys.stderr)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
