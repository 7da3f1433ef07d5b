"""Reading LITPKDS chunks, the global sample order, StepLoader and the node-local cache."""
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_gpt import packed_dataset
from lit_gpt.node_cache import NodeCache
from lit_gpt.packed_dataset import PackedDataset, StepLoader


def write_litpkds(path: Path, tokens, code: int = 8, chunk_size=None, magic: bytes = b"LITPKDS") -> None:
    """An independent minimal writer, straight from the header spec."""
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
    data = np.asarray(tokens, dtype=dtypes.get(code, np.uint16))
    header = magic + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", chunk_size or len(data))
    path.write_bytes(header + data.tobytes(order="C"))


@pytest.fixture
def tinyllama_dir(tmp_path) -> tuple[Path, np.ndarray]:
    """Three TinyLlama-style chunks (no manifest, no index), 3 x 100 tokens."""
    stream = np.arange(300) % 1000 + 7
    for i in range(3):
        write_litpkds(tmp_path / f"train_slim_{i:010d}.bin", stream[i * 100:(i + 1) * 100])
    return tmp_path, stream


def all_samples(ds: PackedDataset) -> dict[int, dict]:
    batch = ds.get_batch(np.arange(ds.samples_per_epoch))
    return {i: {k: v[i] for k, v in batch.items()} for i in range(ds.samples_per_epoch)}


def test_reads_chunks_of_an_independent_writer(tinyllama_dir):
    directory, stream = tinyllama_dir
    ds = PackedDataset([directory], block_size=15, seed=1)  # samples of 16 tokens, spanning chunk boundaries
    assert ds.samples_per_epoch == 19  # 18 full windows + a padded one of 12 tokens
    for i, sample in all_samples(ds).items():
        window = stream[i * 16:(i + 1) * 16]
        n = len(window)
        assert sample["input_ids"][: n - 1].tolist() == window[:-1].tolist()
        assert sample["labels"][: n - 1].tolist() == window[1:].tolist()
        assert (sample["labels"][n - 1:] == -100).all() and int(sample["sample_index"]) == i


def test_int32_chunks_and_other_dtypes(tmp_path):
    write_litpkds(tmp_path / "a_0000000000.bin", [70000, 70001, 70002, 5], code=4)
    ds = PackedDataset(tmp_path, block_size=3)
    assert ds.get_batch([0])["input_ids"].tolist() == [[70000, 70001, 70002]]


@pytest.mark.parametrize("defect, message", [
    ("truncated", "file has"), ("short_header", "truncated LITPKDS header"), ("magic", "not a LITPKDS chunk"),
    ("dtype", "unknown dtype code 9"), ("size", "header promises"), ("float", "cannot hold token ids")])
def test_corrupt_chunk_is_one_clear_error_naming_the_file(tinyllama_dir, defect, message):
    directory, _ = tinyllama_dir
    bad = directory / "train_slim_0000000001.bin"
    if defect == "truncated":
        bad.write_bytes(bad.read_bytes()[:-10])
    elif defect == "short_header":
        bad.write_bytes(b"LITPKDS\x01")
    elif defect == "magic":
        write_litpkds(bad, range(100), magic=b"NOTPKDS")
    elif defect == "dtype":
        write_litpkds(bad, range(100), code=9)
    elif defect == "size":
        write_litpkds(bad, range(100), chunk_size=120)
    else:
        bad.write_bytes(b"LITPKDS" + struct.pack("<QBQ", 1, 6, 100) + np.zeros(100, np.float32).tobytes())
    with pytest.raises(ValueError, match=message) as info:
        PackedDataset([directory], block_size=8)
    assert str(bad) in str(info.value)


def test_missing_empty_or_unfinished_directories(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PackedDataset([tmp_path / "nope"], block_size=8)
    with pytest.raises(ValueError, match=f"{tmp_path}: no chunk files"):
        PackedDataset([tmp_path], block_size=8)
    write_litpkds(tmp_path / "x_0000000000.bin", range(10))
    (tmp_path / "index").mkdir()
    with pytest.raises(ValueError, match="did not finish"):
        PackedDataset([tmp_path], block_size=8)


def test_prepared_data_round_trip_with_a_tinyllama_style_reader(prepared_data):
    """Our chunks read the TinyLlama way (header, memmap at offset 24) give our samples' tokens."""
    directory = prepared_data["train"]
    manifest = json.loads((directory / "manifest.json").read_text())
    stream = []
    for entry in manifest["files"]:
        with open(directory / entry["name"], "rb") as f:
            magic, version, code, chunk_size = struct.unpack("<7sQBQ", f.read(24))
        mm = np.memmap(directory / entry["name"], mode="r", dtype=np.uint16, offset=24)
        assert len(mm) == chunk_size
        stream.append(np.asarray(mm[:entry["tokens"]]))
    stream = np.concatenate(stream)
    ds = PackedDataset([directory], block_size=63)
    batch = ds.get_batch([0, 5, ds.samples_per_epoch - 1])
    assert batch["input_ids"][1].tolist() == stream[5 * 64:5 * 64 + 63].tolist()
    tail = stream[(ds.samples_per_epoch - 1) * 64:]
    assert batch["input_ids"][2, :len(tail)].tolist() == tail.tolist()
    assert (batch["labels"][2] != -100).sum() == len(tail) - 1  # only the padding is masked


def test_doc_ids_change_exactly_at_document_starts(prepared_data):
    ds = PackedDataset([prepared_data["train"]], block_size=127, with_doc_ids=True)
    bos = 1  # every document starts with BOS (prepare_data's default)
    batch = ds.get_batch(np.arange(ds.samples_per_epoch))
    ids, docs, labels = batch["input_ids"], batch["doc_ids"], batch["labels"]
    changes = torch.zeros_like(docs, dtype=torch.bool)
    changes[:, 1:] = docs[:, 1:] != docs[:, :-1]
    real = labels != -100
    assert torch.equal(changes[:, 1:] & real[:, 1:], (ids[:, 1:] == bos) & real[:, 1:])
    with pytest.raises(ValueError, match="no document index"):
        PackedDataset([tmp for tmp in [prepared_data["train"]]] + [_tinyllama_copy(prepared_data)], block_size=8,
                      with_doc_ids=True)


def _tinyllama_copy(prepared_data) -> Path:
    target = prepared_data["train"].parent / "tinyllama_style"
    target.mkdir(exist_ok=True)
    first = sorted(prepared_data["train"].glob("*.bin"))[0]
    (target / first.name).write_bytes(first.read_bytes())
    return target


# ------------------------------------------------------------------ the global order
@pytest.fixture
def order_data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(7):
        write_litpkds(tmp_path / f"c_{i:010d}.bin", rng.integers(3, 500, size=1000))
    return tmp_path  # 7000 tokens: 437 samples of 16 tokens and a padded one of 8


def step_samples(ds, G, b, W, steps, start=0, num_workers=0) -> list[list[int]]:
    """Per step, the concatenation of all ranks' sample indices (rank order)."""
    per_rank = []
    for rank in range(W):
        loader = StepLoader(ds, G, b, rank=rank, world_size=W, start_step=start, num_workers=num_workers)
        seen = []
        for (step, micro_batches), _ in zip(loader, range(steps)):
            assert len(micro_batches) == G // (W * b) and all(mb["input_ids"].shape == (b, 15) for mb in micro_batches)
            seen.append((step, torch.cat([mb["sample_index"] for mb in micro_batches]).tolist()))
        per_rank.append(seen)
    assert all(s == start + i for seen in per_rank for i, (s, _) in enumerate(seen))
    return [sum((per_rank[r][i][1] for r in range(W)), []) for i in range(steps)]


def test_order_independent_of_world_size_and_workers(order_data):
    ds = PackedDataset([order_data], block_size=15, seed=3)
    reference = step_samples(ds, 8, 2, 1, steps=6)
    assert step_samples(ds, 8, 2, 2, steps=6) == reference
    assert step_samples(ds, 8, 1, 4, steps=6) == reference
    assert step_samples(ds, 8, 2, 2, steps=6, num_workers=2) == reference
    assert step_samples(PackedDataset([order_data], block_size=15, seed=4), 8, 2, 1, steps=6) != reference


def test_reading_in_groups_of_steps_changes_nothing(order_data, monkeypatch):
    # The loader reads ~GROUP_TOKENS tokens of steps at a time; with groups of 3 steps, runs of 7 steps starting off a
    # group boundary cross two boundaries, in process and in workers.
    ds = PackedDataset([order_data], block_size=15, seed=3)
    reference = step_samples(ds, 8, 2, 1, steps=12)
    monkeypatch.setattr(packed_dataset, "GROUP_TOKENS", 3 * 8 * 16)
    assert StepLoader(ds, 8, 2).group_steps == 3
    for workers in (0, 2):
        assert step_samples(ds, 8, 2, 1, steps=12, num_workers=workers) == reference
        assert step_samples(ds, 8, 2, 2, steps=7, start=5, num_workers=workers) == reference[5:]
    cached = PackedDataset([order_data], block_size=15, seed=3, cache_dir=order_data / "cache", cache_max_bytes=10**8)
    assert step_samples(cached, 8, 2, 1, steps=12) == reference
    cached.cache.wait()  # the chunks of the groups read (and of the next ones) were hinted and copied
    used = cached.chunk_paths(np.array(sum(reference, [])))
    assert used and all(cached.cache.path(path) != path for path in used)
    cached.cache.close()


def test_resume_gives_the_remaining_order_in_constant_time(order_data):
    ds = PackedDataset([order_data], block_size=15, seed=3)
    uninterrupted = step_samples(ds, 8, 2, 1, steps=12)
    assert step_samples(ds, 8, 2, 1, steps=7, start=5) == uninterrupted[5:]
    assert step_samples(ds, 8, 4, 2, steps=7, start=5) == uninterrupted[5:]  # elastic: other world size
    start = time.perf_counter()
    step, batches = next(iter(StepLoader(ds, 1024, 8, rank=3, world_size=8, start_step=10**6)))
    assert step == 10**6 and time.perf_counter() - start < 1.0


def test_every_sample_once_per_epoch(order_data):
    ds = PackedDataset([order_data], block_size=15, seed=3)
    n = ds.samples_per_epoch
    order = ds.sample_ids(np.arange(3 * n))
    for epoch in range(3):
        assert sorted(order[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])  # a new shuffle each epoch
    loader = StepLoader(ds, 16, 4, rank=1, world_size=2)
    assert np.array_equal(np.concatenate([mb["sample_index"] for mb in next(iter(loader))[1]]), order[8:16])


def test_weighted_mixture(order_data, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    write_litpkds(small / "s_0000000000.bin", np.arange(800) % 300 + 3)  # 50 samples
    ds = PackedDataset([order_data, small], weights=[3, 1], block_size=15, seed=9)
    ids = ds.sample_ids(np.arange(40000))
    big = ds.sample_offsets[1]
    assert big == 438 and ds.samples_per_epoch == 488
    from_small = ids >= big
    assert abs(from_small.mean() - 0.25) < 0.01
    small_ids = ids[from_small] - big
    for epoch in range(len(small_ids) // 50):  # each source runs through complete epochs
        assert sorted(small_ids[epoch * 50:(epoch + 1) * 50].tolist()) == list(range(50))
    big_ids = ids[~from_small]
    assert sorted(big_ids[:438].tolist()) == list(range(438))
    with pytest.raises(ValueError, match="weights"):
        PackedDataset([order_data, small], weights=[1, 0], block_size=15)


def test_weighted_mixing_carries_the_rounding_over_windows():
    """A share below half a sample per mixing window used to round to nothing in every window (the source was never
    read), and every window rounded the same way (the proportions drifted). Sizes 1 vs 10**6 samples."""
    from lit_gpt.sample_order import SampleOrder
    for sizes, weights, M, windows in [([1, 10**6], [1e-6, 1], 1 << 16, 31), ([10, 20, 30], [0.1, 0.2, 0.7], 7, 300),
                                       ([5, 1000, 3], [1, 1, 1], 1024, 20)]:
        order = SampleOrder(sizes, weights, seed=0, mix_window=M)
        ids = order(np.arange(windows * M))
        source = np.searchsorted(order.offsets, ids, side="right") - 1
        share = np.asarray(weights) / sum(weights)
        for s, n in enumerate(sizes):
            for w in range(1, windows + 1):  # the draws so far, within the number of sources of the exact share
                assert abs((source[:w * M] == s).sum() - share[s] * w * M) <= len(sizes)
            local = ids[source == s] - order.offsets[s]
            epochs = np.sort(local[:len(local) // n * n].reshape(-1, n), axis=1)  # each source: complete epochs
            assert len(epochs) >= 2 and (epochs == np.arange(n)).all()
        positions = np.array([M - 2, M - 1, M, 3 * M - 1, 3 * M + 1, windows * M - 1])  # any position alone
        assert np.array_equal(SampleOrder(sizes, weights, seed=0, mix_window=M)(positions), ids[positions])
    with pytest.raises(ValueError, match="too small"):
        SampleOrder([1, 10], [1e-30, 1], seed=0)


def test_step_loader_rejects_indivisible_batches(order_data):
    ds = PackedDataset([order_data], block_size=15)
    with pytest.raises(ValueError, match="global_batch_size 10 .* micro_batch_size 2 .* devices 3"):
        StepLoader(ds, 10, 2, world_size=3)


# ------------------------------------------------------------------ node-local cache
def test_node_cache_copies_verifies_and_evicts_oldest(order_data, tmp_path):
    chunks = sorted(order_data.glob("*.bin"))
    size = chunks[0].stat().st_size
    cache = NodeCache(tmp_path / "cache", max_bytes=3 * size)
    assert cache.path(chunks[0]) == chunks[0]  # nothing cached yet: the source
    cache.prefetch(chunks[:2])
    cache.wait()
    assert cache.path(chunks[0]) != chunks[0] and cache.path(chunks[0]).read_bytes() == chunks[0].read_bytes()
    time.sleep(0.01)
    cache.prefetch(chunks[2:5])  # room for three: the two oldest go
    cache.wait()
    assert [cache.path(c) == c for c in chunks[:5]] == [True, True, False, False, False]
    # A damaged copy (wrong size) is never read; too-big files are not cached.
    cache.cached_name(chunks[3]).write_bytes(b"LITPKDS")
    assert cache.path(chunks[3]) == chunks[3]
    assert not NodeCache(tmp_path / "tiny", max_bytes=size - 1).copy(chunks[0])
    cache.close()


def test_node_cache_falls_back_when_broken(order_data, tmp_path, capsys):
    (tmp_path / "not_a_dir").write_text("x")
    cache = NodeCache(tmp_path / "not_a_dir" / "cache", max_bytes=10**9)
    assert cache.broken and "node cache disabled" in capsys.readouterr().err
    chunk = sorted(order_data.glob("*.bin"))[0]
    cache.prefetch([chunk])
    assert cache.path(chunk) == chunk
    bogus = tmp_path / "bogus_0000000000.bin"  # a source that is not a chunk is never cached
    bogus.write_bytes(b"nonsense" * 10)
    other = NodeCache(tmp_path / "c2")
    assert not other.copy(bogus) and other.path(bogus) == bogus


def test_loader_with_node_cache_matches_without(order_data, tmp_path):
    plain = PackedDataset([order_data], block_size=15, seed=2)
    cached = PackedDataset([order_data], block_size=15, seed=2, cache_dir=tmp_path / "shm", cache_max_bytes=10**8)
    for (_, a), (_, b), _ in zip(StepLoader(plain, 64, 8), StepLoader(cached, 64, 8), range(5)):
        for x, y in zip(a, b):
            assert all(torch.equal(x[k], y[k]) for k in x)
    cached.cache.wait()
    copies = list((tmp_path / "shm").rglob("*.bin"))
    assert copies and all(c.stat().st_size == (order_data / c.name).stat().st_size for c in copies)
    cached.cache.close()
