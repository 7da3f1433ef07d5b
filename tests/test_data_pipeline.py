"""The datatrove data pipeline: shards, paragraph dedup, the token-ratio filter, task-count independence, restarts,
the atomic switch under a kill at every boundary, invalid UTF-8 and the tokenizer record."""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import ROOT, write_corpus
from test_prepare_data import documents, prepare

sys.path.insert(0, str(ROOT / "scripts"))
import train_tokenizer  # noqa: E402

from lit_gpt import cleaning, corpus  # noqa: E402
from lit_gpt.data_pipeline import switch  # noqa: E402
from lit_gpt.data_pipeline.plan import STAGING  # noqa: E402
from lit_gpt.data_pipeline.steps import HashParagraphs, Tokenize  # noqa: E402
from lit_gpt.tokenizer import Tokenizer, tokenizer_digests  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(prepared_data) -> Path:
    return prepared_data["tokenizer"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def dataset_bytes(out: Path) -> dict:
    """Every file of both splits and the report, by relative path (through the symlinks)."""
    files = {}
    for name in ("train", "val"):
        for path in sorted((out / name).rglob("*")):
            if path.is_file():
                files[f"{name}/{path.relative_to(out / name)}"] = path.read_bytes()
    files["report.json"] = (out / "current" / "report.json").read_bytes()
    return files


def test_shards_cover_every_record_once_in_order(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": "x" * int(n)}) for n in rng.integers(0, 200, 400)]
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl").write_bytes(data[:-1])  # no newline at the end
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(50)]}), tmp_path / "d.parquet", row_group_size=7)
    files = [tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl.zst", "d.parquet")]

    def records(units) -> list:
        out = []
        for unit in units:
            if unit.kind == "parquet":
                out.append((unit.file, unit.first_line, unit.payload))
                continue
            payload = unit.payload[:-1] if unit.payload.endswith(b"\n") else unit.payload
            out.extend((unit.file, unit.first_line + i, line) for i, line in enumerate(payload.split(b"\n")))
        return out

    whole = records(corpus.iter_units(files))
    assert len(whole) == 3 * 400 + 8  # 400 lines per text file, 8 row groups
    for shard_bytes in (997, 4096, 30000):
        for unit_bytes in (64, 1 << 20):
            shards = corpus.plan_shards(files, shard_bytes)
            assert len(shards) > 4
            assert records(u for s in shards for u in corpus.shard_units(s, files, unit_bytes)) == whole


def test_paragraph_dedup_removes_exactly_the_repeats(tokenizer_dir, tmp_path):
    header, imprint = "Kopfzeile der Seite", "Impressum und Datenschutz"
    write_jsonl(tmp_path / "in" / "a.jsonl", [
        {"id": "d1", "text": f"{header}\nErster Absatz über Köln.\n{imprint}"},
        {"id": "d2", "text": f"{header}\nZweiter  Absatz über München.\n  impressum UND   datenschutz "},
        {"id": "d3", "text": "Ein eigener Text.\nEin eigener Text."},  # a repeat inside the document
    ])
    write_jsonl(tmp_path / "in" / "b.jsonl", [
        {"id": "d4", "text": f"{header}\n{imprint}"},  # nothing left: dropped
        {"id": "d5", "text": "Erster Absatz über Köln.\nNeu aus Würzburg."},  # a repeat from the other file
        {"id": "d6", "text": "\n\nLeere Zeilen bleiben.\n\n"},  # blank paragraphs are never repeats
        {"id": "d7", "text": "Kurz.\nErster Absatz über Köln."},  # left too short: dropped
    ])
    expected = {"d1": f"{header}\nErster Absatz über Köln.\n{imprint}", "d2": "Zweiter  Absatz über München.",
                "d3": "Ein eigener Text.", "d5": "Neu aus Würzburg.", "d6": "\n\nLeere Zeilen bleiben.\n\n"}
    out = tmp_path / "out"
    # Tiny shards, three tasks: the repeats are found across shards, files and tasks.
    assert prepare("--input", tmp_path / "in", "--output_dir", out, "--tokenizer", tokenizer_dir, "--val_fraction",
                   "0", "--dedup_paragraphs", "--dedup_min_chars", "10", "--tasks", "3", "--workers", "2",
                   "--shard_mb", "0.00001") == 0
    tok = Tokenizer(tokenizer_dir)
    docs = documents(out / "train")
    assert list(docs) == list(expected)
    for doc_id, text in expected.items():
        assert docs[doc_id].tolist() == tok.encode(text, bos=True, eos=True), doc_id
    cleaned = json.loads((out / "train" / "manifest.json").read_text())["cleaning"]
    assert cleaned["repeated_paragraphs_removed"] == 2 + 1 + 2 + 1 + 1
    assert cleaned["dropped_too_short_after_dedup"] == 2 and cleaned["documents_in"] == 7


def test_token_ratio_filter_keeps_and_drops_by_the_bounds(tokenizer_dir, tmp_path):
    tok = Tokenizer(tokenizer_dir)
    texts = ["Das Haus ist schön und der Baum ist grün.", "Der König und das Mädchen lesen Bücher.",
             "Wasser über die Brücke nach München.", "Qx7 zK9 @vP3 ^^wq ~~Zy", "ǄǄ ẞẞ ﬁﬁ",
             "der die das und ist nicht ein eine zu mit auf"]
    words = np.array([len(t.split()) for t in texts])
    tokens = np.array([len(tok.encode(t, bos=False, eos=False)) for t in texts])
    ratios = tokens / words
    order = np.argsort(ratios)
    assert len(set(ratios.tolist())) == len(texts)
    low = (ratios[order[1]] + ratios[order[2]]) / 2
    high = (ratios[order[4]] + ratios[order[5]]) / 2
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    assert prepare("--input", tmp_path / "in.jsonl", "--output_dir", out, "--tokenizer", tokenizer_dir,
                   "--val_fraction", "0", "--min_token_ratio", str(low), "--max_token_ratio", str(high),
                   "--workers", "1") == 0
    assert set(documents(out / "train")) == {f"r{i}" for i in order[2:5]}
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["cleaning"]["dropped_token_ratio_below"] == 2
    assert manifest["cleaning"]["dropped_token_ratio_above"] == 1
    histogram = json.loads((out / "current" / "report.json").read_text())["token_ratio_histogram"]
    expected = np.bincount(np.searchsorted(histogram["edges"], ratios, side="right") - 1,
                           minlength=len(histogram["counts"]))
    assert histogram["counts"] == expected.tolist()  # every document's ratio, kept or not


@pytest.fixture(scope="module")
def cleaning_corpus(tmp_path_factory) -> Path:
    """Two files with repeated paragraphs inside and across them, plus some noisy documents."""
    base = tmp_path_factory.mktemp("cleaning")
    first = write_corpus(base / "in", n_docs=300, seed=11)
    lines = first.read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(1)
    extra = []
    for i in range(120):
        a, b = (json.loads(lines[j])["text"] for j in rng.integers(0, 300, 2))
        extra.append({"id": f"copy-{i}", "text": f"{a}\nNeuer Satz {i} über Köln und Würzburg.\n{b}"})
    extra += [{"id": f"noise-{i}", "text": "Qx7 zK9 @vP3 ^^wq ~~Zy " * (i + 1)} for i in range(10)]
    write_jsonl(base / "in" / "more.jsonl", extra)
    return base / "in"


CLEANING = ("--dedup_paragraphs", "--dedup_min_chars", "20", "--max_token_ratio", "3.0", "--chunk_size", "700",
            "--val_fraction", "0.15", "--shard_mb", "0.005")


def test_any_task_count_and_workers_give_identical_bytes(tokenizer_dir, cleaning_corpus, tmp_path):
    runs = {}
    for tasks, workers in ((1, 1), (3, 1), (2, 2)):
        out = tmp_path / f"t{tasks}w{workers}"
        assert prepare("--input", cleaning_corpus, "--output_dir", out, "--tokenizer", tokenizer_dir, *CLEANING,
                       "--tasks", str(tasks), "--workers", str(workers)) == 0
        runs[(tasks, workers)] = dataset_bytes(out)
    reference = runs.pop((1, 1))
    report = json.loads(reference["report.json"])
    assert report["repeated_paragraphs_removed"] > 100 and report["dropped_token_ratio_above"] > 0
    assert sum(name.endswith(".bin") for name in reference) > 10
    for other in runs.values():
        assert other.keys() == reference.keys()
        assert all(other[name] == reference[name] for name in reference)


def test_a_run_killed_in_any_stage_restarts_to_the_same_result(tokenizer_dir, cleaning_corpus, tmp_path):
    args = ["--input", cleaning_corpus, "--tokenizer", tokenizer_dir, *CLEANING, "--tasks", "2", "--workers", "1"]
    assert prepare(*args, "--output_dir", tmp_path / "clean") == 0
    reference = dataset_bytes(tmp_path / "clean")
    for step in (HashParagraphs, Tokenize):  # killed in the middle of the shards of a stage
        out = tmp_path / step.__name__
        real, calls = step.process, []

        def process_or_die(self, *a, real=real, calls=calls):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(self, *a)

        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(step, "process", process_or_die)
            prepare(*args, "--output_dir", out)
        assert not (out / "train").exists()
        assert prepare(*args, "--output_dir", out) == 0
        assert dataset_bytes(out) == reference


def test_sigkill_of_the_whole_process_group_mid_tokenize_resumes_to_the_same_bytes(tokenizer_dir, cleaning_corpus,
                                                                                   tmp_path):
    """SIGKILL the command and its worker processes once tokenize has finished some shards; the re-run skips the
    finished tasks and pieces and ends with the bytes of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    args = ["--input", cleaning_corpus, "--tokenizer", tokenizer_dir, *CLEANING, "--tasks", "3", "--workers", "2"]
    assert prepare(*args, "--output_dir", tmp_path / "clean") == 0
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, args), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while child.poll() is None and not list((out / STAGING / "parts").glob("*.json")):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL  # killed, not finished
    assert not (out / "train").exists()
    assert prepare(*args, "--output_dir", out) == 0
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "clean")


def _legacy_layout(out: Path) -> None:
    """Turn a dataset into the layout of earlier versions: real train/val directories."""
    for split in ("train", "val"):
        real = (out / split).resolve()
        (out / split).unlink()
        shutil.copytree(real, out / split)
    (out / "current").unlink()
    shutil.rmtree(out / "versions")


@pytest.mark.parametrize("layout", ["versioned", "legacy"])
def test_switch_killed_at_every_boundary_ends_complete(tokenizer_dir, tmp_path, layout):
    corpus_dir = write_corpus(tmp_path / "corpus", n_docs=120, seed=9)
    base = ["--input", corpus_dir, "--tokenizer", tokenizer_dir, "--workers", "1", "--val_fraction", "0.2"]
    old, new = tmp_path / "old", tmp_path / "new"
    assert prepare(*base, "--output_dir", old, "--chunk_size", "900") == 0
    assert prepare(*base, "--output_dir", new, "--chunk_size", "500") == 0
    if layout == "legacy":
        _legacy_layout(old)
    old_bytes, new_bytes = dataset_bytes_splits(old), dataset_bytes_splits(new)
    replace = [*base, "--chunk_size", "500", "--overwrite"]

    def crash_at(k: int):
        seen = []

        def boundary(what):
            seen.append(what)
            if len(seen) == k:
                raise SystemExit(f"killed at {what}")
        return boundary, seen

    boundary, seen = crash_at(0)
    probe = tmp_path / "probe"
    shutil.copytree(old, probe, symlinks=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(switch, "boundary", boundary)
        assert prepare(*replace, "--output_dir", probe) == 0
    assert dataset_bytes_splits(probe) == new_bytes
    assert len(seen) >= 9, seen
    for k in range(1, len(seen) + 1):
        out = tmp_path / f"k{k}"
        shutil.copytree(old, out, symlinks=True)
        boundary, _ = crash_at(k)
        with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit):
            patch.setattr(switch, "boundary", boundary)
            prepare(*replace, "--output_dir", out)
        if layout == "versioned":  # readers see the complete old or the complete new dataset, never a mix
            assert dataset_bytes_splits(out) in (old_bytes, new_bytes), seen[k - 1]
        assert prepare(*replace, "--output_dir", out) == 0, seen[k - 1]
        assert dataset_bytes_splits(out) == new_bytes, seen[k - 1]
        assert not (out / STAGING).exists() and not (out / switch.JOURNAL).exists()
        assert sorted(p.name for p in (out / "versions").iterdir()) == [switch.current_version(out)]
        shutil.rmtree(out)


def dataset_bytes_splits(out: Path) -> dict:
    return {k: v for k, v in dataset_bytes_or_empty(out).items() if k != "report.json"}


def dataset_bytes_or_empty(out: Path) -> dict:
    try:
        return dataset_bytes(out) if (out / "current").exists() else {
            f"{s}/{p.relative_to(out / s)}": p.read_bytes() for s in ("train", "val") for p in
            sorted((out / s).rglob("*")) if p.is_file()}
    except FileNotFoundError:
        return {}


def test_invalid_utf8_inside_a_json_string_is_one_clear_error_or_a_counted_skip(tokenizer_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "text": "gut"}\n{"id": "b", "text": "kaputt \xff\xfe hier"}\n'
                    b'{"id": "c", "text": "auch gut"}\n')
    for workers in ("1", "2"):
        assert prepare("--input", bad, "--output_dir", tmp_path / f"stop{workers}", "--tokenizer", tokenizer_dir,
                       "--workers", workers) == 2
        err = capsys.readouterr().err
        assert f"{bad}:2: invalid UTF-8" in err and "Traceback" not in err
    assert prepare("--input", bad, "--output_dir", tmp_path / "skip", "--tokenizer", tokenizer_dir, "--workers", "1",
                   "--on_error", "skip", "--val_fraction", "0") == 0
    assert f"{bad}:2: invalid UTF-8" in capsys.readouterr().err
    assert list(documents(tmp_path / "skip" / "train")) == ["a", "c"]
    assert json.loads((tmp_path / "skip" / "train" / "manifest.json").read_text())["skipped_records"] == 1

    corpus_file = write_corpus(tmp_path / "tokcorpus", n_docs=200)
    with open(corpus_file, "ab") as f:
        f.write(b'{"text": "kaputt \xff hier"}\n')
    args = ["--input", str(corpus_file), "--vocab_size", "512", "--num_threads", "1"]
    assert train_tokenizer.main([*args, "--output_dir", str(tmp_path / "t1")]) == 2
    err = capsys.readouterr().err
    assert f"{corpus_file}:201: invalid UTF-8" in err and "Traceback" not in err
    assert train_tokenizer.main([*args, "--output_dir", str(tmp_path / "t2"), "--on_error", "skip"]) == 0
    assert "skipped 1 malformed record" in capsys.readouterr().err


def test_manifest_and_tokenizer_dir_record_files_and_backend(prepared_data):
    tokenizer = prepared_data["tokenizer"]
    provenance = json.loads((tokenizer / "provenance.json").read_text())
    manifest = json.loads((prepared_data["train"] / "manifest.json").read_text())["tokenizer"]
    backend = Tokenizer(tokenizer).backend
    assert provenance["backend"] == manifest["backend"] == backend
    expected = tokenizer_digests(tokenizer)
    assert {"tokenizer.model", "tokenizer.json"} <= set(expected)
    assert provenance["files_sha256"] == manifest["files_sha256"] == expected
    assert manifest["vocab_size"] == Tokenizer(tokenizer).vocab_size


def test_cleaning_helpers_against_hand_computed_values():
    assert cleaning.paragraph_key("  Grüße  aus\tKÖLN ") == cleaning.paragraph_key("grüße aus köln")
    assert cleaning.paragraph_key(" \t ") is None
    keys = np.array([5, 7, 5, 9, 7, 5], np.uint64)
    positions = np.array([10, 11, 3, 4, 20, 30], np.uint64)
    assert cleaning.first_occurrences_dropped(keys, positions).tolist() == [10, 20, 30]
    texts, removed, end = cleaning.remove_paragraphs(["a\nb\nc", "d", "e\n\nf"], 4, np.array([5, 8], np.uint64))
    assert (texts, removed.tolist(), end) == (["a\nc", "d", "\nf"], [1, 0, 1], 11)
    keys, ordinals, end = cleaning.paragraph_hashes(["Grüße  AUS köln\n \nx", "Ab"], 3)
    assert keys.tolist() == [cleaning.paragraph_key(p) for p in ("grüße aus köln", "x", "ab")]
    assert (ordinals.tolist(), end) == ([3, 5, 6], 7)
    bins = cleaning.ratio_bins(np.array([0, 3, 10, 5]), np.array([4, 2, 1, 0]))
    assert bins.tolist() == [0, 30, 100, 100]  # 0.0, 1.5, >= 5, no words


def test_manifest_names_the_encoder_that_encoded_the_data(prepared_data, tmp_path):
    """A proven train_tokenizer directory is encoded by SentencePiece (ids: AutoTokenizer's); the same files without
    provenance.json by transformers. The manifest says which did it."""
    tokenizer = prepared_data["tokenizer"]
    record = json.loads((prepared_data["train"] / "manifest.json").read_text())["tokenizer"]
    assert (record["backend"], record["encoder"]) == ("transformers", "sentencepiece") == (
        Tokenizer(tokenizer).backend, Tokenizer(tokenizer).encoder)
    unproven = shutil.copytree(tokenizer, tmp_path / "tokenizer", ignore=shutil.ignore_patterns("provenance.json"))
    corpus_file = write_corpus(tmp_path / "corpus", n_docs=20)
    assert prepare("--input", corpus_file, "--output_dir", tmp_path / "data", "--tokenizer", unproven,
                   "--chunk_size", "512", "--workers", "1") == 0
    record = json.loads((tmp_path / "data" / "train" / "manifest.json").read_text())["tokenizer"]
    assert (record["backend"], record["encoder"]) == ("transformers", "transformers")


def test_the_pipeline_imports_neither_torch_nor_the_model_layer():
    import subprocess

    probe = ("import sys, lit_gpt.data_pipeline.prepare, lit_gpt.data_pipeline.executor\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m in "
             "('lit_gpt.model', 'lit_gpt.packed_dataset', 'lit_gpt.attention')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_slurm_args_become_datatrove_sbatch_args():
    from lit_gpt.data_pipeline.executor import sbatch_options

    assert sbatch_options("--partition=cpu --time 4:00:00 --exclusive --mem-per-cpu=4G") == {
        "partition": "cpu", "time": "4:00:00", "exclusive": "", "mem-per-cpu": "4G"}
    with pytest.raises(corpus.InputError, match="long form"):
        sbatch_options("-p cpu")


def test_summary_names_only_the_token_ratio_bounds_that_were_set():
    from types import SimpleNamespace

    from lit_gpt.data_pipeline.finalize import summary_table

    total = {"documents_in": 10, "skipped": 0, "empty": 1, "dropped_ratio_low": 0, "dropped_ratio_high": 3,
             "layout": {"train": (900, 8), "val": (100, 1)}, "chunks": {"train": 1, "val": 1}, "histogram": [0] * 12}
    plan = SimpleNamespace(dedup=False, min_token_ratio=None, max_token_ratio=2.5)
    table = summary_table(plan, total)
    assert re.search(r"documents above 2.5 tokens/word +3\n", table)
    assert "below" not in table and "None" not in table
