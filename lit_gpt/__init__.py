"""lit_gpt: the model, configs, data pipeline and training utilities of the LLäMmlein pretraining toolkit."""
from lit_gpt.config import Config
from lit_gpt.model import GPT

__all__ = ["Config", "GPT"]
