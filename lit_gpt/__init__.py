"""lit_gpt: the model, configs, data pipeline and training utilities of the LLäMmlein pretraining toolkit."""
from lit_gpt.config import Config

__all__ = ["Config", "GPT"]


def __getattr__(name: str):
    # The model (and torch) load on first use: `lit_gpt.config` and `lit_gpt.errors` must stay cheap to import,
    # so that the trainer answers --help and flag errors without importing torch.
    if name == "GPT":
        from lit_gpt.model import GPT

        return GPT
    raise AttributeError(f"module 'lit_gpt' has no attribute {name!r}")
