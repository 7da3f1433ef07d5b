"""This folder's items for lm-eval (`custom_dataset` and `process_results` of the task files). Loaded from here, the
data files are found wherever lm-eval runs; a `dataset_path: json` task resolves data_files against the working
directory instead."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _split(name: str) -> datasets.DatasetDict:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})


def multiple_choice(**_task_metadata) -> datasets.DatasetDict:
    return _split("mc.jsonl")


def perplexity(**_task_metadata) -> datasets.DatasetDict:
    return _split("ppl.jsonl")


def text_scores(doc: dict, results: list) -> dict:
    """A text's log-likelihood with its word and UTF-8 byte counts, which lm-eval's weighted_perplexity and
    bits_per_byte aggregations divide by (words: whitespace-separated, as lm-eval counts them for wikitext)."""
    (loglikelihood, _is_greedy), = results
    words, size = len(doc["text"].split()), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
