"""The global sample order: position p (0, 1, 2, ... over all epochs) -> sample id, a pure function of
(seed, sample counts per source, weights, epoch), computable for any position in O(1).

Within an epoch of n samples, samples are grouped into blocks of `block` consecutive samples (neighbours on disk,
so reads and node-local caching stay chunk-local). The blocks are permuted, taken `window` blocks at a time, and
the samples inside each window are permuted again; a final partial block closes the epoch. Every permutation is a
keyed Feistel network on [0, n) (cycle walking), so no permutation table is ever built: resuming at position
10**12 costs the same as at 0, and every sample of an epoch appears exactly once before any repeats.

Without weights all sources form one pool (one epoch = every sample once). With weights, positions are cut into
mixing windows of about `mix_window` positions; source s gets its share w_s (normalised) of every window, rounded
so that the rounding carries over from window to window (before window w it has drawn floor(w * w_s * mix_window)
samples, w_s to 2^-24 of a sample), at keyed-random places in the window; each source runs through its own epochs in the order above. Rounding each
window alone would drift by the same remainder every window and give a source with w_s * mix_window < 0.5 nothing.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

_U64 = np.uint64
_RATE_BITS = 24  # resolution of the mixing shares: 2^-24 of a sample per window


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

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None, seed: int, block: int = 256,
                 window: int = 64, mix_window: int = 1 << 16) -> None:
        self.sizes = [int(s) for s in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.seed, self.weights, self.mix_window = seed, weights, mix_window
        if weights is None:
            self.pool = EpochShuffle(int(self.offsets[-1]), ("pool", seed), block, window)
            return
        self.shuffles = [EpochShuffle(n, ("source", seed, i), block, window) for i, n in enumerate(self.sizes)]
        if mix_window < len(self.sizes):
            raise ValueError(f"mix_window {mix_window}: must be at least the number of sources ({len(self.sizes)})")
        # Draws per 2^_RATE_BITS windows (exact integers summing to mix_window << _RATE_BITS): source s has drawn
        # (w * rates[s]) >> _RATE_BITS samples before window w, so rounding never accumulates across windows.
        self.rates = [int(r) for r in _largest_remainder(weights, mix_window << _RATE_BITS)]
        if 0 in self.rates:
            raise ValueError(f"weights {list(weights)}: source {self.rates.index(0)}'s share is too small to mix")
        self._windows: OrderedDict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if self.weights is None:
            return self.pool(positions)
        # Window w starts at sum_s drawn_s(w), in (w * mix_window - len(sources), w * mix_window]: a position
        # belongs to window p // mix_window or, in its last few positions, to the next one.
        windows = positions // self.mix_window
        for w in np.unique(windows):
            at = np.nonzero(windows == w)[0]
            windows[at] += positions[at] >= int(self._drawn(int(w) + 1).sum())
        source = np.empty_like(positions)
        draw = np.empty_like(positions)  # how many earlier positions drew from the same source
        for w in np.unique(windows):
            at = np.nonzero(windows == w)[0]
            start, drawn, labels, ranks = self._mixing_window(int(w))
            j = positions[at] - start
            source[at] = labels[j]
            draw[at] = drawn[labels[j]] + ranks[j]
        out = np.empty_like(positions)
        for s in np.unique(source):
            at = np.nonzero(source == s)[0]
            out[at] = self.offsets[s] + self.shuffles[s](draw[at])
        return out

    def _drawn(self, w: int) -> np.ndarray:
        """Samples each source drew before window w (Python ints: w * rate overflows int64)."""
        return np.array([(w * r) >> _RATE_BITS for r in self.rates], dtype=np.int64)

    def _mixing_window(self, w: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """(first position of window w, samples each source drew before it, source of each position in the window,
        its rank among that source's positions in the window)."""
        if w in self._windows:
            self._windows.move_to_end(w)
            return self._windows[w]
        drawn = self._drawn(w)
        bounds = np.cumsum(self._drawn(w + 1) - drawn)
        size = int(bounds[-1])
        slots = permute(np.arange(size), size, round_keys("mix", self.seed, w))
        labels = np.searchsorted(bounds, slots, side="right")
        order = np.argsort(labels, kind="stable")
        first = np.concatenate([[0], bounds[:-1]])
        ranks = np.empty(size, dtype=np.int64)
        ranks[order] = np.arange(size) - first[labels[order]]
        self._windows[w] = (int(drawn.sum()), drawn, labels, ranks)
        if len(self._windows) > 4:
            self._windows.popitem(last=False)
        return self._windows[w]


def _largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    quotas = np.floor(exact).astype(np.int64)
    quotas[np.argsort(-(exact - quotas), kind="stable")[: total - quotas.sum()]] += 1
    return quotas
