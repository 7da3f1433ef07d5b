"""Which checkpoints a run directory holds, and which of them verify.

With several ranks, rank 0 verifies and every rank gets its verdict (see `lit_gpt.checkpoint.ranks`). A damaged
checkpoint is passed over with a warning naming it; one without checksums (sharded, written before they were
recorded) is checked against its DCP metadata and then used with a note, or, where the caller asks for verified
checkpoints only (a resume without --allow_unverified), passed over or refused.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lit_gpt.checkpoint import ranks
from lit_gpt.checkpoint.layout import CHECKSUM_FILE, DCP_METADATA_FILE, META_FILE, DamagedError
from lit_gpt.checkpoint.verify import check_checkpoint
from lit_gpt.errors import InputError
from lit_gpt.run_dir import RunDir

_noted_unverified: set[Path] = set()


def is_complete(path: Path) -> bool:
    """A checkpoint file with content, or a sharded directory with its index and metadata."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size > 0
    return (path / META_FILE).is_file() and (path / DCP_METADATA_FILE).is_file()


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first (not verified: see `latest_checkpoint`)."""
    return [p for p in RunDir(out_dir).checkpoints() if is_complete(p)]


def latest_checkpoint(out_dir: Path, verify: bool = True, log: Callable[[str], None] = ranks.log,
                      allow_unverified: bool = True) -> Path | None:
    """The newest checkpoint in `out_dir` that verifies (collective with several ranks); damaged newer ones are
    skipped with a warning naming them, and so are those without checksums unless `allow_unverified`.
    `verify=False`: the newest complete one, unchecked (no reading, no ranks)."""
    found = list_checkpoints(out_dir)
    if not verify:
        return found[-1] if found else None
    return ranks.decided_by_rank_zero(lambda: newest_that_verifies(found, log, allow_unverified))


def verify_checkpoint(path: Path, log: Callable[[str], None] = ranks.log, allow_unverified: bool = True) -> bool:
    """Raise DamagedError (on every rank) if the checkpoint is damaged; False, with a note, if it has no checksums
    (an UnverifiedError unless `allow_unverified`)."""
    verified = ranks.decided_by_rank_zero(lambda: _check(path))
    if not verified:
        if not allow_unverified:
            raise UnverifiedError(_unverified(path))
        _note_unverified(path, log)
    return verified


def newest_that_verifies(found: list[Path], log: Callable[[str], None] = ranks.log,
                         allow_unverified: bool = True) -> Path | None:
    """The last of `found` that is not damaged (checked here, in this process); one without checksums counts only
    with `allow_unverified`."""
    for path in reversed(found):
        try:
            if _check(path):
                return path
            if allow_unverified:
                _note_unverified(path, log)
                return path
            log(f"warning: passing over {_unverified(path)}")
        except DamagedError as e:
            log(f"warning: passing over a damaged checkpoint: {e}")
    return None


class UnverifiedError(InputError):
    """A checkpoint without checksums, where only a verified one is taken."""


def _unverified(path: Path) -> str:
    return (f"{path}: has no {CHECKSUM_FILE} to verify its bytes against (written by an older version, or the file "
            f"was removed); pass --allow_unverified to use it unverified")


def _check(path: Path) -> bool:
    """check_checkpoint, and for a sharded checkpoint without checksums what its DCP metadata says about its files."""
    verified = check_checkpoint(path)
    if not verified and Path(path).is_dir():
        _check_shards_against_metadata(Path(path))
    return verified


def _check_shards_against_metadata(path: Path) -> None:
    """Every shard file that torch's `.metadata` lists is there and long enough for the bytes it says it holds."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a damaged or foreign metadata file: unreadable is damaged
        raise DamagedError(f"{path / DCP_METADATA_FILE}: unreadable ({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise DamagedError(f"{shard}: missing (listed in {DCP_METADATA_FILE})")
        if shard.stat().st_size < end:
            raise DamagedError(f"{shard}: truncated ({shard.stat().st_size} bytes, {DCP_METADATA_FILE} places data up "
                               f"to byte {end})")


def _note_unverified(path: Path, log: Callable[[str], None]) -> None:
    if Path(path) not in _noted_unverified:  # once: a resume looks it up, then loads it
        _noted_unverified.add(Path(path))
        log(f"note: {path} has no checksums (written before they were recorded); it is used unverified")
