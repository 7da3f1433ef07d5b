"""Loading checkpoints: a training run's state back into its model and optimizer, or weights alone.

`load_training_state(path, model, optimizer)` restores a training run (any world size and strategy; ours, or one of
the original TinyLlama/LLäMmlein trainer, see `lit_gpt.checkpoint.original`) and returns its metadata.

`load_weights(path)` reads weights outside the trainer (export, generation, evaluation, --init_from). It accepts
both layouts the trainer writes (see `lit_gpt.checkpoint.save`), a bare state dict and the original trainer's
checkpoints: a full `.pth` file, memory-mapped so that nothing is read until used, or a sharded
torch-distributed-checkpoint directory, read one tensor at a time through torch's own DCP loader without a process group. Either way the model tensors come back
behind a lazy mapping with clean lit-gpt keys (wrapper prefixes such as `_forward_module.` stripped), so a
converter holds about one tensor at a time, not the whole model and never the optimizer state.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lit_gpt.checkpoint.find import is_complete, verify_checkpoint
from lit_gpt.checkpoint.layout import DCP_METADATA_FILE, META_FILE, CheckpointError, DamagedError, clean_key, unwrap
from lit_gpt.checkpoint.original import (
    as_our_checkpoint,
    is_original_state,
    load_optimizer_state,
    load_original_checkpoint,
)
from lit_gpt.checkpoint.verify import check_checkpoint
from lit_gpt.config import Config
from lit_gpt.errors import InputError
from lit_gpt.run_dir import RunDir
from lit_gpt.tokenizer import HF_TOKENIZER_FILES

TOKENIZER_FILES = ("tokenizer.model", *HF_TOKENIZER_FILES)
# Config fields that describe the trained weights (the rest are runtime choices or derived).
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "n_query_groups", "head_size", "intermediate_size",
               "padded_vocab_size", "norm_eps", "rope_base")


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
        stored_key, item = self._items[key]
        target = {"model": {stored_key: torch.empty(item.size, dtype=item.properties.dtype)}}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, checkpoint_id=self.path, no_dist=True)  # reads only this tensor's shards
        return target["model"][stored_key]


# ------------------------------------------------------------------ loading
def load_weights(path: Path) -> dict[str, Any]:
    """A training checkpoint as {"model": LazyStateDict, "config": dict | None, "iter_num", "step_count",
    "tokens_seen", "hparams", "data", "verified", ...}; the optimizer state is never used. A damaged checkpoint (see
    `lit_gpt.checkpoint.verify`) is a CheckpointError; "verified" is False for one that has no checksums to check."""
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
        if not (path / DCP_METADATA_FILE).is_file():
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
        return check_checkpoint(path)
    except DamagedError as e:
        raise CheckpointError(str(e)) from None


def resolve_config(ckpt: dict, path: Path, model_name: str | None = None) -> Config:
    """The model config of a checkpoint: stored in it, else `model_config.json` beside it, else `--model_name`.

    With `--model_name`, the named config must agree with what the checkpoint records and with its tensor shapes.
    """
    path = Path(path)
    stored, where = ckpt.get("config"), f"{path}: field 'config'"
    beside = RunDir.of_checkpoint(path).model_config
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
    return check_tokenizer_dir(RunDir.of_checkpoint(checkpoint).tokenizer, "no --tokenizer DIR given; default")


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
        ckpt = load_weights(source)
        config = resolve_config(ckpt, source, model_name)
        if with_tokenizer:
            tok_dir = find_tokenizer(source, tokenizer)
        state = {k: ckpt["model"].as_dtype(k, dtype) for k in ckpt["model"]}
        meta = {k: v for k, v in ckpt.items() if k != "model"}
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    return model.eval(), config, tok_dir, meta


def trained_with_document_masking(meta: dict) -> bool:
    """Whether the run that wrote a checkpoint (its `load_gpt` metadata) attended within documents only."""
    hparams = meta.get("hparams") if isinstance(meta.get("hparams"), dict) else {}
    return bool(hparams.get("document_masking", False))


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


# ------------------------------------------------------------------ into a training run
def load_training_state(path: Path, model, optimizer=None) -> dict[str, Any]:
    """Verify, then load model (and optimizer) state in place on every rank; returns the training metadata.

    Works across world sizes and strategies: the sharded layout is resharded by torch distributed checkpoint, the
    full layout is read by every rank (memory-mapped) and scattered to the current sharding.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    if path.is_dir() and not is_complete(path):
        raise InputError(f"--resume {path}: incomplete sharded checkpoint (missing {META_FILE} or {DCP_METADATA_FILE})")
    verify_checkpoint(path)
    model, optimizer = unwrap(model, optimizer)
    if path.is_file():
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and is_original_state(state["model"]):
            return _load_original(path, model, optimizer)
        model_sd, optim_sd = state.pop("model"), state.pop("optimizer", None)
        _apply_state(model, optimizer, model_sd, optim_sd, StateDictOptions(full_state_dict=True))
        return state
    # DCP loads in place into state dicts shaped like the current (possibly differently sharded) model.
    target = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        target["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(target, checkpoint_id=path)
    _apply_state(model, optimizer, target["model"], target.get("optimizer"), StateDictOptions())
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)


def _load_original(path: Path, model, optimizer) -> dict[str, Any]:
    """A checkpoint of the original TinyLlama/LLäMmlein trainer: weights and AdamW moments under our names; returns
    its counters with "original": True (it has no data position or RNG state)."""
    original = load_original_checkpoint(path, with_optimizer=optimizer is not None)
    set_model_state_dict(model, original.model, options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and original.optimizer is not None:  # None: it never stepped, a fresh state is the same
        load_optimizer_state(model, optimizer, original.optimizer)
    return {"original": True, "step_count": original.step_count, "iter_num": original.iter_num,
            "hparams": original.hparams}


def _apply_state(model, optimizer, model_sd, optim_sd, options: StateDictOptions) -> None:
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        if optim_sd is None:
            raise ValueError("the checkpoint holds no optimizer state")
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
