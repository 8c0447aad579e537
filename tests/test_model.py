"""GPTConfig validation, presets, and the model's behaviour on every always-available backend."""
from __future__ import annotations

import math

import pytest
import torch

from engine import ops
from engine.model import GPT, GPTConfig, PRESETS, preset, sinusoidal_positions

BACKENDS = ["reference", "torch"]


def small_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_seq_len=24), **overrides})


def test_d_model_not_divisible_by_heads_names_both_values():
    with pytest.raises(ValueError, match=r"d_model \(100\) must be divisible by n_heads \(8\)"):
        GPTConfig(d_model=100, n_heads=8)


@pytest.mark.parametrize("field,value,message", [
    ("n_layers", 0, "n_layers must be a positive integer, got 0"),
    ("vocab_size", 2.5, "vocab_size must be a positive integer, got 2.5"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("pos_encoding", "rotary", "pos_encoding must be one of"),
    ("activation", "relu", "activation must be one of"),
])
def test_invalid_config_values_are_value_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{field: value})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of toy, nanogpt-cpu, default, gpt2"):
        preset("huge")


@pytest.mark.parametrize("name,low,high", [("toy", 200_000, 300_000), ("default", 18_000_000, 20_000_000)])
def test_preset_parameter_counts(name, low, high):
    assert low <= GPT(preset(name, vocab_size=65)).num_parameters() <= high


def test_gpt2_preset_has_gpt2_small_parameter_count():
    config = preset("gpt2")
    assert (config.d_model, config.n_heads, config.n_layers, config.max_seq_len, config.vocab_size) == (
        768, 12, 12, 1024, 50304)
    # GPT-2 small: 124,439,808 parameters with tied embeddings (the figure Hugging Face reports), plus
    # the 47 padding rows of the embedding (vocabulary 50304, a multiple of 64).
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_parameters() == 124_439_808 + 47 * 768


def test_default_preset_is_the_original_design():
    config = preset("default", vocab_size=65)
    assert (config.d_model, config.n_heads, config.d_ff, config.n_layers, config.pos_encoding) == (
        512, 8, 2048, 6, "sinusoidal")


def test_sinusoidal_table_follows_the_formula():
    table = sinusoidal_positions(10, 8)
    pos, i = 7, 2
    assert math.isclose(table[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 8)), rel_tol=1e-5)
    assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 8)), rel_tol=1e-5)


def test_tied_embeddings_share_one_tensor():
    model = GPT(small_config())
    assert model.lm_head.weight is model.token_embedding.weight
    untied = GPT(small_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.token_embedding.weight
    assert untied.num_parameters() == model.num_parameters() + 50 * 32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_model_is_causal(backend, pos_encoding, restore_backend):
    """Changing tokens after position t leaves the outputs at positions <= t unchanged."""
    ops.set_backend(backend)
    model = GPT(small_config(pos_encoding=pos_encoding)).eval()
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 50, (2, 8))
    out, out_changed = model(idx), model(changed)
    assert torch.allclose(out[:, :12], out_changed[:, :12], atol=1e-6)
    assert not torch.allclose(out[:, 12:], out_changed[:, 12:])


@pytest.mark.parametrize("bias", [True, False])
def test_backends_agree_on_the_model(bias, restore_backend):
    model = GPT(small_config(bias=bias, activation="gelu_tanh"))
    idx = torch.randint(0, 50, (3, 17))
    results = {}
    for backend in BACKENDS:
        ops.set_backend(backend)
        model.zero_grad()
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    (loss_r, grads_r), (loss_t, grads_t) = results["reference"], results["torch"]
    assert torch.allclose(loss_r, loss_t, atol=1e-5)
    for g_r, g_t in zip(grads_r, grads_t):
        assert torch.allclose(g_r, g_t, atol=1e-5, rtol=1e-4)


def test_loss_equals_cross_entropy_of_logits():
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 50, (2, 10))
    targets = torch.randint(0, 50, (2, 10))
    targets[0, 3] = -1
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-1)
    assert torch.allclose(model.loss(idx, targets), expected, atol=1e-6)


def test_initial_loss_is_near_uniform():
    model = GPT(small_config())
    idx = torch.randint(0, 50, (4, 24))
    assert abs(model.loss(idx, idx).item() - math.log(50)) < 0.3


def test_dropout_only_in_training():
    model = GPT(small_config(dropout=0.5))
    idx = torch.randint(0, 50, (2, 10))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_sequence_longer_than_context_is_rejected():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="sequence length 25 exceeds max_seq_len 24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_generate_appends_tokens_and_is_seeded():
    model = GPT(small_config()).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    first = model.generate(prompt, 30, generator=torch.Generator().manual_seed(5))
    second = model.generate(prompt, 30, generator=torch.Generator().manual_seed(5))
    assert first.shape == (1, 33) and torch.equal(first, second)
    assert torch.equal(first[:, :3], prompt)


def test_presets_table_fields_are_config_fields():
    for name, values in PRESETS.items():
        assert set(values) <= set(GPTConfig.__dataclass_fields__), name
