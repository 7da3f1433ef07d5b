"""Config registry: table dimensions, parameter counts (meta device), overrides and validation."""
import pytest
import torch

from lit_gpt.config import Config, find_multiple, name_to_config
from lit_gpt.model import GPT, num_parameters

# name: (n_layer, n_head, n_embd, n_query_groups, intermediate_size, padded_vocab_size, block_size)
TABLE = {
    "LLaMmlein_120M": (12, 12, 768, 4, 2048, 32064, 2048),
    "LLaMmlein_1B": (22, 32, 2048, 4, 5632, 32064, 2048),
    "LLaMmlein_7B": (32, 32, 4096, 32, 11008, 32064, 2048),
    "tiny_LLaMA_1b": (22, 32, 2048, 4, 5632, 32000, 2048),
    "tiny_LLaMA_120M": (12, 12, 768, 1, 2048, 32000, 2048),
    "Llama-2-7b-hf": (32, 32, 4096, 32, 11008, 32000, 4096),
}

# Published sizes, with the tolerance the issue allows.
EXPECTED_PARAMS = {
    "LLaMmlein_120M": (124.8e6, 0.1e6),
    "LLaMmlein_1B": (1.100e9, 0.001e9),
    "LLaMmlein_7B": (6.739e9, 0.001e9),
}


def analytic_param_count(n_layer, n_head, n_embd, n_query_groups, intermediate_size, padded_vocab):
    """Llama parameter count written out from the architecture, independent of the model code."""
    head_size = n_embd // n_head
    q = n_embd * n_head * head_size
    kv = 2 * n_embd * n_query_groups * head_size
    o = n_head * head_size * n_embd
    mlp = 3 * n_embd * intermediate_size
    norms = 2 * n_embd
    per_layer = q + kv + o + mlp + norms
    # untied input embedding and lm_head, plus the final norm
    return n_layer * per_layer + 2 * padded_vocab * n_embd + n_embd


@pytest.mark.parametrize("name", sorted(TABLE))
def test_registry_table_dims(name):
    c = Config.from_name(name)
    got = (c.n_layer, c.n_head, c.n_embd, c.n_query_groups, c.intermediate_size, c.padded_vocab_size, c.block_size)
    assert got == TABLE[name]
    assert c.name == name
    assert c.head_size * c.n_head == c.n_embd
    assert c.padded_vocab_size % 64 == 0 and c.padded_vocab_size >= c.vocab_size


@pytest.mark.parametrize("name", sorted(name_to_config))
def test_every_registry_entry_builds_on_meta_with_analytic_count(name):
    c = Config.from_name(name)
    with torch.device("meta"):
        model = GPT(c)
    expected = analytic_param_count(
        c.n_layer, c.n_head, c.n_embd, c.n_query_groups, c.intermediate_size, c.padded_vocab_size
    )
    assert num_parameters(model) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_published_parameter_counts(name):
    with torch.device("meta"):
        model = GPT(Config.from_name(name))
    assert all(p.is_meta for p in model.parameters())
    target, tol = EXPECTED_PARAMS[name]
    n = num_parameters(model)
    assert abs(n - target) <= tol, f"{name}: {n:,} parameters, expected {target:,.0f} +- {tol:,.0f}"


def test_parameter_counts_exact():
    # Hand-computed totals (see analytic_param_count) pin the numbers down exactly.
    exact = {"LLaMmlein_120M": 124_766_976, "LLaMmlein_1B": 1_100_310_528, "LLaMmlein_7B": 6_738_939_904}
    for name, n in exact.items():
        with torch.device("meta"):
            model = GPT(Config.from_name(name))
        assert num_parameters(model) == n, name


def test_from_name_override_keeps_the_rest():
    c = Config.from_name("LLaMmlein_120M", n_layer=2)
    ref = Config.from_name("LLaMmlein_120M")
    assert c.n_layer == 2
    for field in ("n_head", "n_embd", "n_query_groups", "intermediate_size", "padded_vocab_size", "block_size"):
        assert getattr(c, field) == getattr(ref, field), field
    # the registry itself is not mutated by an override
    assert Config.from_name("LLaMmlein_120M").n_layer == 12
    assert name_to_config["LLaMmlein_120M"]["n_layer"] == 12


def test_from_name_override_recomputes_derived_fields():
    c = Config.from_name("LLaMmlein_120M", n_embd=384, vocab_size=1000)
    assert c.head_size == 384 // 12
    assert c.padded_vocab_size == 1024
    assert c.qkv_size == (12 + 2 * 4) * 32
    assert c.q_per_kv == 3
    c = Config.from_name("micro", attn_impl="eager")
    assert c.attn_impl == "eager"


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError) as err:
        Config.from_name("LLaMmlein_12M")
    msg = str(err.value)
    assert "LLaMmlein_12M" in msg
    assert "LLaMmlein_120M" in msg


def test_unknown_override_field_raises():
    with pytest.raises(ValueError, match="n_layers"):
        Config.from_name("LLaMmlein_120M", n_layers=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_head=12, n_query_groups=5),  # n_head not divisible by groups
        dict(n_embd=100, n_head=12),  # n_embd not divisible by n_head
        dict(vocab_size=100, padded_vocab_size=64),  # padding smaller than vocab
        dict(attn_impl="flash"),  # not a backend
    ],
)
def test_invalid_configs_raise(kwargs):
    with pytest.raises(ValueError):
        Config(**kwargs)


def test_derived_defaults():
    c = Config(n_head=8, n_embd=512, vocab_size=50257)
    assert c.n_query_groups == 8  # MHA by default
    assert c.head_size == 64
    assert c.padded_vocab_size == 50304
    assert c.qkv_size == 3 * 512


def test_find_multiple():
    assert find_multiple(32010, 64) == 32064
    assert find_multiple(32000, 64) == 32000
    assert find_multiple(1, 8) == 8


def test_dict_round_trip():
    c = Config.from_name("LLaMmlein_1B", n_layer=3)
    d = c.to_dict()
    assert Config.from_dict(d) == c
    # unknown keys (e.g. from a foreign checkpoint) are ignored by from_dict
    assert Config.from_dict({**d, "some_other_key": 1}) == c
    assert c.replace(n_layer=5).n_layer == 5 and c.n_layer == 3
