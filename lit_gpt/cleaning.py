"""Corpus cleaning as in LLäMmlein: paragraph deduplication and the token-to-word ratio filter.

Paragraphs are the lines of a document (split at "\\n"). Their key is the 64-bit XXH3 hash of the paragraph,
case-folded with runs of whitespace collapsed (XXH3, as datatrove's own dedup uses: a third of BLAKE2b's cost per
paragraph, and as collision-free at 64 bits); blank paragraphs have no key and are never removed. Over the whole
corpus in order, the first occurrence of a key stays and every later one (in the same or a later document) is
removed, so the result depends on the corpus order alone, not on how the work was split. A paragraph's position
is (shard index, its ordinal among the shard's paragraphs), which sorts in corpus order.

The ratio is the number of tokens of the training tokenizer (without BOS/EOS) per whitespace-separated word;
noisy text (code, tables, broken encodings) has high ratios. Counts of every document's ratio go into a fixed
histogram so that bounds can be chosen from a first run.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import compress

import numpy as np
import xxhash

POSITION_BITS = 40  # paragraph ordinal within a shard; the shard index takes the bits above
HISTOGRAM_EDGES = np.round(np.arange(0, 5.0001, 0.05), 2)  # ratio bins [e_i, e_i+1); one more bin for >= 5


def paragraph_key(paragraph: str) -> int | None:
    normalized = " ".join(paragraph.split()).casefold()
    return xxhash.xxh3_64_intdigest(normalized.encode("utf-8")) if normalized else None


def paragraph_hashes(texts: Sequence[str], first_ordinal: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys, ordinals) of the non-blank paragraphs of `texts`, numbered from `first_ordinal`; and the next ordinal.

    paragraph_key of every paragraph, batched (it runs on every paragraph of the corpus): the documents joined by
    "\\n" have their paragraphs in order, and case folding commutes with the split and the whitespace collapse."""
    normalized = [" ".join(p.split()) for p in "\n".join(texts).casefold().split("\n")] if texts else []
    keys = np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, filter(None, normalized))), np.uint64)
    present = np.fromiter(map(bool, normalized), bool, len(normalized))
    ordinals = np.flatnonzero(present).astype(np.uint64) + np.uint64(first_ordinal)
    return keys, ordinals, first_ordinal + len(normalized)


def shard_position(shard: int, ordinal) -> np.ndarray:
    return (np.uint64(shard) << np.uint64(POSITION_BITS)) | np.asarray(ordinal, np.uint64)


def first_occurrences_dropped(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The positions (sorted) of every occurrence of a key but its first."""
    order = np.lexsort((positions, keys))
    keys, positions = keys[order], positions[order]
    repeat = np.zeros(len(keys), bool)
    repeat[1:] = keys[1:] == keys[:-1]
    return np.sort(positions[repeat])


def remove_paragraphs(texts: Sequence[str], first_ordinal: int, removed: np.ndarray
                      ) -> tuple[list[str], np.ndarray, int]:
    """(`texts` without the paragraphs whose ordinals are in `removed` (sorted uint64), paragraphs removed per text,
    next ordinal). One search for the whole batch: most documents lose nothing and are passed through."""
    base = np.uint64(first_ordinal)
    counts = np.fromiter((text.count("\n") + 1 for text in texts), np.uint64, len(texts))
    ends = np.cumsum(counts, dtype=np.uint64)  # paragraph ordinals relative to first_ordinal
    starts = ends - counts
    lo, hi = np.searchsorted(removed, starts + base), np.searchsorted(removed, ends + base)
    texts = list(texts)
    changed = np.flatnonzero(hi > lo).tolist()
    if changed:
        paragraphs = "\n".join(texts).split("\n")  # every paragraph of the batch, at its relative ordinal
        keep = np.ones(len(paragraphs), bool)
        keep[removed[lo[0]:hi[-1]] - base] = False
        keep = keep.tolist()
        for i in changed:
            a, b = int(starts[i]), int(ends[i])
            texts[i] = "\n".join(compress(paragraphs[a:b], keep[a:b]))
    return texts, hi - lo, first_ordinal + int(counts.sum())


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
