"""`datapoints spike`: the documents of one step's global batch ranked by their own loss under the checkpoint before
it, checked against the data as written and the model run directly on every document piece; steps numbered as
metrics.jsonl numbers them, and a step a rollback skipped scored on the batch the rolled-back run trained on."""
import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from test_datapoints import reference_documents, simulate
from test_packed_dataset import write_litpkds

sys.path.insert(0, str(ROOT / "scripts"))
import datapoints as datapoints_cli  # noqa: E402

from lit_gpt.checkpoint.save import save_checkpoint  # noqa: E402
from lit_gpt.config import Config  # noqa: E402
from lit_gpt.datapoints import DatapointLogger  # noqa: E402
from lit_gpt.loss import token_losses  # noqa: E402
from lit_gpt.model import GPT  # noqa: E402
from lit_gpt.packed_dataset import PackedDataset  # noqa: E402
from lit_gpt.run_dir import RunDir  # noqa: E402

T = 31  # block size of the simulated run: samples of 32 tokens
CYCLE = np.arange(10, 30)  # the easy documents count up through these tokens, round and round


def write_source(directory, chunk_tokens: int = 500):
    """Easy documents (runs of CYCLE) and one of random tokens ("noise"), written as prepare_data.py lays them out
    (chunks, manifest, per-chunk document indexes). Returns (stream, [(doc id, start, end)], chunk offsets)."""
    rng = np.random.default_rng(0)
    docs = [(f"easy-{i}", CYCLE[(i + np.arange(rng.integers(20, 60))) % len(CYCLE)]) for i in range(40)]
    docs.insert(23, ("noise", rng.integers(0, 512, 90)))
    stream = np.concatenate([tokens for _, tokens in docs])
    starts = np.cumsum([0] + [len(tokens) for _, tokens in docs])
    layout = [(doc_id, int(a), int(b)) for (doc_id, _), a, b in zip(docs, starts[:-1], starts[1:])]
    (directory / "index").mkdir(parents=True)
    files, offsets = [], list(range(0, len(stream), chunk_tokens))
    for c, a in enumerate(offsets):
        b = min(a + chunk_tokens, len(stream))
        inside = [(n, doc_id, s) for n, (doc_id, s, _) in enumerate(layout) if a <= s < b]
        write_litpkds(directory / f"chunk_{c}.bin", stream[a:b])
        (directory / "index" / f"chunk_{c}.json").write_text(json.dumps(
            {"tokens": b - a, "first_doc": inside[0][0], "doc_starts": [s - a for _, _, s in inside],
             "doc_ids": [doc_id for _, doc_id, _ in inside]}))
        files.append({"name": f"chunk_{c}.bin", "tokens": b - a, "first_doc": inside[0][0], "sha256": None})
    (directory / "manifest.json").write_text(json.dumps(
        {"files": files, "documents": len(layout), "pad_id": 0, "tokenizer": {"vocab_size": 512}}))
    return stream, layout, offsets


def trained_micro_model(steps: int = 15) -> GPT:
    """The micro model after learning to count up through CYCLE (never shown the noise document)."""
    torch.manual_seed(0)
    model = GPT(Config.from_name("micro"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = torch.from_numpy(CYCLE[(np.random.randint(0, len(CYCLE), (8, 1)) + np.arange(T + 1)) % len(CYCLE)])
        token_losses(model(rows[:, :-1]), rows[:, 1:])[1].div(8 * T).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def reference_pieces(stream, layout, offsets, sample_ids) -> list[dict]:
    """Every (sample, document) piece from the layout as written, with the loss of the model run directly."""
    pieces = []
    for sample in sample_ids.tolist():
        a, b = sample * (T + 1), min((sample + 1) * (T + 1), len(stream))
        for doc_id, start, end in layout:
            if start < b and end > a:
                first = max(start, a)
                chunk = max(c for c, o in enumerate(offsets) if o <= first)
                pieces.append({"document": doc_id, "sample": sample, "sample_position": first - a,
                               "document_offset": first - start, "file": f"chunk_{chunk}.bin",
                               "file_position": first - offsets[chunk], "targets": range(max(first, a + 1), min(end, b)),
                               "window": (a, b)})
    return pieces


def direct_loss(model, stream, layout, piece, masking: bool) -> float:
    """Mean loss of the piece's target tokens: the sample through GPT (document ids from the layout), token_losses on
    labels that keep only the piece's targets."""
    a, b = piece["window"]
    tokens = torch.from_numpy(np.pad(stream[a:b], (0, T + 1 - (b - a))).astype(np.int64))[None]
    doc_of = np.array([max(n for n, (_, s, _) in enumerate(layout) if s <= min(p, b - 1)) for p in range(a, a + T)])
    labels = torch.full((1, T), -100)
    for position in piece["targets"]:
        labels[0, position - a - 1] = tokens[0, position - a]
    with torch.no_grad():
        logits = model(tokens[:, :-1], doc_ids=torch.from_numpy(doc_of)[None] if masking else None)
    return (token_losses(logits, labels)[0] / len(piece["targets"])).item()


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def simulated_run(tmp_path):
    """A logged run over write_source's data (two epochs) and the last step whose batch holds noise (0-based, >= 1)."""
    data, out = tmp_path / "data", tmp_path / "run"
    stream, layout, offsets = write_source(data)
    ds = PackedDataset([data], block_size=T, seed=3)
    simulate(out, ds, 2, range(0, 2 * ds.samples_per_epoch // 8), {2 * ds.samples_per_epoch // 8})
    noise = next(j for j in range(len(stream) // (T + 1) + 1) if j * (T + 1) < layout[23][2] and
                 (j + 1) * (T + 1) > layout[23][1])  # a sample with noise tokens; in the second epoch too
    step = max(s for s in range(2 * ds.samples_per_epoch // 8) if noise in ds.sample_ids(np.arange(8 * s, 8 * s + 8)))
    assert step >= 1
    return data, out, (stream, layout, offsets), ds, step, noise


def save_micro(out, step: int, model: GPT) -> None:
    meta = {"config": model.config.to_dict(), "hparams": {"document_masking": True}}
    save_checkpoint(RunDir(out).checkpoint(step), model, torch.optim.SGD(model.parameters()), meta, "full")


def assert_scores_the_batch(listed, written, sample_ids, model, masking=True) -> None:
    """The listed pieces are exactly those of the samples as written, each with the model's loss of its own
    targets, highest first, noise on top."""
    stream, layout, offsets = written
    expected = reference_pieces(stream, layout, offsets, sample_ids)
    key = ("document", "sample", "sample_position", "document_offset", "file_position")
    assert sorted(tuple(d[k] for k in key) for d in listed) == sorted(tuple(p[k] for k in key) for p in expected)
    by_place = {(p["sample"], p["sample_position"]): p for p in expected}
    for d in listed:
        piece = by_place[(d["sample"], d["sample_position"])]
        assert d["tokens"] == len(piece["targets"])
        if d["tokens"]:
            assert d["loss"] == pytest.approx(direct_loss(model, stream, layout, piece, masking), rel=1e-5, abs=1e-6)
        else:
            assert d["loss"] is None
    losses = [d["loss"] for d in listed if d["loss"] is not None]
    assert losses == sorted(losses, reverse=True) and listed[0]["document"] == "noise"
    assert losses[0] > 3 * np.median(losses)  # the noise stands out: the model learned the easy documents


def test_spike_ranks_the_pieces_of_the_step_by_their_own_loss(tmp_path, capsys, one_thread):
    data, out, written, ds, step, _ = simulated_run(tmp_path)
    stream, layout, offsets = written
    model = trained_micro_model()
    save_micro(out, step, model)
    # The later one (untrained weights) has trained on the step already: the default must not take it.
    save_micro(out, step + 1, GPT(Config.from_name("micro")))

    # metrics.jsonl calls the datapoint log's step `step` step + 1
    assert datapoints_cli.main(["spike", "--run", str(out), "--step", str(step + 1), "--top", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(RunDir(out).checkpoint(step)) and result["document_masking"] is True
    assert (result["step"], result["log_step"], result["rollback"]) == (step + 1, step, None)
    sample_ids = ds.sample_ids(np.arange(8 * step, 8 * step + 8))
    expected = reference_pieces(stream, layout, offsets, sample_ids)
    listed = result["documents"]
    assert_scores_the_batch(listed, written, sample_ids, model)
    assert all(d["file"] == str(data / p["file"]) for d in listed for p in expected
               if (d["sample"], d["sample_position"]) == (p["sample"], p["sample_position"]))
    by_place = {(p["sample"], p["sample_position"]): p for p in expected}
    assert result["tokens"] == sum(d["tokens"] for d in listed)
    assert result["loss"] == pytest.approx(sum(d["loss"] * d["tokens"] for d in listed if d["tokens"]) /
                                           result["tokens"], rel=1e-6)

    # The spelling, the table, --top and the masking override.
    assert datapoints_cli.main(["--spike", str(step + 1), "--run", str(out), "--top", "3", "--no-document_masking"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 4 and lines[1].split("\t")[2] == "noise"
    assert captured.err.startswith(f"step {step + 1} (datapoint log: step {step}): 8 samples") and "rolled" not in captured.err
    first = lines[1].split("\t")
    piece = by_place[(int(first[6]), int(first[7]))]
    assert float(first[0]) == pytest.approx(direct_loss(model, stream, layout, piece, False), abs=1e-4)

    # One-line errors naming the flag.
    short = GPT(Config.from_name("micro", block_size=16))
    save_checkpoint(tmp_path / "short.pth", short, torch.optim.SGD(short.parameters()), {"config": short.config.to_dict()},
                    "full")
    for argv, flag in ((["--step", "999"], "--step 999: not in the datapoint log"),
                       (["--step", "1"], "--step 1: no checkpoint iter-N with N <= 0 in"),
                       (["--step", "0"], "--step 0: must be at least 1"),
                       (["--step", str(step), "--checkpoint", str(tmp_path / "nope.pth")], "--checkpoint"),
                       (["--step", str(step), "--checkpoint", str(tmp_path / "short.pth")],
                        "--checkpoint: the model's block_size 16 is shorter than the run's samples"),
                       (["--step", str(step), "--top", "-1"], "--top -1: must be at least 0")):
        try:
            code = datapoints_cli.main(["spike", "--run", str(out), *argv])
        except SystemExit as e:
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err


def test_spike_at_a_rolled_back_step_scores_the_batch_the_spike_trained_on(tmp_path, capsys, one_thread):
    """Two rollbacks to checkpoint C skipped log steps C and C + 1 (the spike is step C + 2 in metrics.jsonl's
    numbers); the log's step C + 1 holds the re-trained step's clean data, a later checkpoint iter-(C + 1) exists:
    `spike` takes the latest rollback's batch and checkpoint C."""
    _, out, written, ds, noisy_step, noise = simulated_run(tmp_path)

    def batch(data_step):
        return ds.sample_ids(np.arange(8 * data_step, 8 * data_step + 8))

    clean = [s for s in range(2 * ds.samples_per_epoch // 8) if noise not in batch(s)]
    spike_log_step = next(s for s in clean if s >= 2)  # its logged batch (the re-trained step's) has no noise
    checkpoint = spike_log_step - 1
    other_a, other_b = [s for s in clean if s not in (spike_log_step, checkpoint)][:2]
    logger = DatapointLogger(out, rank=0, world_size=1, dataset=ds, resume_step=2 * ds.samples_per_epoch // 8)
    steps = np.array([checkpoint, spike_log_step])
    logger.write_skipped(1, spike_log_step + 1, checkpoint, steps, steps, np.stack([batch(other_b), batch(other_b)]))
    logger.write_skipped(2, spike_log_step + 1, checkpoint, steps, steps + 2,
                         np.stack([batch(other_a), batch(noisy_step)]))
    model = trained_micro_model()
    save_micro(out, checkpoint, model)
    save_micro(out, spike_log_step, GPT(Config.from_name("micro")))  # the re-trained run's: never saw that batch

    assert datapoints_cli.main(["spike", "--run", str(out), "--step", str(spike_log_step + 1), "--top", "0",
                                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == str(RunDir(out).checkpoint(checkpoint))
    assert result["rollback"] == {"rollback": 2, "spike_step": spike_log_step + 1, "checkpoint_step": checkpoint}
    assert (result["step"], result["log_step"], result["earlier_rollbacks"]) == (spike_log_step + 1, spike_log_step, [1])
    assert_scores_the_batch(result["documents"], written, batch(noisy_step), model)

    # the other skipped step, as a table: rollback 2's batch of it, the headline says which
    assert datapoints_cli.main(["--spike", str(spike_log_step), "--run", str(out), "--top", "0"]) == 0
    captured = capsys.readouterr()
    assert {int(line.split("\t")[6]) for line in captured.out.splitlines()[1:]} == set(batch(other_a).tolist())
    assert captured.err.startswith(
        f"step {spike_log_step} (datapoint log: step {checkpoint}), rolled back (rollback 2 to iter-{checkpoint:08d}; "
        f"rollback 1 skipped a step {spike_log_step} too); the batch the run trained on before the spike of step "
        f"{spike_log_step + 1}: 8 samples")
    assert f"under {RunDir(out).checkpoint(checkpoint)}" in captured.err


@pytest.mark.slow
def test_spike_of_a_trained_run_gives_back_the_loss_the_trainer_logged(prepared_data, tmp_path):
    """A real run with document masking: the pieces of step 3 (the datapoint log's step 2) under checkpoint iter-2
    (the weights it started from) add up to the loss metrics.jsonl logged for step 3, and each is the loss of its own
    tokens."""
    from test_trainer import train, train_losses

    from lit_gpt.checkpoint.load import load_gpt
    from lit_gpt.datapoints import DatapointLog

    train(prepared_data, tmp_path, max_steps=4, save_interval=2, document_masking="true")
    step = 2
    out = run_script("scripts/datapoints.py", "spike", "--run", str(tmp_path), "--step", str(step + 1), "--top", "0",
                     "--json")
    result = json.loads(out.stdout)
    assert result["checkpoint"] == str(tmp_path / "iter-00000002-ckpt.pth") and result["document_masking"] is True
    assert result["loss"] == pytest.approx(train_losses(tmp_path)[step + 1], abs=1e-5)
    log = DatapointLog(tmp_path)
    ds = PackedDataset([prepared_data["train"]], block_size=128, seed=1234, with_doc_ids=True)
    sample_ids = log.samples(step)
    assert np.array_equal(sample_ids, ds.sample_ids(np.arange(8 * step, 8 * step + 8)))
    listed = result["documents"]
    assert {d["document"] for d in listed} == reference_documents(ds, sample_ids)
    assert result["tokens"] == int((ds.get_batch(sample_ids)["labels"] != -100).sum())
    # The top pieces, each from its sample as the loader builds it (document mask included), its own targets only.
    model = load_gpt(tmp_path / "iter-00000002-ckpt.pth", with_tokenizer=False)[0]
    starts = {(d["sample"], d["sample_position"]) for d in listed}
    for piece in listed[:3]:
        batch = ds.get_batch([piece["sample"]])
        end = min([p for s, p in starts if s == piece["sample"] and p > piece["sample_position"]], default=129)
        keep = torch.zeros(128, dtype=torch.bool)
        keep[max(piece["sample_position"], 1) - 1:end - 1] = True
        labels = batch["labels"].masked_fill(~keep, -100)
        with torch.no_grad():
            loss = token_losses(model(batch["input_ids"], doc_mask=batch["doc_mask"]), labels)[0]
        assert piece["tokens"] == int((labels != -100).sum())
        assert piece["loss"] == pytest.approx(loss.item() / piece["tokens"], rel=1e-5)
