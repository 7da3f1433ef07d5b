"""Data preparation throughput against its ceiling, with and without cleaning, and peak memory against input size.

    python bench/bench_prepare.py [--size_mb 64] [--workers N] [--memory_sizes_mb 100,1000]

Corpus: Debian's fortunes-de (one document per fortune) when installed, else generated pseudo-German text,
repeated with distinct ids up to the size wanted; in every copy after the first, 80 % of the paragraphs carry a
copy number (new text) and 20 % repeat the first copy's (what paragraph dedup removes). A 32,000-token tokenizer
is trained on it first. The ceiling is one process encoding all texts with SentencePiece (one thread, BOS/EOS
added) times the number of workers; preparation is `scripts/prepare_data.py` end to end (reading JSONL, cleaning,
tokenizing, splitting, writing chunks, indexes and manifests), timed in-process after the imports, and its speed
is the corpus's tokens (as the ceiling counts them) per second. Peak memory: prepare_data.py in a child process
(cleaning on), the largest resident set of it and its workers (getrusage of the waited children), with the same
--shard_mb (--memory_shard_mb) for every input size: a task's memory follows the shard size, and by default
prepare_data.py shrinks shards on small inputs (four per task), so default runs of different sizes would compare
different shard sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts import prepare_data, train_tokenizer
from scripts.fortunes_to_jsonl import fortunes

ROOT = Path(__file__).resolve().parents[1]

FORTUNES = Path("/usr/share/games/fortunes/de")
CLEANING = ["--dedup_paragraphs", "--min_token_ratio", "0.5", "--max_token_ratio", "4"]


def base_documents() -> tuple[list[str], str]:
    if FORTUNES.is_dir():
        files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
        docs = [doc for path in files for doc in fortunes(path)]
        if docs:
            return docs, "fortunes-de"
    rng = random.Random(0)
    words = ("der die das und ist nicht ein zu mit auf für von Haus Straße Wasser Bücher Mädchen Größe schön "
             "grün über fünf Brücke König Frühling Käse Mühle lesen schreiben München Köln 1848 2024").split()
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(rng.randint(1, 6)))
            for _ in range(20000)], "generated"


def write_corpus(path: Path, docs: list[str], size_mb: float) -> int:
    """Copies of `docs` up to size_mb; copy k > 0 varies 80 % of the paragraphs (see the module doc)."""
    rng = random.Random(1)
    written, copies = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 2**20:
            for i, doc in enumerate(docs):
                if copies:
                    doc = "\n".join(p if rng.random() < 0.2 else f"{p} {copies}" for p in doc.split("\n"))
                line = json.dumps({"id": f"{copies}/{i}", "text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
            copies += 1
    return copies


def timed_prepare(corpus: Path, tok_dir: Path, out: Path, workers: int, extra: list[str]) -> float:
    start = time.perf_counter()
    assert prepare_data.main(["--input", str(corpus), "--output_dir", str(out), "--tokenizer", str(tok_dir),
                              "--workers", str(workers), "--val_fraction", "0.001", *extra]) == 0
    return time.perf_counter() - start


def peak_rss_mb(corpus: Path, tok_dir: Path, out: Path, workers: int, shard_mb: float) -> float:
    """Largest resident set (MB) of a prepare_data.py run in a child process, its workers included."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-c", probe, sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--input",
               str(corpus), "--output_dir", str(out), "--tokenizer", str(tok_dir), "--workers", str(workers),
               "--val_fraction", "0.001", "--shard_mb", str(shard_mb), *CLEANING]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size_mb", type=float, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--memory_sizes_mb", default="100,1000", help="input sizes for the peak-memory runs ('' skips)")
    p.add_argument("--memory_shard_mb", type=float, default=16,
                   help="--shard_mb of the peak-memory runs: the same for every size (a task's memory follows it)")
    args = p.parse_args()

    docs, source = base_documents()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        copies = write_corpus(corpus, docs, args.size_mb)
        tok_dir = tmp / "tokenizer"
        assert train_tokenizer.main(["--input", str(corpus), "--output_dir", str(tok_dir), "--vocab_size",
                                     str(args.vocab_size), "--input_sentence_size", "2000000"]) == 0

        import sentencepiece as spm

        texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
        n_docs = len(texts)
        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        start = time.perf_counter()
        tokens = sum(map(len, sp.encode(texts, add_bos=True, add_eos=True, num_threads=1)))
        raw = tokens / (time.perf_counter() - start)
        del texts

        plain = timed_prepare(corpus, tok_dir, tmp / "plain", args.workers, [])
        prepared = sum(json.loads((tmp / "plain" / s / "manifest.json").read_text())["tokens"]
                       for s in ("train", "val"))
        assert prepared == tokens, (prepared, tokens)
        cleaned = timed_prepare(corpus, tok_dir, tmp / "cleaned", args.workers, CLEANING)
        report = json.loads((tmp / "cleaned" / "current" / "report.json").read_text())

        memory = {}
        for size in [float(s) for s in args.memory_sizes_mb.split(",") if s]:
            big = tmp / f"corpus-{size:g}.jsonl"
            write_corpus(big, docs, size)
            memory[f"{size:g} MB"] = round(peak_rss_mb(big, tok_dir, tmp / f"mem-{size:g}", args.workers,
                                                       args.memory_shard_mb))
            big.unlink()

    ceiling = args.workers * raw
    result = {"corpus": f"{source} x{copies} ({args.size_mb:.0f} MB JSONL, {n_docs:,} documents)",
              "tokens": tokens, "workers": args.workers, "raw_sentencepiece_tokens_per_s_1_core": round(raw),
              "ceiling_tokens_per_s": round(ceiling),
              "cleaning_off": {"tokens_per_s": round(tokens / plain),
                               "fraction_of_ceiling": round(tokens / plain / ceiling, 3)},
              "cleaning_on": {"tokens_per_s": round(tokens / cleaned),
                              "fraction_of_ceiling": round(tokens / cleaned / ceiling, 3),
                              "repeated_paragraphs_removed": report["repeated_paragraphs_removed"],
                              "documents_dropped": report["dropped_too_short_after_dedup"]
                              + report["dropped_token_ratio_below"] + report["dropped_token_ratio_above"],
                              "tokens_out": sum(report["tokens"].values())},
              "peak_rss_mb_cleaning_on": memory, "memory_shard_mb": args.memory_shard_mb}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
