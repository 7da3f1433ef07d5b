"""Turn a folder of fortune files (texts separated by lines holding only '%') into a jsonl corpus, one document
per fortune, with ids `file:index`. Debian's fortunes-de gives ~3 MB of real German text this way."""
import argparse
import json
import sys
from pathlib import Path

from lit_gpt.checkpoint.publish import open_atomically


def fortunes(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    chunk: list[str] = []
    for line in text.splitlines() + ["%"]:
        if line.strip() == "%":
            doc = "\n".join(chunk).strip()
            if doc:
                yield doc
            chunk = []
        else:
            chunk.append(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, required=True, help="folder of fortune files")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl")
    args = parser.parse_args()
    # Skip the strfile indexes (.dat) and the symlinked duplicates (.u8 -> same file).
    files = sorted(p for p in args.src.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        print(f"error: --src {args.src}: no fortune files found", file=sys.stderr)
        return 2
    n = 0
    with open_atomically(args.out, "w", encoding="utf-8") as f:
        for path in files:
            for i, doc in enumerate(fortunes(path)):
                f.write(json.dumps({"id": f"{path.name}:{i}", "text": doc}, ensure_ascii=False) + "\n")
                n += 1
    print(f"{n} documents from {len(files)} files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
