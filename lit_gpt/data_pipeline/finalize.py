"""The last stage: manifests and cleaning report of the staged dataset, the switch, and the summary table.

Locally the main process calls `finalize` after the other stages; on Slurm the `Finalize` step is a one-task job
that depends on the pack job. Its completion is the dataset itself (`is_complete`: manifests with this run's
fingerprint), not a datatrove marker: the switch removes the staging area that holds the stages' markers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from lit_gpt import cleaning
from lit_gpt.checkpoint.publish import write_atomically
from lit_gpt.corpus import InputError
from lit_gpt.data_pipeline import switch
from lit_gpt.data_pipeline.packing import DATASET, Layout, pack_result_path
from lit_gpt.data_pipeline.plan import SPLITS, STAGING, Plan, load_plan
from lit_gpt.data_pipeline.steps import part_meta_path, read_json

COUNTS = ("documents_in", "skipped", "empty", "repeated_paragraphs", "dropped_short", "dropped_ratio_low",
          "dropped_ratio_high")
REPORT = "report.json"


def totals(work: Path, plan: Plan) -> dict:
    """Counts over all shards (and the first messages of skipped records, in corpus order)."""
    total = {key: 0 for key in COUNTS}
    total["histogram"] = [0] * len(cleaning.HISTOGRAM_EDGES)
    total["messages"] = []
    for shard in plan.shards:
        meta = read_json(part_meta_path(work, shard.index))
        for key in COUNTS:
            total[key] += meta[key]
        total["histogram"] = [a + b for a, b in zip(total["histogram"], meta["histogram"])]
        total["messages"].extend(meta["messages"])
    return total


def cleaning_section(plan: Plan, total: dict) -> dict:
    return {"paragraph_dedup": plan.dedup, "dedup_min_chars": plan.dedup_min_chars,
            "min_token_ratio": plan.min_token_ratio, "max_token_ratio": plan.max_token_ratio,
            "documents_in": total["documents_in"], "repeated_paragraphs_removed": total["repeated_paragraphs"],
            "dropped_too_short_after_dedup": total["dropped_short"],
            "dropped_token_ratio_below": total["dropped_ratio_low"],
            "dropped_token_ratio_above": total["dropped_ratio_high"]}


def manifest(plan: Plan, split: str, files: list[dict], layout: Layout, total: dict) -> dict:
    return {
        "format": "LITPKDS", "version": 1, "split": split, "prefix": split, "dtype": plan.dtype,
        "chunk_size": plan.chunk_size, "pad_id": plan.pad_id, "bos": plan.bos, "eos": True,
        "tokens": layout.tokens(split), "documents": layout.documents(split), "files": files,
        "tokenizer": {"path": plan.tokenizer, "backend": plan.tokenizer_backend, "encoder": plan.tokenizer_encoder,
                      "files_sha256": plan.tokenizer_files_sha256, "vocab_size": plan.vocab_size,
                      "bos_id": plan.bos_id, "eos_id": plan.eos_id},
        "split_rule": {"val_fraction": plan.val_fraction, "seed": plan.seed,
                       "hash": "splitmix64(crc32(id) ^ splitmix64(seed)) < val_fraction * 2**64 -> val"},
        "inputs": plan.inputs, "skipped_records": total["skipped"], "empty_documents": total["empty"],
        "cleaning": cleaning_section(plan, total), "fingerprint": plan.fingerprint,
    }


def finalize(out: Path, work: Path, plan: Plan, pack_tasks: int) -> dict:
    """Write manifests and the report into the staged dataset, switch to it; the totals."""
    total = totals(work, plan)
    layout = Layout(work, plan)
    if not layout.documents("train"):  # training would fail on it much later
        found = "no documents at all" if not layout.documents("val") else "documents only for the validation split"
        raise InputError(f"--input: {found} ({total['empty']} empty, {total['skipped']} malformed records skipped, "
                         f"{total['dropped_short'] + total['dropped_ratio_low'] + total['dropped_ratio_high']} "
                         f"removed by cleaning)")
    entries = [e for rank in range(pack_tasks) for e in read_json(pack_result_path(work, pack_tasks, rank))]
    for split in SPLITS:
        files = sorted(({k: v for k, v in e.items() if k != "split"} for e in entries if e["split"] == split),
                       key=lambda e: e["name"])
        body = json.dumps(manifest(plan, split, files, layout, total), indent=1).encode("utf-8")
        write_atomically(work / DATASET / split / "manifest.json", body)
        switch.boundary(f"{split} manifest written")
    report = {"fingerprint": plan.fingerprint, **cleaning_section(plan, total),
              "tokens": {s: layout.tokens(s) for s in SPLITS}, "documents": {s: layout.documents(s) for s in SPLITS},
              "token_ratio_histogram": {"edges": cleaning.HISTOGRAM_EDGES.tolist(), "counts": total["histogram"],
                                        "last_bin": f">= {cleaning.HISTOGRAM_EDGES[-1]}, and documents without words"}}
    write_atomically(work / DATASET / REPORT, json.dumps(report, indent=1).encode("utf-8"))
    switch.boundary("report written")
    switch.install(out, work / DATASET, "v-" + plan.fingerprint[:16])
    total["layout"] = {s: (layout.tokens(s), layout.documents(s)) for s in SPLITS}
    total["chunks"] = {s: sum(e["split"] == s for e in entries) for s in SPLITS}
    return total


def summary_table(plan: Plan, total: dict) -> str:
    rows = [("documents in", f"{total['documents_in']:,}"),
            ("malformed records skipped", f"{total['skipped']:,}"),
            ("empty documents", f"{total['empty']:,}")]
    if plan.dedup:
        rows += [("repeated paragraphs removed", f"{total['repeated_paragraphs']:,}"),
                 (f"documents too short after dedup (< {plan.dedup_min_chars} chars)",
                  f"{total['dropped_short']:,}")]
    if plan.min_token_ratio is not None:  # only the bounds that were set: "below None tokens/word" says nothing
        rows.append((f"documents below {plan.min_token_ratio} tokens/word", f"{total['dropped_ratio_low']:,}"))
    if plan.max_token_ratio is not None:
        rows.append((f"documents above {plan.max_token_ratio} tokens/word", f"{total['dropped_ratio_high']:,}"))
    for split in SPLITS:
        tokens, documents = total["layout"][split]
        rows.append((f"{split}: documents / tokens / chunks",
                     f"{documents:,} / {tokens:,} / {total['chunks'][split]:,}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(["summary:", *lines, "tokens per word (all documents after dedup):",
                      cleaning.histogram_table(total["histogram"])])


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out: Path, fingerprint: str) -> bool:
    """Both splits' manifests carry this fingerprint and every chunk they list is there, with its full size."""
    for split in SPLITS:
        manifest = read_manifest(out / split / "manifest.json")
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        itemsize = 2 if manifest["dtype"] == "uint16" else 4
        for entry in manifest["files"]:
            chunk = out / split / entry["name"]
            if not chunk.is_file() or chunk.stat().st_size != 24 + itemsize * manifest["chunk_size"]:
                return False
    return True


def report(plan: Plan, total: dict) -> None:
    """Warnings for skipped records (stderr) and the summary table (stdout)."""
    for message in total["messages"]:
        print(f"warning: skipped: {message}", file=sys.stderr)
    if total["skipped"] > len(total["messages"]):
        print(f"warning: {total['skipped'] - len(total['messages'])} further skipped records are only counted",
              file=sys.stderr)
    print(summary_table(plan, total))
    if not total["layout"]["val"][1] and plan.val_fraction > 0:
        print("warning: no document fell into the validation split", file=sys.stderr)


class Finalize(PipelineStep):
    """The finalize stage as one datatrove task (the Slurm job after the pack job); prints the summary."""

    type = "🦙 - PREPARE"
    name = "manifests and switch"

    def __init__(self, out: Path, pack_tasks: int) -> None:
        super().__init__()
        self.out, self.pack_tasks = str(out), pack_tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        out = Path(self.out)
        switch.recover(out)
        plan = load_plan(out / STAGING)
        if plan is None and switch.current_version(out) is not None:
            print(f"{out}: already complete")  # a repeated finalize job after the switch
        elif plan is None:
            raise InputError(f"--output_dir {out}: no run planned there ({out / STAGING / 'run.json'} missing)")
        elif is_complete(out, plan.fingerprint):
            print(f"{out}: already complete")
        else:
            report(plan, finalize(out, out / STAGING, plan, self.pack_tasks))
            print(f"{out}: done")
        yield from ()
