import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# `lit_gpt`, `scripts` and `pretrain` come from the editable install (scripts/setup_env.sh: pip install -e .).
ROOT = Path(__file__).resolve().parents[1]
# The Hugging Face and lm-eval fixtures (tokenizer_dir, hf_lm_eval_run, ...) for every test module that asks for them; skips fail in CI.
pytest_plugins = ["hf_helpers", "lm_eval_helpers", "ci_skips"]

_WORDS = (
    "der die das und ist nicht ein eine zu mit auf für von sich dem den des im auch es an als wie nach "
    "Haus Baum Straße Wasser Bücher Mädchen Größe schön grün über fünf Brücke König Frühling Käse Mühle "
    "lesen schreiben laufen gehen sehen denken wissen sagen machen kommen München Köln Würzburg Lamm"
).split()


def write_corpus(directory: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """A deterministic pseudo-German corpus (jsonl, one document per line) with umlauts and ß."""
    import json

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
                         for _ in range(rng.randint(1, 8))]
            f.write(json.dumps({"id": f"doc-{i}", "text": " ".join(sentences)}, ensure_ascii=False) + "\n")
    return path


def run_script(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repo script with this interpreter; single-threaded BLAS so that several ranks share 2 cores."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> dict:
    """A tokenizer (vocab 512) and a prepared train/val dataset for the `micro` model config."""
    base = tmp_path_factory.mktemp("prepared")
    corpus = write_corpus(base / "corpus")
    tokenizer = base / "tokenizer"
    run_script("scripts/train_tokenizer.py", "--input", str(corpus), "--output_dir", str(tokenizer), "--vocab_size", "512")
    data = base / "data"
    run_script("scripts/prepare_data.py", "--input", str(corpus), "--output_dir", str(data), "--tokenizer", str(tokenizer),
               "--chunk_size", "4096", "--val_fraction", "0.1", "--workers", "1")
    return {"corpus": corpus, "tokenizer": tokenizer, "train": data / "train", "val": data / "val"}


@pytest.fixture(scope="session")
def single_process_ten_steps(prepared_data, tmp_path_factory) -> Path:
    """The reference of the multi-rank and elastic tests: 10 steps on one process with micro batch 4 (= 2 ranks x
    micro batch 2 = 4 ranks x micro batch 1), trained once per session."""
    from test_trainer import train

    out = tmp_path_factory.mktemp("single10")
    train(prepared_data, out, micro_batch_size=4, max_steps=10)
    return out
