"""Datapoint logging and scripts/datapoints.py on a simulated run (ranks simulated in-process, no Fabric)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import datapoints as datapoints_cli  # noqa: E402

from lit_gpt.datapoints import DatapointLog, DatapointLogger  # noqa: E402
from lit_gpt.errors import InputError  # noqa: E402
from lit_gpt.packed_dataset import PackedDataset, StepLoader  # noqa: E402

G, B, T = 8, 2, 31


def simulate(out, ds, world_size: int, steps: range, flush_at: set[int]) -> None:
    """Every rank records every step; all flush when a checkpoint would be saved."""
    loggers = [DatapointLogger(out, rank=r, world_size=world_size, dataset=ds, resume_step=steps.start)
               for r in range(world_size)]
    loaders = [iter(StepLoader(ds, G, B, rank=r, world_size=world_size, start_step=steps.start))
               for r in range(world_size)]
    for step in steps:
        for logger, loader in zip(loggers, loaders):
            got, micro_batches = next(loader)
            assert got == step
            logger.record(step, torch.cat([mb["sample_index"] for mb in micro_batches]))
        if step + 1 in flush_at:
            for logger in loggers:
                logger.flush(step + 1)


def reference_documents(ds: PackedDataset, sample_ids) -> set[str]:
    """Documents overlapping the samples, straight from the chunk index files."""
    directory = ds.sources[0].directory
    manifest = json.loads((directory / "manifest.json").read_text())
    starts, ids, offset = [], [], 0
    for entry in manifest["files"]:
        index = json.loads((directory / "index" / (entry["name"][:-4] + ".json")).read_text())
        starts += [offset + s for s in index["doc_starts"]]
        ids += index["doc_ids"]
        offset += entry["tokens"]
    ends = starts[1:] + [offset]
    found = set()
    for j in np.asarray(sample_ids).tolist():
        a, b = j * ds.sample_tokens, min((j + 1) * ds.sample_tokens, offset)
        found.update(d for d, s, e in zip(ids, starts, ends) if s < b and e > a)
    return found


@pytest.fixture(scope="module")
def run(prepared_data, tmp_path_factory):
    """Run A on 2 ranks: steps 0..12, flushed at 5 and 10, and at 13 for a checkpoint that never got written;
    resumed from checkpoint 10 on 4 ranks for steps 10..19 with checkpoints 15 and 20 (a file and a directory)."""
    out = tmp_path_factory.mktemp("run")
    ds = PackedDataset([prepared_data["train"]], block_size=T, seed=11)
    simulate(out, ds, 2, range(0, 13), {5, 10, 13})
    simulate(out, ds, 4, range(10, 20), {15, 20})
    (out / "iter-00000015-ckpt.pth").write_bytes(b"")
    (out / "iter-00000020-ckpt.pth").mkdir()
    reference = [ds.sample_ids(np.arange(s * G, (s + 1) * G)) for s in range(20)]
    return out, ds, reference


def test_log_holds_every_step_once_with_the_samples_of_an_uninterrupted_run(run):
    out, ds, reference = run
    log = DatapointLog(out)
    assert log.steps == list(range(20))
    assert [log.world_sizes[s] for s in (0, 9, 10, 19)] == [2, 2, 4, 4]  # stale steps 10..12 of run A dropped
    for step in range(20):
        assert np.array_equal(log.samples(step), reference[step])
    first = sorted(p.name for p in (out / "datapoints").glob("*.npz"))[0]
    assert first == "steps-00000000-00000004-rank00000-of00002.npz"


def test_documents_until_step_and_by_checkpoint(run, capsys):
    out, ds, reference = run
    expected = reference_documents(ds, np.concatenate(reference[:15]))
    assert datapoints_cli.main(["documents", "--run", str(out), "--until_step", "15"]) == 0
    printed = capsys.readouterr().out.split("\n")[:-1]
    assert set(printed) == expected and len(printed) == len(expected)
    assert datapoints_cli.main(["documents", "--checkpoint", str(out / "iter-00000015-ckpt.pth"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["documents"]) == expected
    # A sharded checkpoint (a directory) of step 20 saw steps 0..19, across both world sizes.
    assert datapoints_cli.main(["documents", "--checkpoint", str(out / "iter-00000020-ckpt.pth"), "--count"]) == 0
    assert int(capsys.readouterr().out) == len(reference_documents(ds, np.concatenate(reference)))


def test_steps_at_which_a_document_was_seen(run, capsys):
    out, ds, reference = run
    seen = sorted(reference_documents(ds, np.concatenate(reference)))
    for doc in seen[:: max(1, len(seen) // 5)]:
        expected = []
        for step, samples in enumerate(reference):
            world = 2 if step < 10 else 4
            for slot, sample in enumerate(samples.tolist()):
                if doc in reference_documents(ds, [sample]):
                    expected.append({"step": step, "rank": slot // (G // world), "sample": sample})
        assert datapoints_cli.main(["steps", "--run", str(out), "--document", doc, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == expected and expected
    assert datapoints_cli.main(["steps", "--run", str(out), "--document", "no-such-doc"]) == 2
    assert "no-such-doc" in capsys.readouterr().err


def test_flush_writes_only_steps_before_the_checkpoint(prepared_data, tmp_path):
    ds = PackedDataset([prepared_data["train"]], block_size=T)
    logger = DatapointLogger(tmp_path, rank=0, world_size=1, dataset=ds)
    for step in range(6):
        logger.record(step, torch.arange(step, step + G))
    logger.flush(4)
    log = DatapointLog(tmp_path)
    assert log.steps == [0, 1, 2, 3] and log.missing_steps(6) == [4, 5]
    logger.flush(6)
    assert DatapointLog(tmp_path).steps == list(range(6))


def test_resuming_with_other_data_is_refused(prepared_data, tmp_path):
    ds = PackedDataset([prepared_data["train"]], block_size=T, seed=1)
    DatapointLogger(tmp_path, rank=0, world_size=1, dataset=ds)
    other = PackedDataset([prepared_data["train"]], block_size=T, seed=2)
    with pytest.raises(InputError, match="other training data or order settings"):
        DatapointLogger(tmp_path, rank=0, world_size=1, dataset=other, resume_step=5)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert datapoints_cli.main(["summary", "--run", str(tmp_path)]) == 2
    assert "no datapoint log" in capsys.readouterr().err
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"")
    with pytest.raises(SystemExit):
        datapoints_cli.main(["documents", "--checkpoint", str(bad)])
    assert "iter-XXXXXXXX-ckpt.pth" in capsys.readouterr().err


def test_output_into_a_pipe_that_closes_early_is_no_error(run):
    """`llammlein-datapoints documents ... | head`: a reader that stops reading ends the command quietly, status 0."""
    out, _, _ = run
    command = [sys.executable, str(ROOT / "scripts" / "datapoints.py"), "documents", "--run", str(out), "--until_step",
               "20"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # closed before the command writes its first line: every write meets a broken pipe
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
