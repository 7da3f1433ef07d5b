"""Query a run's datapoint log: which documents did training see, and when was a document seen.

    python scripts/datapoints.py documents --run out/run --until_step 1000      # documents of steps 0..999
    python scripts/datapoints.py documents --checkpoint out/run/iter-00001000-ckpt.pth   # the same: what it saw
    python scripts/datapoints.py steps --run out/run --document "wiki:12345"     # step, rank, sample per sighting
    python scripts/datapoints.py summary --run out/run

A checkpoint `iter-N-ckpt.pth` (file or sharded directory) holds the first N optimizer steps (0..N-1); its run
directory is the checkpoint's folder. A document counts as seen when at least one of its tokens was in a trained
sample. Runs resumed on another number of GPUs are merged step by step. The training data must still be where
it was logged (or pass its folders again with --data_dir, in the original order); it is checked by fingerprint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lit_gpt.datapoints import DatapointLog
from lit_gpt.run_dir import checkpoint_step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    docs = sub.add_parser("documents", help="documents seen in the first N steps or by a checkpoint")
    where = docs.add_mutually_exclusive_group(required=True)
    where.add_argument("--until_step", type=int, help="steps 0..N-1 (what checkpoint iter-N holds)")
    where.add_argument("--checkpoint", type=Path, help="a checkpoint path; its folder is the run directory")
    docs.add_argument("--count", action="store_true", help="print only the number of documents")
    steps = sub.add_parser("steps", help="the steps at which a document was trained on")
    steps.add_argument("--document", required=True, help="document id as in the corpus (or file:line)")
    sub.add_parser("summary", help="logged steps and world sizes")
    for parser in (docs, steps, sub.choices["summary"]):
        parser.add_argument("--run", type=Path, help="the run's output directory (out_dir of the trainer)")
        parser.add_argument("--data_dir", action="append", help="training data folder(s), if moved since the run")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if getattr(args, "checkpoint", None) is not None:
        if not args.checkpoint.exists():
            p.error(f"--checkpoint {args.checkpoint}: no such checkpoint")
        try:
            args.until_step = checkpoint_step(args.checkpoint)
        except ValueError as e:
            p.error(f"--checkpoint {e}")
        args.run = args.run or args.checkpoint.parent
    if args.run is None:
        p.error("--run is required (or --checkpoint for 'documents')")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        log = DatapointLog(args.run, args.data_dir)
        if args.command == "summary":
            steps = log.steps
            result = {"run": str(args.run), "logged_steps": len(steps), "first_step": steps[0] if steps else None,
                      "last_step": steps[-1] if steps else None,
                      "world_sizes": sorted(set(log.world_sizes.values())),
                      "missing_steps": log.missing_steps(steps[-1] + 1)[:20] if steps else []}
            print(json.dumps(result, indent=1))
        elif args.command == "documents":
            missing = log.missing_steps(args.until_step)
            if missing:
                print(f"warning: {len(missing)} of the steps 0..{args.until_step - 1} are not in the log (first: "
                      f"{missing[0]}); their documents are not listed", file=sys.stderr)
            docs = log.documents_until(args.until_step)
            if args.json:
                print(json.dumps({"until_step": args.until_step, "documents": docs}, ensure_ascii=False))
            elif args.count:
                print(len(docs))
            else:
                sys.stdout.writelines(d + "\n" for d in docs)
                print(f"{len(docs)} documents in steps 0..{args.until_step - 1}", file=sys.stderr)
        else:
            hits = log.steps_of_document(args.document)
            if args.json:
                print(json.dumps([{"step": s, "rank": r, "sample": x} for s, r, x in hits]))
            else:
                for step, rank, sample in hits:
                    print(f"step {step} rank {rank} sample {sample}")
                if not hits:
                    print(f"document {args.document!r} was not trained on in the logged steps", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
