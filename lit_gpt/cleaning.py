"""Corpus cleaning as in LLäMmlein: paragraph deduplication and the token-to-word ratio filter.

Paragraphs are the lines of a document (split at "\\n"). Their key is a 64-bit BLAKE2b hash of the paragraph,
case-folded with runs of whitespace collapsed; blank paragraphs have no key and are never removed. Over the whole
corpus in order, the first occurrence of a key stays and every later one (in the same or a later document) is
removed, so the result depends on the corpus order alone, not on how the work was split. A paragraph's position
is (shard index, its ordinal among the shard's paragraphs), which sorts in corpus order.

The ratio is the number of tokens of the training tokenizer (without BOS/EOS) per whitespace-separated word;
noisy text (code, tables, broken encodings) has high ratios. Counts of every document's ratio go into a fixed
histogram so that bounds can be chosen from a first run.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

POSITION_BITS = 40  # paragraph ordinal within a shard; the shard index takes the bits above
HISTOGRAM_EDGES = np.round(np.arange(0, 5.0001, 0.05), 2)  # ratio bins [e_i, e_i+1); one more bin for >= 5


def paragraph_key(paragraph: str) -> int | None:
    normalized = " ".join(paragraph.split()).casefold()
    if not normalized:
        return None
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little")


def paragraph_hashes(texts: Sequence[str], first_ordinal: int) -> tuple[list[int], list[int], int]:
    """(keys, ordinals) of the non-blank paragraphs of `texts`, numbered from `first_ordinal`; and the next ordinal."""
    keys, ordinals, ordinal = [], [], first_ordinal
    for text in texts:
        for paragraph in text.split("\n"):
            key = paragraph_key(paragraph)
            if key is not None:
                keys.append(key)
                ordinals.append(ordinal)
            ordinal += 1
    return keys, ordinals, ordinal


def shard_position(shard: int, ordinal) -> np.ndarray:
    return (np.uint64(shard) << np.uint64(POSITION_BITS)) | np.asarray(ordinal, np.uint64)


def first_occurrences_dropped(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The positions (sorted) of every occurrence of a key but its first."""
    order = np.lexsort((positions, keys))
    keys, positions = keys[order], positions[order]
    repeat = np.zeros(len(keys), bool)
    repeat[1:] = keys[1:] == keys[:-1]
    return np.sort(positions[repeat])


def remove_paragraphs(text: str, first_ordinal: int, removed: np.ndarray) -> tuple[str, int, int]:
    """(text without the paragraphs whose ordinals are in `removed` (sorted), paragraphs removed, next ordinal)."""
    paragraphs = text.split("\n")
    end = first_ordinal + len(paragraphs)
    lo, hi = np.searchsorted(removed, [first_ordinal, end])
    if lo == hi:
        return text, 0, end
    drop = set((removed[lo:hi] - first_ordinal).tolist())
    kept = [p for i, p in enumerate(paragraphs) if i not in drop]
    return "\n".join(kept), int(hi - lo), end


def ratio_bins(tokens: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The histogram bin of each document's tokens-per-word ratio (documents without words: the last bin)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(words > 0, tokens / np.maximum(words, 1), np.inf)
    return np.searchsorted(HISTOGRAM_EDGES, ratio, side="right") - 1


def ratio_keep(tokens: np.ndarray, words: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """True for documents whose ratio lies in [low, high] (an open bound when None)."""
    keep = np.ones(len(tokens), bool)
    if low is not None:
        keep &= tokens >= low * words
    if high is not None:
        keep &= (tokens <= high * words) & (words > 0)
    return keep


def histogram_table(counts: Sequence[int], width: int = 40) -> str:
    """A text rendering of the ratio histogram (non-empty bins)."""
    counts = list(counts)
    peak = max(counts) or 1
    lines = []
    for i, n in enumerate(counts):
        if not n:
            continue
        label = f">= {HISTOGRAM_EDGES[-1]:.2f}" if i >= len(HISTOGRAM_EDGES) - 1 else \
            f"{HISTOGRAM_EDGES[i]:.2f}-{HISTOGRAM_EDGES[i + 1]:.2f}"
        lines.append(f"  {label:>11} {n:>12,} {'#' * max(1, round(width * n / peak))}")
    return "\n".join(lines)
