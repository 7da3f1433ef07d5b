"""Spike attribution: the documents of one optimizer step's global batch, ranked by their own loss under a checkpoint.

Steps are numbered as metrics.jsonl, the log lines and rollback records number them: step S is the S-th optimizer
step; its batch is the datapoint log's step S - 1 (0-based), and checkpoint iter-(S - 1) holds the weights it
started from. When a loss-spike rollback skipped that step (the spike's own or one before it), the batch is the one
the rolled-back run trained on, from the rollback's skipped file (the datapoint log's step S - 1 then holds the
re-trained step's other data), scored by default with the checkpoint the rollback went back to.

Each sample is cut into segments, one per document it holds (a document may span several samples: one segment
each). Sample position 0 is input only; every later position p is the target predicted from positions 0..p-1 and
its loss counts for the document that holds position p, so the segments' losses add up to exactly the token losses
the step trained on (padding carries none). The rows go through the model as training saw them: whole samples, with
the document mask when the checkpoint was trained with one. Weighted by their token counts, the segments' mean
losses give the step's loss; under checkpoint iter-(S - 1) that is the loss metrics.jsonl records as step S.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lit_gpt.attention import DocumentMask
from lit_gpt.checkpoint.find import list_checkpoints, newest_that_verifies
from lit_gpt.datapoints import DatapointLog, document_ids, read_skipped
from lit_gpt.errors import InputError
from lit_gpt.loss import IGNORE_INDEX
from lit_gpt.packed_dataset import PackedDataset
from lit_gpt.run_dir import checkpoint_step


@dataclass
class SpikeBatch:
    """The global batch of step `step` (numbered as metrics.jsonl does) and where it was found."""
    step: int
    samples: np.ndarray
    rollback: dict | None = None  # the latest rollback that skipped the step: read_skipped's dict
    earlier_rollbacks: list[int] = field(default_factory=list)  # other rollbacks that skipped a step of this number

    @property
    def log_step(self) -> int:
        return self.step - 1

    @property
    def newest_checkpoint(self) -> int:
        """The newest checkpoint step the default may take: the rollback's target, else the step's start."""
        return self.rollback["checkpoint_step"] if self.rollback else self.log_step

    def describe(self) -> str:
        """Which batch this is, for the headline."""
        where = f"step {self.step} (datapoint log: step {self.log_step})"
        if self.rollback is None:
            return where
        number, spike = self.rollback["rollback"], self.rollback["spike_step"]
        trained = ("the batch the spike trained on" if spike == self.step else
                   f"the batch the run trained on before the spike of step {spike}")
        earlier = ""
        if self.earlier_rollbacks:
            earlier = (f"; rollback{'s' if len(self.earlier_rollbacks) > 1 else ''} "
                       f"{', '.join(map(str, self.earlier_rollbacks))} skipped a step {self.step} too")
        return (f"{where}, rolled back (rollback {number} to iter-{self.rollback['checkpoint_step']:08d}{earlier}); "
                f"{trained}")


def spike_batch(log: DatapointLog, step: int) -> SpikeBatch:
    """The batch of step `step` (metrics.jsonl's number): from the latest rollback whose skipped steps hold it,
    else from the datapoint log."""
    covering = [r for r in read_skipped(log.dir.parent) if step - 1 in r["steps"].tolist()]  # in rollback order
    if covering:
        latest = covering[-1]
        row = int(np.flatnonzero(latest["steps"] == step - 1)[0])
        return SpikeBatch(step, latest["samples"][row].astype(np.int64), latest, [r["rollback"] for r in covering[:-1]])
    if step - 1 not in log.world_sizes:
        logged = (f"logged steps: {log.steps[0] + 1}..{log.steps[-1] + 1} as metrics.jsonl numbers them"
                  if log.steps else "it logs no steps")
        raise InputError(f"--step {step}: not in the datapoint log of {log.dir.parent} and skipped by no rollback "
                         f"({logged})")
    return SpikeBatch(step, log.samples(step - 1))


def checkpoint_before(run_dir: Path, batch: SpikeBatch) -> Path:
    """The newest checkpoint iter-N of the run with N <= batch.newest_checkpoint that verifies (damaged ones are
    passed over with a warning): the weights closest to those that computed the batch's step."""
    newest = batch.newest_checkpoint
    found = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= newest]
    chosen = newest_that_verifies(found)
    if chosen is None:
        what = "that verifies " if found else ""
        raise InputError(f"--step {batch.step}: no checkpoint iter-N with N <= {newest} {what}in {run_dir} "
                         f"(pass one with --checkpoint)")
    return chosen


def step_segments(dataset: PackedDataset, sample_ids: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """The document segments of the samples, in sample then position order, and `segment_of` [samples,
    sample_tokens]: the segment holding each sample position (the padding of a last, partial sample continues its
    last segment, as the loader's doc ids do)."""
    sources, starts = dataset.locate(sample_ids)
    segments: list[dict] = []
    places: list[tuple[int, int]] = []  # (source, document number) of each segment
    segment_of = np.empty((len(sample_ids), dataset.sample_tokens), dtype=np.int64)
    for row, (s, start, sample) in enumerate(zip(sources.tolist(), starts.tolist(), sample_ids.tolist())):
        source = dataset.sources[s]
        if not source.has_index:
            raise InputError(f"{source.directory}: no document index, documents cannot be named")
        real = min(start + dataset.sample_tokens, source.tokens) - start
        numbers = source.doc_numbers(start + np.arange(real))
        firsts = np.concatenate([[0], np.flatnonzero(np.diff(numbers)) + 1])
        positions = np.minimum(np.arange(dataset.sample_tokens), real - 1)
        segment_of[row] = len(segments) + np.searchsorted(firsts, positions, side="right") - 1
        for first, number in zip(firsts.tolist(), numbers[firsts].tolist()):
            position = start + first  # in the source's token stream
            chunk = int(source.chunk_of(position))
            places.append((s, number))
            segments.append({"source": str(source.directory), "file": str(source.chunks[chunk]["path"]),
                             "file_position": position - int(source.offsets[chunk]),
                             "document_offset": position - source.doc_start(number),
                             "sample": sample, "sample_position": first})
    names: dict[tuple[int, int], str] = {}
    for s in sorted({s for s, _ in places}):  # each source's chunk indexes are read once, not once per sample
        numbers = sorted({number for t, number in places if t == s})
        names.update(zip([(s, n) for n in numbers], document_ids(dataset.sources[s], np.asarray(numbers))))
    return [{"document": names[place], **segment} for place, segment in zip(places, segments)], segment_of


@torch.no_grad()
def segment_losses(model, dataset: PackedDataset, sample_ids: np.ndarray, segment_of: np.ndarray,
                   document_masking: bool, device, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of token losses, number of target tokens) per segment, in fp64."""
    segments = int(segment_of.max()) + 1
    loss_sums, counts = np.zeros(segments), np.zeros(segments, dtype=np.int64)
    vocab = model.config.padded_vocab_size
    for at in range(0, len(sample_ids), batch_size):
        batch = dataset.get_batch(sample_ids[at:at + batch_size])
        top = max(int(batch["input_ids"].max()), int(batch["labels"].max()))
        if top >= vocab:
            raise InputError(f"--checkpoint: token id {top} of the logged training data is outside the model's "
                             f"vocabulary ({vocab}); a checkpoint of another run?")
        rows = segment_of[at:at + batch_size]
        # Segment numbers change exactly where a document starts: the mask the loader's doc ids give in training.
        mask = DocumentMask.from_doc_ids(rows[:, :-1]).to(device) if document_masking else None
        logits = model(batch["input_ids"].to(device), doc_mask=mask)
        labels = batch["labels"].to(device)
        for row in range(logits.shape[0]):  # one row of fp32 logits at a time: [T, vocab], not [B, T, vocab]
            losses = F.cross_entropy(logits[row].float(), labels[row], ignore_index=IGNORE_INDEX, reduction="none")
            real = (labels[row] != IGNORE_INDEX).cpu().numpy()
            owner = rows[row, 1:][real]  # label t is sample position t + 1
            loss_sums += np.bincount(owner, losses.double().cpu().numpy()[real], minlength=segments)
            counts += np.bincount(owner, minlength=segments)
    return loss_sums, counts


def rank_batch_documents(dataset: PackedDataset, sample_ids: np.ndarray, model, document_masking: bool,
                         device="cpu", batch_size: int = 4) -> dict:
    """The batch's document segments with their mean token loss, highest first (segments holding only a sample's
    first token have no target: loss None, listed last), and the batch's totals."""
    if dataset.block_size > model.config.block_size:
        raise InputError(f"--checkpoint: the model's block_size {model.config.block_size} is shorter than the run's "
                         f"samples ({dataset.block_size} inputs); a checkpoint of another run?")
    segments, segment_of = step_segments(dataset, sample_ids)
    loss_sums, counts = segment_losses(model, dataset, sample_ids, segment_of, document_masking, device, batch_size)
    scored = [{"loss": loss_sum / count if count else None, "tokens": count, **segment}
              for segment, loss_sum, count in zip(segments, loss_sums.tolist(), counts.tolist())]
    ranked = sorted(scored, key=lambda s: np.inf if s["loss"] is None else -s["loss"])
    tokens = int(counts.sum())
    return {"samples": len(sample_ids), "tokens": tokens, "loss": float(loss_sums.sum()) / max(tokens, 1),
            "documents": ranked}
