"""Data preparation throughput against its ceiling: cores x raw SentencePiece encode speed on the same text.

    python bench/bench_prepare.py [--size_mb 64] [--workers N]

Corpus: Debian's fortunes-de (one document per fortune) when installed, else generated pseudo-German text,
repeated with distinct ids up to --size_mb of JSONL. A 32,000-token tokenizer is trained on it first. The ceiling
is one process encoding all texts with SentencePiece (one thread, BOS/EOS added) times the number of workers;
preparation is `scripts/prepare_data.py` end to end (reading JSONL, tokenizing, splitting, writing chunks, indexes
and manifests), timed in-process after the imports.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import prepare_data  # noqa: E402
import train_tokenizer  # noqa: E402
from fortunes_to_jsonl import fortunes  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes/de")


def base_documents() -> tuple[list[str], str]:
    if FORTUNES.is_dir():
        files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
        docs = [doc for path in files for doc in fortunes(path)]
        if docs:
            return docs, "fortunes-de"
    rng = random.Random(0)
    words = ("der die das und ist nicht ein zu mit auf für von Haus Straße Wasser Bücher Mädchen Größe schön "
             "grün über fünf Brücke König Frühling Käse Mühle lesen schreiben München Köln 1848 2024").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(20000)], "generated"


def write_corpus(path: Path, docs: list[str], size_mb: float) -> int:
    written, copies = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 2**20:
            for i, doc in enumerate(docs):
                line = json.dumps({"id": f"{copies}/{i}", "text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
            copies += 1
    return copies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size_mb", type=float, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--vocab_size", type=int, default=32000)
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
        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        start = time.perf_counter()
        tokens = sum(map(len, sp.encode(texts, add_bos=True, add_eos=True, num_threads=1)))
        raw = tokens / (time.perf_counter() - start)
        del texts

        start = time.perf_counter()
        assert prepare_data.main(["--input", str(corpus), "--output_dir", str(tmp / "data"), "--tokenizer",
                                  str(tok_dir), "--workers", str(args.workers), "--val_fraction", "0.001"]) == 0
        elapsed = time.perf_counter() - start
        prepared = sum(json.loads((tmp / "data" / s / "manifest.json").read_text())["tokens"] for s in ("train", "val"))
        assert prepared == tokens, (prepared, tokens)

    ceiling = args.workers * raw
    result = {"corpus": f"{source} x{copies} ({args.size_mb:.0f} MB JSONL, {len(docs) * copies:,} documents)",
              "tokens": tokens, "workers": args.workers, "raw_sentencepiece_tokens_per_s_1_core": round(raw),
              "ceiling_tokens_per_s": round(ceiling), "prepare_tokens_per_s": round(tokens / elapsed),
              "fraction_of_ceiling": round(tokens / elapsed / ceiling, 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
