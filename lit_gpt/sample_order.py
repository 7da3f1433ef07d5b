"""The global sample order: position p (0, 1, 2, ... over all epochs) -> sample id, a pure function of
(seed, sample counts per source, weights, epoch), computable for any position in O(1).

Within an epoch of n samples, samples are grouped into blocks of `block` consecutive samples (neighbours on disk,
so reads and node-local caching stay chunk-local). The blocks are permuted, taken `window` blocks at a time, and
the samples inside each window are permuted again; a final partial block closes the epoch. Every permutation is a
keyed Feistel network on [0, n) (cycle walking), so no permutation table is ever built: resuming at position
10**12 costs the same as at 0, and every sample of an epoch appears exactly once before any repeats.

Without weights all sources form one pool (one epoch = every sample once). With weights, positions are cut into
mixing windows of `mix_window` positions, of which source s gets round(w_s * mix_window) (largest remainder) at
keyed-random places; each source runs through its own epochs in the order above.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

_U64 = np.uint64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays: a fast bijective mix with good avalanche."""
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def round_keys(*parts) -> np.ndarray:
    """Four 64-bit Feistel round keys derived from any tuple of ints/strings."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()
    return np.frombuffer(digest, dtype="<u8").astype(_U64)


def permute(x: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, n), applied elementwise to `x` (values in [0, n))."""
    x = np.asarray(x, dtype=_U64)
    if n <= 1:
        return np.zeros_like(x, dtype=np.int64)
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    y = _feistel(x, half, keys)
    outside = np.nonzero(y >= _U64(n))[0]
    while outside.size:  # cycle walking: the domain is at most 4n, so few rounds are needed
        y[outside] = _feistel(y[outside], half, keys)
        outside = outside[y[outside] >= _U64(n)]
    return y.astype(np.int64)


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    shift, mask = _U64(half), _U64((1 << half) - 1)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (splitmix64(right ^ key) & mask)
    return (left << shift) | right


class EpochShuffle:
    """Position k >= 0 -> sample in [0, n); epoch k // n visits every sample once, block-local (see module doc).

    A window's mapping (window x block samples) is computed whole and cached, so consecutive positions cost an
    index lookup; any position still costs O(window x block) at most, never O(n)."""

    def __init__(self, n: int, key: tuple, block: int, window: int) -> None:
        if n < 1:
            raise ValueError("EpochShuffle needs at least one sample")
        self.n, self.key, self.block, self.window = n, key, block, window
        self.full_blocks = n // block
        self.span = window * block  # samples per window
        self.windows = -(-self.full_blocks // window)  # the partial block after them is window number `windows`
        self._tables: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __call__(self, k: np.ndarray) -> np.ndarray:
        k = np.asarray(k, dtype=np.int64)
        epochs, q = np.divmod(k, self.n)
        body_end = self.full_blocks * self.block
        windows = np.where(q >= body_end, self.windows, q // self.span)
        offsets = q - np.minimum(windows * self.span, body_end)  # position within its window's table
        groups = epochs * (self.windows + 1) + windows
        if groups.size and (groups == groups[0]).all():  # the usual case: one window
            return self._table(int(epochs[0]), int(windows[0]))[offsets]
        out = np.empty_like(k)
        for group in np.unique(groups):
            at = np.nonzero(groups == group)[0]
            out[at] = self._table(*divmod(int(group), self.windows + 1))[offsets[at]]
        return out

    def _table(self, epoch: int, window: int) -> np.ndarray:
        """Sample ids of the epoch positions [window * span, ...) of one window (or of the final partial block)."""
        if (epoch, window) in self._tables:
            self._tables.move_to_end((epoch, window))
            return self._tables[(epoch, window)]
        block = self.block
        if window == self.windows:
            first = self.full_blocks * block
            table = first + permute(np.arange(self.n - first), self.n - first, round_keys(*self.key, epoch, "tail"))
        else:
            first_block = window * self.window
            size = min(self.window, self.full_blocks - first_block) * block
            r = permute(np.arange(size), size, round_keys(*self.key, epoch, "window", window))
            blocks = permute(first_block + r // block, self.full_blocks, round_keys(*self.key, epoch, "blocks"))
            table = blocks * block + r % block
        self._tables[(epoch, window)] = table
        if len(self._tables) > 4:
            self._tables.popitem(last=False)
        return table


class SampleOrder:
    """Global position -> global sample id (sources' samples numbered consecutively, source 0 first)."""

    def __init__(self, sizes: Sequence[int], weights: Optional[Sequence[float]], seed: int, block: int = 256,
                 window: int = 64, mix_window: int = 1 << 16) -> None:
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.seed, self.weights, self.mix_window = seed, weights, mix_window
        if weights is None:
            self.pool = EpochShuffle(int(self.offsets[-1]), ("pool", seed), block, window)
            return
        self.shuffles = [EpochShuffle(n, ("source", seed, i), block, window) for i, n in enumerate(self.sizes)]
        self.quotas = _largest_remainder(weights, mix_window)
        self.quota_bounds = np.cumsum(self.quotas)
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if self.weights is None:
            return self.pool(positions)
        windows, j = np.divmod(positions, self.mix_window)
        source = np.empty_like(positions)
        draw = np.empty_like(positions)  # how many earlier positions drew from the same source
        for w in np.unique(windows):
            at = np.nonzero(windows == w)[0]
            labels, ranks = self._mixing_window(int(w))
            source[at] = labels[j[at]]
            draw[at] = int(w) * self.quotas[labels[j[at]]] + ranks[j[at]]
        out = np.empty_like(positions)
        for s in np.unique(source):
            at = np.nonzero(source == s)[0]
            out[at] = self.offsets[s] + self.shuffles[s](draw[at])
        return out

    def _mixing_window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position in window w, its rank among that source's positions in the window)."""
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        slots = permute(np.arange(self.mix_window), self.mix_window, round_keys("mix", self.seed, w))
        labels = np.searchsorted(self.quota_bounds, slots, side="right")
        order = np.argsort(labels, kind="stable")
        first = np.concatenate([[0], self.quota_bounds[:-1]])
        ranks = np.empty(self.mix_window, dtype=np.int64)
        ranks[order] = np.arange(self.mix_window) - first[labels[order]]
        self._windows[w] = (labels, ranks)
        if len(self._windows) > 4:
            self._windows.popitem(last=False)
        return labels, ranks


def _largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    quotas = np.floor(exact).astype(np.int64)
    quotas[np.argsort(-(exact - quotas), kind="stable")[: total - quotas.sum()]] += 1
    return quotas
