"""scripts/prepare_data.py: input formats, ids, the train/val split, chunk files, errors, re-runs and resumption."""
import errno
import json
import os
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import ROOT, write_corpus

sys.path.insert(0, str(ROOT / "scripts"))
import prepare_data  # noqa: E402

from lit_gpt.data_pipeline import packing  # noqa: E402
from lit_gpt.data_pipeline.plan import STAGING, validation_mask  # noqa: E402
from lit_gpt.data_pipeline.prepare import pad_id_for  # noqa: E402
from lit_gpt.tokenizer import Tokenizer  # noqa: E402


def prepare(*args: str) -> int:
    return prepare_data.main([str(a) for a in args])


@contextmanager
def interrupted_at_chunk(n: int):
    """Within the block, prepare_data is interrupted (KeyboardInterrupt, as by Ctrl-C) as it writes its n-th chunk."""
    real_write = packing.Layout.write_chunk
    written = []

    def write_or_interrupt(self, split, c):
        written.append(1)
        if len(written) == n:
            raise KeyboardInterrupt
        return real_write(self, split, c)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(packing.Layout, "write_chunk", write_or_interrupt)
        yield


def read_split(directory: Path) -> tuple[dict, np.ndarray, list[dict]]:
    """(manifest, the real tokens of all chunks concatenated, the chunk indexes), read without our reader."""
    manifest = json.loads((directory / "manifest.json").read_text())
    tokens, indexes = [], []
    for entry in manifest["files"]:
        raw = (directory / entry["name"]).read_bytes()
        magic, version, code, chunk_size = struct.unpack("<7sQBQ", raw[:24])
        assert (magic, version, code) == (b"LITPKDS", 1, 8) and chunk_size == manifest["chunk_size"]
        data = np.frombuffer(raw[24:], dtype=np.uint16)
        assert len(data) == chunk_size
        tokens.append(data[:entry["tokens"]])
        indexes.append(json.loads((directory / "index" / (entry["name"][:-4] + ".json")).read_text()))
    return manifest, np.concatenate(tokens), indexes


def documents(directory: Path) -> dict[str, np.ndarray]:
    """Document id -> its tokens, cut at the boundaries the indexes record."""
    manifest, tokens, indexes = read_split(directory)
    starts, ids, offset = [], [], 0
    for entry, index in zip(manifest["files"], indexes):
        starts.extend(offset + s for s in index["doc_starts"])
        ids.extend(index["doc_ids"])
        offset += entry["tokens"]
    bounds = starts + [len(tokens)]
    return {doc_id: tokens[a:b] for doc_id, a, b in zip(ids, bounds[:-1], bounds[1:])}


@pytest.fixture(scope="module")
def tokenizer_dir(prepared_data) -> Path:
    return prepared_data["tokenizer"]


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One input of every format; returns the folder and the expected {id: text}."""
    d = tmp_path_factory.mktemp("inputs")
    expected = {}
    (d / "essay.txt").write_text("Ein ganzer Aufsatz.\nMit zwei Zeilen und Umlauten: äöü ß.", encoding="utf-8")
    expected["essay.txt"] = "Ein ganzer Aufsatz.\nMit zwei Zeilen und Umlauten: äöü ß."
    records = [{"id": "j1", "text": "Erster JSON-Text."}, {"text": "Ohne id: Datei und Zeile."},
               {"id": 7, "text": "Zahl als id."}]
    (d / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n",
                                     encoding="utf-8")
    expected.update({"j1": "Erster JSON-Text.", "records.jsonl:2": "Ohne id: Datei und Zeile.", "7": "Zahl als id."})
    packed = "".join(json.dumps({"id": f"z{i}", "text": f"Komprimiert Nummer {i}."}) + "\n" for i in range(50))
    (d / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(packed.encode()))
    expected.update({f"z{i}": f"Komprimiert Nummer {i}." for i in range(50)})
    table = pa.table({"text": [f"Parkett {i}." for i in range(30)], "id": [f"p{i}" for i in range(30)]})
    pq.write_table(table, d / "table.parquet", row_group_size=7)
    expected.update({f"p{i}": f"Parkett {i}." for i in range(30)})
    return d, expected


def test_every_format_with_ids_bos_and_eos(mixed_inputs, tokenizer_dir, tmp_path):
    inputs, expected = mixed_inputs
    assert prepare("--input", inputs, "--output_dir", tmp_path, "--tokenizer", tokenizer_dir, "--chunk_size", "64",
                   "--val_fraction", "0", "--workers", "1") == 0
    docs = documents(tmp_path / "train")
    assert set(docs) == set(expected)
    tok = Tokenizer(tokenizer_dir)
    for doc_id, text in expected.items():
        assert docs[doc_id].tolist() == tok.encode(text, bos=True, eos=True), doc_id
    manifest = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert manifest["documents"] == len(expected) and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size and len(manifest["files"]) > 3


def test_txt_docs_per_line(tokenizer_dir, tmp_path):
    (tmp_path / "lines.txt").write_text("erste Zeile\n\nzweite Zeile\n", encoding="utf-8")
    assert prepare("--input", tmp_path / "lines.txt", "--output_dir", tmp_path / "out", "--tokenizer", tokenizer_dir,
                   "--val_fraction", "0", "--txt_docs_per_line", "--no-bos", "--workers", "1") == 0
    docs = documents(tmp_path / "out" / "train")
    tok = Tokenizer(tokenizer_dir)
    assert {k: v.tolist() for k, v in docs.items()} == {"lines.txt:1": tok.encode("erste Zeile", bos=False, eos=True),
                                                        "lines.txt:3": tok.encode("zweite Zeile", bos=False, eos=True)}


def test_split_is_by_id_disjoint_and_independent_of_workers(tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=600, seed=3)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert prepare("--input", corpus, "--output_dir", out, "--tokenizer", tokenizer_dir, "--chunk_size", "2000",
                       "--val_fraction", "0.2", "--workers", str(workers)) == 0
        outs.append(out)
    train, val = documents(outs[0] / "train"), documents(outs[0] / "val")
    assert not set(train) & set(val)
    assert len(train) + len(val) == 600 and 80 < len(val) < 160
    expected_val = {f"doc-{i}" for i in range(600)
                    if validation_mask([f"doc-{i}"], 42, 0.2)[0]}
    assert set(val) == expected_val
    for split in ("train", "val"):  # byte-identical output whatever the number of workers
        hashes = [[f["sha256"] for f in json.loads((o / split / "manifest.json").read_text())["files"]] for o in outs]
        assert hashes[0] == hashes[1]


def test_last_chunk_is_full_size_padded_and_marked(prepared_data):
    directory = prepared_data["train"]
    manifest, tokens, indexes = read_split(directory)
    last = manifest["files"][-1]
    assert last["tokens"] < manifest["chunk_size"] and indexes[-1]["tokens"] == last["tokens"]
    raw = np.frombuffer((directory / last["name"]).read_bytes()[24:], dtype=np.uint16)
    assert len(raw) == manifest["chunk_size"]  # TinyLlama readers index it like any other chunk
    pad = raw[last["tokens"]:]
    assert (pad == manifest["pad_id"]).all() and manifest["pad_id"] not in (1, 2)  # never BOS/EOS separators
    assert tokens[-1] == 2  # the data ends with the last document's EOS
    assert manifest["tokens"] == len(tokens) == sum(f["tokens"] for f in manifest["files"])


def test_malformed_records_stop_or_skip(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "gut"}\n{"text": "auch gut"}\n{"text": kaputt}\n{"txt": "falsches Feld"}\n'
                   '{"text": 42}\n["liste"]\n{"text": "wieder gut"}\n', encoding="utf-8")
    assert prepare("--input", bad, "--output_dir", tmp_path / "a", "--tokenizer", tokenizer_dir, "--workers", "1",
                   "--val_fraction", "0") == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: invalid JSON" in err and "--on_error skip" in err
    assert not (tmp_path / "a" / "train" / "manifest.json").exists()

    assert prepare("--input", bad, "--output_dir", tmp_path / "b", "--tokenizer", tokenizer_dir, "--workers", "2",
                   "--on_error", "skip", "--val_fraction", "0") == 0
    # The stopped run, resumed with --on_error skip, ends the same.
    assert prepare("--input", bad, "--output_dir", tmp_path / "a", "--tokenizer", tokenizer_dir, "--workers", "1",
                   "--on_error", "skip", "--val_fraction", "0") == 0
    assert (tmp_path / "a" / "train" / "manifest.json").read_bytes() == \
        (tmp_path / "b" / "train" / "manifest.json").read_bytes()
    err = capsys.readouterr().err
    assert f"{bad}:4: missing text field 'text'" in err and f"{bad}:5: text field 'text' holds int" in err
    assert f"{bad}:6: record is a JSON list" in err
    manifest = json.loads((tmp_path / "b" / "train" / "manifest.json").read_text())
    assert manifest["skipped_records"] == 4 and manifest["documents"] == 3


def test_corrupt_zstd_is_reported_with_the_file(tokenizer_dir, tmp_path, capsys):
    data = "".join(json.dumps({"text": f"Zeile {i} " * 20}) + "\n" for i in range(2000)).encode()
    compressed = zstandard.ZstdCompressor().compress(data)
    truncated = tmp_path / "truncated.jsonl.zst"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd at all" * 10)
    for path in (truncated, garbage):
        assert prepare("--input", path, "--output_dir", tmp_path / path.stem, "--tokenizer", tokenizer_dir,
                       "--workers", "1") == 2
        err = capsys.readouterr().err
        assert str(path) in err and "zstd" in err
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "noch da"}\n', encoding="utf-8")
    assert prepare("--input", truncated, good, "--output_dir", tmp_path / "skip", "--tokenizer", tokenizer_dir,
                   "--workers", "1", "--on_error", "skip", "--val_fraction", "0") == 0
    assert "good.jsonl:1" in documents(tmp_path / "skip" / "train")


def test_rerun_skips_finished_output(prepared_data, capsys):
    data = prepared_data["train"].parent
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    assert prepare("--input", prepared_data["corpus"], "--output_dir", data, "--tokenizer", prepared_data["tokenizer"],
                   "--chunk_size", "4096", "--val_fraction", "0.1", "--workers", "1") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()} == before


def test_interrupted_run_resumes_to_identical_output(tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=500, seed=5)
    args = ["--input", corpus, "--tokenizer", tokenizer_dir, "--chunk_size", "1500", "--val_fraction", "0.1",
            "--workers", "1", "--shard_mb", "0.01"]
    assert prepare(*args, "--output_dir", tmp_path / "clean") == 0

    out = tmp_path / "crashed"
    with interrupted_at_chunk(8):
        prepare(*args, "--output_dir", out)
    assert not (out / "train" / "manifest.json").exists()
    for chunk in out.rglob("*.bin"):  # everything under a final name is complete
        if chunk.parent.name in ("train", "val"):
            assert chunk.stat().st_size == 24 + 2 * 1500
    assert prepare(*args, "--output_dir", out) == 0
    assert not list(out.rglob(".*.tmp")) and not (out / STAGING).exists()
    for split in ("train", "val"):
        clean = json.loads((tmp_path / "clean" / split / "manifest.json").read_text())
        resumed = json.loads((out / split / "manifest.json").read_text())
        assert resumed["files"] == clean["files"]


def test_refuses_foreign_output_and_bad_flags(tokenizer_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "train_0000000000.bin").write_bytes(b"x")
    assert prepare("--input", corpus, "--output_dir", tmp_path / "out", "--tokenizer", tokenizer_dir) == 2
    assert "--output_dir" in capsys.readouterr().err
    assert prepare("--input", corpus, "--output_dir", tmp_path / "out", "--tokenizer", tokenizer_dir,
                   "--overwrite", "--workers", "1") == 0
    (tmp_path / "loop").symlink_to("loop")
    capsys.readouterr()
    for flag, value in [("--val_fraction", "1.5"), ("--chunk_size", "0"), ("--tokenizer", str(tmp_path / "nope")),
                        ("--shard_mb", "nan"), ("--shard_mb", "inf"), ("--output_dir", str(tmp_path / "loop")),
                        ("--output_dir", str(tmp_path / "loop" / "data"))]:
        argv = {"--input": str(corpus), "--output_dir": str(tmp_path / "o2"), "--tokenizer": str(tokenizer_dir),
                flag: value}
        assert prepare(*[x for kv in argv.items() for x in kv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag}") and err.count("\n") == 1, err


@pytest.mark.parametrize("lines", [
    ['{"id": "a", "text": "Grüße 😀 \\u00e4\\ud83d\\ude00", "extra": {"x": [1, 2]}}', '{"text": "ohne id"}'],
    ['{"id": 5, "text": "Zahl"}', '{"id": 123456789012, "text": "groß"}', '{"text": "", "id": null}'],
    ['{"text": "a\\nb\\tc  d"}\r', '{"text": "CRLF-Zeilen"}\r'],
])
def test_fast_json_path_agrees_with_the_line_by_line_path(lines, tmp_path):
    from lit_gpt import corpus

    path = tmp_path / "x.jsonl"
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    unit = corpus.Unit(0, 0, "lines", 7, payload, len(payload))
    fast = corpus._parse_json_lines_fast(unit, "x.jsonl", "text", "id")
    assert fast is not None
    assert tuple(fast) == corpus._parse_lines(unit, path, "x.jsonl", True, "text", "id")[:2]


def test_lone_surrogate_escapes_are_malformed_records(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "surrogates.jsonl"  # JSON can escape half of a UTF-16 pair; such a string is no Unicode text
    bad.write_text('{"id": "a", "text": "x\\ud800y"}\n{"id": "b\\udc00", "text": "gut"}\n{"id": "c", "text": "gut"}\n',
                   encoding="utf-8")
    for workers in ("1", "2"):
        assert prepare("--input", bad, "--output_dir", tmp_path / f"stop{workers}", "--tokenizer", tokenizer_dir,
                       "--workers", workers) == 2
        assert f"{bad}:1: text field 'text' holds a lone UTF-16 surrogate" in capsys.readouterr().err
    assert prepare("--input", bad, "--output_dir", tmp_path / "skip", "--tokenizer", tokenizer_dir, "--workers", "1",
                   "--on_error", "skip", "--val_fraction", "0") == 0
    assert f"{bad}:2: id field 'id' holds a lone UTF-16 surrogate" in capsys.readouterr().err
    assert list(documents(tmp_path / "skip" / "train")) == ["c"]


@pytest.mark.parametrize("content", ["", "\n\n  \n", '{"text": ""}\n'])
def test_input_without_documents_is_an_error(tokenizer_dir, tmp_path, capsys, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content, encoding="utf-8")
    assert prepare("--input", empty, "--output_dir", tmp_path / "out", "--tokenizer", tokenizer_dir,
                   "--workers", "1") == 2  # not an empty dataset that the trainer rejects much later
    assert "--input: no documents" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


def test_padding_is_never_a_separator():
    from types import SimpleNamespace

    neox_like = SimpleNamespace(pad_id=None, unk_id=0, bos_id=0, eos_id=0)  # one id for unk, BOS and EOS
    assert pad_id_for(neox_like) == 1
    assert pad_id_for(SimpleNamespace(pad_id=None, unk_id=None, bos_id=1, eos_id=0)) == 2
    assert pad_id_for(SimpleNamespace(pad_id=5, unk_id=0, bos_id=1, eos_id=2)) == 5


def test_node_cache_never_serves_a_copy_of_an_older_version(tmp_path):
    from lit_gpt.litpkds import encode_header
    from lit_gpt.node_cache import NodeCache

    source = tmp_path / "data" / "train_0000000000.bin"
    source.parent.mkdir()
    source.write_bytes(encode_header(np.uint16, 8) + np.arange(8, dtype=np.uint16).tobytes())
    cache = NodeCache(tmp_path / "shm", max_bytes=10**6)
    assert cache.copy(source) and cache.path(source) != source
    # Re-prepared data: same name and size (every chunk has the full size), other tokens, a later mtime.
    source.write_bytes(encode_header(np.uint16, 8) + np.arange(8, 16, dtype=np.uint16).tobytes())
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert cache.path(source) == source
    assert cache.copy(source) and cache.path(source).read_bytes() == source.read_bytes()


def test_output_dir_that_is_a_file_is_one_clear_error(tokenizer_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=5)
    (tmp_path / "file").write_text("x")
    assert prepare("--input", corpus, "--output_dir", tmp_path / "file", "--tokenizer", tokenizer_dir) == 2
    assert "--output_dir" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tokenizer_dir, tmp_path):
    from lit_gpt.packed_dataset import PackedDataset

    corpus = write_corpus(tmp_path / "corpus", n_docs=300, seed=7)
    out = tmp_path / "data"
    base = ["--input", corpus, "--output_dir", out, "--tokenizer", tokenizer_dir, "--workers", "1"]
    assert prepare(*base, "--chunk_size", "4000") == 0
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with interrupted_at_chunk(3):
        prepare(*base, "--chunk_size", "1000", "--overwrite")
    # The interrupted replacement left the old dataset exactly as it was, and readable.
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and STAGING not in
            p.parts} == old
    assert PackedDataset([out / "train"], block_size=64).samples_per_epoch > 0
    assert prepare(*base, "--chunk_size", "1000", "--overwrite") == 0
    assert json.loads((out / "train" / "manifest.json").read_text())["chunk_size"] == 1000
    assert not (out / STAGING).exists()


@pytest.mark.parametrize("argv", [["--help"], ["--output_dir", "x", "--workers", "many"]])
def test_help_and_bad_flags_load_neither_torch_nor_datatrove(argv):
    import subprocess

    probe = ("import sys, runpy\n"
             "class Refuse:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'datatrove', 'lit_gpt'):\n"
             "            raise ImportError(f'{name} imported while parsing flags')\n"
             "sys.meta_path.insert(0, Refuse())\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", probe, str(ROOT / "scripts" / "prepare_data.py"), *argv],
                            capture_output=True, text=True, timeout=60)
    assert "imported while parsing" not in result.stderr
    if argv == ["--help"]:
        assert result.returncode == 0 and "--slurm_args" in result.stdout
    else:
        assert result.returncode == 2 and "--workers: invalid int value" in result.stderr


@pytest.mark.parametrize("stage", ["task", "finalize"])
def test_overwrite_on_a_full_disk_is_one_error_and_keeps_the_old_dataset(tokenizer_dir, tmp_path, capsys, stage):
    corpus = write_corpus(tmp_path / "corpus", n_docs=200, seed=3)
    out = tmp_path / "data"
    base = ["--input", corpus, "--output_dir", out, "--tokenizer", tokenizer_dir, "--workers", "1"]
    assert prepare(*base, "--chunk_size", "4000") == 0
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    # A tokenizing task's part file, or a chunk of the finished dataset, meets a full disk.
    target, method = (packing.PartWriter, "add") if stage == "task" else (packing.Layout, "write_chunk")

    def full(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / STAGING / "somewhere"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(target, method, full)
        assert prepare(*base, "--chunk_size", "1000", "--overwrite") == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --output_dir {out}: No space left on device (writing {out / STAGING / 'somewhere'}); "
                      f"the data in place is kept, and a re-run continues the work done"], err
    assert "Traceback" not in err, err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and STAGING not in
            p.parts} == old
    assert prepare(*base, "--chunk_size", "1000", "--overwrite") == 0  # space again: the new dataset
    assert json.loads((out / "train" / "manifest.json").read_text())["chunk_size"] == 1000
