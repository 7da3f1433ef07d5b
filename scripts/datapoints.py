"""Query a run's datapoint log: which documents did training see, and when was a document seen.

    python scripts/datapoints.py documents --run out/run --until_step 1000      # documents of steps 0..999
    python scripts/datapoints.py documents --checkpoint out/run/iter-00001000-ckpt.pth   # the same: what it saw
    python scripts/datapoints.py steps --run out/run --document "wiki:12345"     # step, rank, sample per sighting
    python scripts/datapoints.py summary --run out/run
    python scripts/datapoints.py spike --run out/run --step 1234 --top 10        # step 1234 (metrics.jsonl) by loss
    python scripts/datapoints.py --spike 1234 --run out/run                      # the same

A checkpoint `iter-N-ckpt.pth` (file or sharded directory) holds the first N optimizer steps (0..N-1); its run
directory is the checkpoint's folder. A document counts as seen when at least one of its tokens was in a trained
sample. Runs resumed on another number of GPUs are merged step by step. The training data must still be where
it was logged (or pass its folders again with --data_dir, in the original order); it is checked by fingerprint.

`spike` scores the global batch of optimizer step STEP, numbered as metrics.jsonl, the log lines and rollback
records number it (the STEP-th optimizer step: the datapoint log's step STEP - 1), with the newest checkpoint iter-N
of the run with N <= STEP - 1 that verifies (iter-(STEP - 1) holds exactly the weights that step started from), or
--checkpoint, and lists the documents of its samples, one line per piece of a document in a sample, by their own
mean token loss, highest first: loss, target tokens, document id, chunk file and token position in it, token offset
within the document, sample id and position in the sample. The model runs with document masking when the
checkpoint was trained with it. When a loss-spike rollback skipped step STEP (the spike's own step or one before
it), the batch is the one the spiking run trained on (from datapoints/skipped-*.npz; the latest such rollback), and
the default checkpoint is the one that rollback went back to.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lit_gpt.config import DTYPE_NAMES
from lit_gpt.errors import InputError
from lit_gpt.run_dir import RunDir, checkpoint_step


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
    spike = sub.add_parser("spike", help="the documents of one step's global batch (the one a rollback skipped, "
                           "if any), ranked by their own loss")
    spike.add_argument("--step", "--spike", dest="step", type=int, required=True,
                       help="the optimizer step as metrics.jsonl and rollback records number it, from 1 (the "
                       "datapoint log's step STEP - 1)")
    spike.add_argument("--checkpoint", type=Path, help="the weights to score with (default: the newest checkpoint "
                       "iter-N of the run with N <= STEP - 1 that verifies; when a rollback skipped STEP, the "
                       "checkpoint it went back to); its folder is the run directory")
    spike.add_argument("--top", type=int, default=20, help="list the N highest-loss documents (0: all; default 20)")
    spike.add_argument("--batch_size", type=int, default=4, help="samples per forward pass (default 4)")
    spike.add_argument("--device", default="cpu", help="torch device (default cpu)")
    spike.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32", help="weights and compute dtype")
    spike.add_argument("--document_masking", action=argparse.BooleanOptionalAction, default=None,
                       help="attend within documents only (default: as the checkpoint was trained)")
    for parser in (docs, steps, sub.choices["summary"], spike):
        parser.add_argument("--run", type=Path, help="the run's output directory (out_dir of the trainer)")
        parser.add_argument("--data_dir", action="append", help="training data folder(s), if moved since the run")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].split("=")[0] == "--spike":  # `datapoints --spike STEP ...` is `datapoints spike --spike STEP`
        argv = ["spike", *argv]
    args = p.parse_args(argv)
    if getattr(args, "checkpoint", None) is not None:
        if not args.checkpoint.exists():
            p.error(f"--checkpoint {args.checkpoint}: no such checkpoint")
        if args.command == "documents":
            try:
                args.until_step = checkpoint_step(args.checkpoint)
            except ValueError as e:
                p.error(f"--checkpoint {e}")
        args.run = args.run or RunDir.of_checkpoint(args.checkpoint).path
    if args.command == "spike":
        for flag, value, least in (("--step", args.step, 1), ("--top", args.top, 0), ("--batch_size", args.batch_size, 1)):
            if value < least:
                p.error(f"{flag} {value}: must be at least {least}")
    if args.run is None:
        p.error("--run is required (or --checkpoint for 'documents' and 'spike')")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and flag errors answer at once
    from lit_gpt.datapoints import DatapointLog

    try:
        log = DatapointLog(args.run, args.data_dir)
        if args.command == "summary":
            steps = log.steps
            result = {"run": str(args.run), "logged_steps": len(steps), "first_step": steps[0] if steps else None,
                      "last_step": steps[-1] if steps else None,
                      "world_sizes": sorted(set(log.world_sizes.values())),
                      "missing_steps": log.missing_steps(steps[-1] + 1)[:20] if steps else []}
            print(json.dumps(result, indent=1))
        elif args.command == "spike":
            spike(args, log)
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
        sys.stdout.flush()  # here, not at exit: a closed pipe is then the BrokenPipeError handled below
    except InputError as e:  # a run, data folder or document that does not fit; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error; nothing more goes to the pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def spike(args: argparse.Namespace, log) -> None:
    from lit_gpt.checkpoint.load import load_gpt, trained_with_document_masking
    from lit_gpt.hf_convert import TORCH_DTYPES
    from lit_gpt.spike_attribution import checkpoint_before, rank_batch_documents, spike_batch

    batch = spike_batch(log, args.step)  # before the model is loaded
    checkpoint = args.checkpoint or checkpoint_before(args.run, batch)
    if args.checkpoint is not None and batch.rollback is None and _step_of(checkpoint) > batch.log_step:
        print(f"warning: --checkpoint {checkpoint} has trained on step {args.step} already: these are the losses "
              f"after it", file=sys.stderr)
    model, _, _, meta = load_gpt(checkpoint, dtype=TORCH_DTYPES[args.dtype], with_tokenizer=False)
    masking = trained_with_document_masking(meta) if args.document_masking is None else args.document_masking
    result = rank_batch_documents(log.dataset, batch.samples, model.to(args.device), masking, args.device,
                                  args.batch_size)
    rollback = batch.rollback and {key: batch.rollback[key] for key in ("rollback", "spike_step", "checkpoint_step")}
    result = {"step": batch.step, "log_step": batch.log_step, "rollback": rollback,
              "earlier_rollbacks": batch.earlier_rollbacks, **result, "checkpoint": str(checkpoint),
              "document_masking": masking}
    shown = result["documents"][:args.top] if args.top else result["documents"]
    if args.json:
        print(json.dumps({**result, "pieces": len(result["documents"]), "documents": shown}, ensure_ascii=False))
        return
    print(f"{batch.describe()}: {result['samples']} samples, {len(result['documents'])} document pieces, loss "
          f"{result['loss']:.4f} over {result['tokens']} tokens under {checkpoint}"
          f"{' (document masking)' if masking else ''}", file=sys.stderr)
    print("loss\ttokens\tdocument\tfile\tfile_position\tdocument_offset\tsample\tsample_position")
    for d in shown:
        loss = "-" if d["loss"] is None else f"{d['loss']:.4f}"
        print(f"{loss}\t{d['tokens']}\t{d['document']}\t{d['file']}\t{d['file_position']}\t{d['document_offset']}\t"
              f"{d['sample']}\t{d['sample_position']}")


def _step_of(checkpoint: Path) -> int:
    """The step in a checkpoint's name; -1 for other weights (an export), which trained on no logged step."""
    try:
        return checkpoint_step(checkpoint)
    except ValueError:
        return -1


if __name__ == "__main__":
    sys.exit(main())
