"""Chunk contents are checked: token ids against the vocabulary when a chunk is opened, bytes against the manifest's
sha256 (`--verify_data`, and every copy the node cache makes). Each error names the chunk and what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_packed_dataset import write_litpkds

from lit_gpt.litpkds import HEADER_SIZE, ChunkFormatError
from lit_gpt.node_cache import NodeCache
from lit_gpt.packed_dataset import PackedDataset, StepLoader


@pytest.fixture
def data_copy(prepared_data, tmp_path) -> Path:
    """A private copy of the prepared train split (tokenizer vocab 512, uint16 tokens) to damage."""
    return Path(shutil.copytree(prepared_data["train"], tmp_path / "train"))


def set_token(chunk: Path, position: int, value: int) -> None:
    with open(chunk, "r+b") as f:
        f.seek(HEADER_SIZE + 2 * position)
        f.write(np.uint16(value).tobytes())


def first_chunk(directory: Path) -> Path:
    return directory / json.loads((directory / "manifest.json").read_text())["files"][0]["name"]


def read_everything(ds: PackedDataset) -> None:
    ds.get_batch(np.arange(ds.samples_per_epoch))


def test_token_ids_beyond_the_model_vocab_name_the_chunk(tmp_path):
    write_litpkds(tmp_path / "x_0000000000.bin", np.arange(100) + 5)
    write_litpkds(tmp_path / "x_0000000001.bin", [40123] + list(range(99)))  # another tokenizer's ids
    ds = PackedDataset([tmp_path], block_size=9, vocab_size=32010)
    ds.get_batch([0, 1])  # samples of the first chunk only
    with pytest.raises(ChunkFormatError) as info:
        read_everything(ds)
    assert str(info.value) == (f"{tmp_path / 'x_0000000001.bin'}: token id 40123 >= vocab_size 32010 (the model's): "
                               f"data made with another tokenizer, or damaged?")
    read_everything(PackedDataset([tmp_path], block_size=9, vocab_size=40124))  # below the limit: fine


def test_signed_chunks_with_negative_ids_name_the_chunk(tmp_path):
    write_litpkds(tmp_path / "x_0000000000.bin", [3, 4, -7, 5], code=4)
    with pytest.raises(ChunkFormatError, match="x_0000000000.bin: negative token id -7"):
        read_everything(PackedDataset([tmp_path], block_size=3, vocab_size=100))


def test_data_of_a_larger_tokenizer_than_the_model_is_refused_up_front(data_copy):
    with pytest.raises(ValueError) as info:
        PackedDataset([data_copy], block_size=63, vocab_size=300)
    assert str(info.value).startswith(f"{data_copy / 'manifest.json'}: the data was made with a tokenizer of 512 "
                                      f"tokens, more than the model's vocab_size 300")


def test_flipped_token_bytes_name_the_chunk(data_copy):
    chunk = first_chunk(data_copy)
    set_token(chunk, 10, 0xFFFF)
    ds = PackedDataset([data_copy], block_size=63, vocab_size=32000)  # the manifest's 512 is the tighter limit
    with pytest.raises(ChunkFormatError, match=f"^{chunk}: token id 65535 >= vocab_size 512 \\(the tokenizer's, says "
                                               f"manifest.json\\)"):
        ds.get_batch([0])


def test_verify_checksums_finds_damage_that_stays_inside_the_vocabulary(data_copy):
    assert PackedDataset([data_copy], block_size=63).verify_checksums() == len(list(data_copy.glob("*.bin")))
    chunk = first_chunk(data_copy)
    set_token(chunk, 10, 7)  # a valid id: only the hash can tell
    ds = PackedDataset([data_copy], block_size=63, vocab_size=512)
    ds.get_batch([0])
    with pytest.raises(ChunkFormatError, match=f"^{chunk}: damaged \\(its sha256 differs from the one in manifest.json\\)$"):
        ds.verify_checksums()


def test_node_cache_refuses_a_damaged_chunk(data_copy, tmp_path):
    chunk = first_chunk(data_copy)
    set_token(chunk, 10, 7)
    ds = PackedDataset([data_copy], block_size=63, cache_dir=tmp_path / "shm", cache_max_bytes=10**8)
    others = [c for c in sorted(data_copy.glob("*.bin")) if c != chunk]
    assert all(ds.cache.copy(c) for c in others)  # intact chunks are cached
    assert not ds.cache.copy(chunk)
    assert not ds.cache.cached_name(chunk).exists()
    with pytest.raises(ChunkFormatError, match=f"^{chunk}: damaged"):
        ds.cache.path(chunk)
    with pytest.raises(ChunkFormatError, match=f"^{chunk}: damaged"):
        next(iter(StepLoader(ds, 8, 2)))  # the loader's next prefetch reports it
    ds.cache.close()


def test_node_cache_without_a_manifest_copies_as_before(tmp_path):
    write_litpkds(tmp_path / "x_0000000000.bin", np.arange(100))
    cache = NodeCache(tmp_path / "cache")
    assert cache.copy(tmp_path / "x_0000000000.bin")
    assert cache.path(tmp_path / "x_0000000000.bin").read_bytes() == (tmp_path / "x_0000000000.bin").read_bytes()


# ------------------------------------------------------------------ the trainer
def trainer_errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_trainer_verify_data_stops_before_training(prepared_data, data_copy, tmp_path):
    from test_trainer import train

    chunk = first_chunk(data_copy)
    set_token(chunk, 10, 7)
    out = tmp_path / "out"
    result = train({**prepared_data, "train": data_copy}, out, check=False, verify_data="true")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = trainer_errors(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: --train_data_dir: {chunk}: damaged"), result.stderr
    assert not (out / "metrics.jsonl").exists() and not list(out.glob("iter-*"))


@pytest.mark.slow
def test_trainer_refuses_data_of_another_tokenizer(prepared_data, tmp_path):
    from test_trainer import train

    # Before: an IndexError in the embedding mid-run, after checkpoints had been written, naming no file.
    result = train(prepared_data, tmp_path, check=False, tokenizer_path="", vocab_size=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = trainer_errors(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: --train_data_dir: {prepared_data['train']}"), result.stderr
    assert "tokenizer of 512 tokens, more than the model's vocab_size 300" in errors[0]
