"""This folder's items for lm-eval (`custom_dataset` of the task file), found wherever lm-eval runs (see
eval/tasks/llammlein_de/items.py)."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def completions(**_task_metadata) -> datasets.DatasetDict:
    lines = (HERE / "items.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
