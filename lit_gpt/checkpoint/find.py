"""Which checkpoints a run directory holds, and which of them verify.

With several ranks, rank 0 verifies and every rank gets its verdict (see `lit_gpt.checkpoint.ranks`). A damaged
checkpoint is passed over with a warning naming it; one written before checksums were recorded is used with a note.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lit_gpt.checkpoint import ranks
from lit_gpt.checkpoint.layout import DCP_METADATA_FILE, META_FILE, DamagedError
from lit_gpt.checkpoint.verify import check_checkpoint
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


def latest_checkpoint(out_dir: Path, verify: bool = True, log: Callable[[str], None] = ranks.log) -> Path | None:
    """The newest checkpoint in `out_dir` that verifies (collective with several ranks); damaged newer ones are
    skipped with a warning naming them. `verify=False`: the newest complete one, unchecked (no reading, no ranks)."""
    found = list_checkpoints(out_dir)
    if not verify:
        return found[-1] if found else None
    return ranks.decided_by_rank_zero(lambda: newest_that_verifies(found, log))


def verify_checkpoint(path: Path, log: Callable[[str], None] = ranks.log) -> bool:
    """Raise DamagedError (on every rank) if the checkpoint is damaged; False, with a note, if it has no checksums."""
    verified = ranks.decided_by_rank_zero(lambda: check_checkpoint(path))
    if not verified:
        _note_unverified(path, log)
    return verified


def newest_that_verifies(found: list[Path], log: Callable[[str], None] = ranks.log) -> Path | None:
    """The last of `found` that is not damaged (checked here, in this process)."""
    for path in reversed(found):
        try:
            if not check_checkpoint(path):
                _note_unverified(path, log)
            return path
        except DamagedError as e:
            log(f"warning: passing over a damaged checkpoint: {e}")
    return None


def _note_unverified(path: Path, log: Callable[[str], None]) -> None:
    if Path(path) not in _noted_unverified:  # once: a resume looks it up, then loads it
        _noted_unverified.add(Path(path))
        log(f"note: {path} has no checksums (written before they were recorded); it is used unverified")
