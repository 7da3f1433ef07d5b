"""--eval_tasks: lm-eval tasks scored in-process on the live (sharded) model during training; the scores equal the
adapter's on the checkpoint of that step, and training goes on as if nothing had been evaluated."""
from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_script
from hf_helpers import random_state, small_config
from test_trainer import metrics, train, train_losses, trainer_args

from lit_gpt.errors import InputError
from lit_gpt.model import GPT
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.train_tasks import TrainTasks

LIMIT = 4


def offline_only_task(base):
    """A task directory whose data lives on the Hub only."""
    directory = base / "hub_only"
    directory.mkdir()
    (directory / "hub_only.yaml").write_text(textwrap.dedent("""\
        task: hub_only
        dataset_path: llammlein-test/not-on-this-machine
        test_split: test
        output_type: loglikelihood
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: perplexity
        """))
    return directory


def test_evaluation_leaves_mode_and_random_streams_as_they_were(tokenizer_dir):
    from lit_gpt.lm_eval_adapter import evaluate_tasks

    config = small_config(2)
    model = GPT(config)
    model.load_state_dict(random_state(config, seed=1))
    model.train()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    scores = evaluate_tasks(model, Tokenizer(tokenizer_dir), ["llammlein_de_gen"], batch_size=2, limit=2)
    assert model.training and torch.is_grad_enabled()
    after = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert list(scores) == ["llammlein_de_gen"] and 0 <= scores["llammlein_de_gen"]["exact_match"] <= 1


def test_tasks_are_checked_when_the_run_is_set_up(tmp_path, tokenizer_dir):
    assert not TrainTasks("", 0, 0, 8, "", torch.device("cpu"))  # off: nothing is checked or imported
    with pytest.raises(InputError, match=r"^--eval_tasks: needs the run's tokenizer \(--tokenizer_path\)$"):
        TrainTasks("llammlein_de", 0, 0, 8, "", torch.device("cpu"))
    tasks = TrainTasks("llammlein_de_gen", 5, 0, 8, str(tokenizer_dir), torch.device("cpu"))
    assert [s for s in range(1, 13) if tasks.due(s, 12)] == [5, 10]  # the end (12) runs them on its own
    assert not any(TrainTasks("llammlein_de_gen", 0, 0, 8, str(tokenizer_dir), "cpu").due(s, 12) for s in range(13))


@pytest.mark.slow
def test_a_task_whose_data_is_not_here_stops_the_run_before_anything_is_written(prepared_data, tmp_path):
    out = tmp_path / "run"
    task = offline_only_task(tmp_path)
    result = run_script(*trainer_args(prepared_data, out, eval_tasks=f"llammlein_de,{task}"), check=False,
                        env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: --eval_tasks: lm-eval task '{task}': its data cannot be loaded here")
    assert "HF_DATASETS_OFFLINE=1" in line and "local directory" in line
    assert not out.exists()


@pytest.mark.slow
def test_two_fsdp_ranks_score_as_the_adapter_and_train_as_without_tasks(prepared_data, tmp_path):
    from lit_gpt.checkpoint.load import load_gpt
    from lit_gpt.lm_eval_adapter import evaluate_tasks

    common = dict(devices=2, strategy="fsdp", sharding_strategy="FULL_SHARD", micro_batch_size=2, max_steps=4,
                  save_interval=2)
    evaluated, plain = tmp_path / "evaluated", tmp_path / "plain"
    log = train(prepared_data, evaluated, eval_tasks="llammlein_de,llammlein_de_gen", eval_task_interval=2, eval_limit=LIMIT,
                eval_batch_size=3, **common).stdout
    train(prepared_data, plain, **common)
    assert train_losses(evaluated) == train_losses(plain)  # the same random streams, mode and weights after each

    records = {r["step"]: r for r in metrics(evaluated) if "eval/seconds" in r}
    assert sorted(records) == [2, 4] and "lm-eval tasks in" in log
    for step, record in records.items():
        model, _, tokenizer_dir, _ = load_gpt(evaluated / f"iter-{step:08d}-ckpt.pth")
        ours = evaluate_tasks(model, Tokenizer(tokenizer_dir), ["llammlein_de", "llammlein_de_gen"], batch_size=5,
                              limit=LIMIT)
        assert record["eval/seconds"] > 0
        # generation: the ranks keep making forward calls together until the last row of any rank is done
        assert record["eval/llammlein_de_gen/exact_match"] == ours["llammlein_de_gen"]["exact_match"]
        for metric in ("acc", "acc_norm"):
            assert record[f"eval/llammlein_de_mc/{metric}"] == ours["llammlein_de_mc"][metric], (step, metric)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert record[f"eval/llammlein_de_ppl/{metric}"] == pytest.approx(ours["llammlein_de_ppl"][metric],
                                                                              rel=1e-4), (step, metric)
    # the model changed between the two: the scores are of the live weights, not of a copy
    assert records[2]["eval/llammlein_de_ppl/bits_per_byte"] != records[4]["eval/llammlein_de_ppl/bits_per_byte"]


def test_a_restart_writes_only_the_final_records_a_kill_left_out():
    """The final validation and task scores come after the last checkpoint: a run killed between them writes, when
    started again, exactly what is missing (a record twice would be a step scored twice)."""
    from lit_gpt.metrics_log import missing_final_records

    step = {"step": 10, "loss": 2.0}
    val, scores = {"step": 10, "val_loss": 2.1}, {"step": 10, "eval/seconds": 3.0, "eval/t/acc": 0.5}
    assert missing_final_records([{"step": 9, "loss": 2.2}], 10, validated=True, scored=True) == \
        ["step", "validation", "tasks"]
    assert missing_final_records([step], 10, validated=True, scored=True) == ["validation", "tasks"]
    assert missing_final_records([step, val], 10, validated=True, scored=True) == ["tasks"]
    assert missing_final_records([step, val, scores], 10, validated=True, scored=True) == []
    assert missing_final_records([step, val], 10, validated=True, scored=False) == []
    assert missing_final_records([step], 10, validated=False, scored=False) == []
