"""Generation: the KV cache against full recomputation, sampling filters, and the engine.sample CLI."""
from __future__ import annotations

import re

import pytest
import torch

from engine import ops
from engine.data import ByteTokenizer
from engine.model import GPT, GPTConfig, KVCache, sample_next_token
from engine.sample import StreamDecoder, entry_point
from engine.sample import main as sample_main
from engine.train import main as train_main

CORPUS = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def tiny_model(pos_encoding: str, max_seq_len: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=37, d_model=32, n_heads=4, d_ff=48, n_layers=2, max_seq_len=max_seq_len,
                       pos_encoding=pos_encoding, activation="gelu_tanh" if pos_encoding == "learned" else "gelu")
    return GPT(config).eval()


pytestmark = pytest.mark.usefixtures("single_thread", "restore_backend")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny character-level run, trained for a few steps through the real CLI."""
    folder = tmp_path_factory.mktemp("sample")
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS)
    run = folder / "run"
    status = train_main(["--data", str(corpus), "--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64",
                         "--max-seq-len", "24", "--batch-size", "4", "--max-steps", "6", "--eval-interval", "6",
                         "--eval-iters", "1", "--log-interval", "3", "--sample-tokens", "0", "--device", "cpu",
                         "--out", str(run)])
    assert status == 0
    return run


# ----------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_prefill_then_decode_matches_full_forward(pos_encoding, backend):
    ops.set_backend(backend)
    model = tiny_model(pos_encoding)
    idx = torch.randint(37, (2, 11))
    with torch.no_grad():
        full = model(idx)  # (2, 11, V)
        cache = KVCache(model.config.n_layers)
        steps = [model(idx[:, :6], cache)]
        for t in range(6, 11):
            assert len(cache) == t
            steps.append(model(idx[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5},
                                      {"temperature": 1.3, "top_p": 0.8}, {"temperature": 0.0}])
def test_cached_generation_gives_the_uncached_tokens_past_max_seq_len(pos_encoding, settings):
    # 5 prompt tokens + 30 new ones: the last 19 steps run with the window full (max_seq_len 16).
    model = tiny_model(pos_encoding)
    prompt = torch.randint(37, (2, 5))
    cached = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3), **settings)
    uncached = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3), use_cache=False, **settings)
    assert cached.shape == (2, 35)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)


def test_each_new_token_costs_one_position_until_the_window_is_full():
    model = tiny_model("sinusoidal", max_seq_len=8)
    positions = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: positions.append(args[0].shape[1]))
    list(model.stream(torch.zeros(1, 3, dtype=torch.long), 8, generator=torch.Generator().manual_seed(0)))
    # Prefill of 3, then 1 per token up to 8 cached positions, then the window slides: re-encode 8 per token.
    assert positions == [3, 1, 1, 1, 1, 1, 8, 8]
    positions.clear()
    list(model.stream(torch.zeros(1, 3, dtype=torch.long), 4, use_cache=False))
    assert positions == [3, 4, 5, 6]


def test_cache_refuses_a_multi_token_step_and_positions_past_max_seq_len():
    model = tiny_model("learned", max_seq_len=8)
    cache = KVCache(model.config.n_layers)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="one token at a time, got 2"):
            model(torch.zeros(1, 2, dtype=torch.long), cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len 8"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_cached_decode_on_cuda_matches_full_forward(backend, dtype, tolerance):
    # On CUDA, auto picks the fused kernels: the decode step is their T_q = 1, causal=False case.
    ops.set_backend(backend)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, d_model=128, n_heads=4, d_ff=256, n_layers=3, max_seq_len=64,
                       pos_encoding="learned", activation="gelu_tanh")
    model = GPT(config).cuda().eval()
    idx = torch.randint(101, (3, 40), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        full = model(idx).float()
        cache = KVCache(config.n_layers)
        steps = [model(idx[:, :17], cache).float()]
        steps += [model(idx[:, t:t + 1], cache).float() for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=tolerance, rtol=tolerance)
    if dtype == torch.float32:
        # Sampling (not argmax, which would flip on a near tie) through the window's end at 64 tokens.
        cached = model.generate(idx[:, :5], 80, generator=torch.Generator("cuda").manual_seed(1))
        uncached = model.generate(idx[:, :5], 80, generator=torch.Generator("cuda").manual_seed(1), use_cache=False)
        assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------- sampling filters

def test_sampling_filters_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, 3.8]]).repeat(400, 1)
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, temperature=0.0).unique().tolist() == [0]
    assert sample_next_token(logits, top_k=1, generator=generator).unique().tolist() == [0]
    assert sorted(sample_next_token(logits, top_k=2, generator=generator).unique().tolist()) == [0, 1]
    # Probabilities about 0.36, 0.33, 0.30, ...: top_p 0.5 keeps the first two, 0.3 only the first.
    assert sorted(sample_next_token(logits, top_p=0.5, generator=generator).unique().tolist()) == [0, 1]
    assert sample_next_token(logits, top_p=0.3, generator=generator).unique().tolist() == [0]
    assert sorted(sample_next_token(logits, generator=generator).unique().tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs,message", [({"temperature": -1.0}, "temperature must be >= 0"),
                                            ({"top_k": 0}, "top_k must be a positive integer"),
                                            ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                                            ({"top_p": 1.5}, r"top_p must be in \(0, 1\]")])
def test_invalid_sampling_settings_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next_token(torch.zeros(1, 5), **kwargs)


def test_stream_decoder_holds_back_incomplete_utf8_characters():
    tokenizer = ByteTokenizer()
    text = "naïve €5 ✓"
    decoder = StreamDecoder(tokenizer, tokenizer.encode("a"))
    pieces = [decoder.feed(byte) for byte in text.encode("utf-8")]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)


# ----------------------------------------------------------------------------- the CLI

class Recorder:
    """A text stream that keeps each write, to see tokens arrive one at a time."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.writes)


def sample_text(run_dir, *flags) -> Recorder:
    out = Recorder()
    assert sample_main(["--run", str(run_dir), "--device", "cpu", *flags], out=out) == 0
    return out


def test_sampling_streams_tokens_and_is_deterministic_with_a_seed(run_dir):
    first = sample_text(run_dir, "--prompt", "To be", "--tokens", "40", "--seed", "7", "--top-k", "10")
    assert first.text.startswith("To be")
    assert len(first.text) == len("To be") + 40 + 1  # one character per token, then a newline
    assert len([piece for piece in first.writes if piece]) >= 40  # printed as the tokens came
    again = sample_text(run_dir, "--prompt", "To be", "--tokens", "40", "--seed", "7", "--top-k", "10")
    uncached = sample_text(run_dir, "--prompt", "To be", "--tokens", "40", "--seed", "7", "--top-k", "10",
                           "--no-cache")
    other_seed = sample_text(run_dir, "--prompt", "To be", "--tokens", "40", "--seed", "8", "--top-k", "10")
    assert again.text == first.text == uncached.text
    assert other_seed.text != first.text


def test_checkpoint_flag_and_top_p_and_greedy(run_dir):
    greedy = sample_text(run_dir, "--tokens", "20", "--temperature", "0")
    out = Recorder()
    assert sample_main(["--checkpoint", str(run_dir / "checkpoint.pt"), "--device", "cpu", "--tokens", "20",
                        "--temperature", "0", "--seed", "99", "--top-p", "0.9"], out=out) == 0
    assert out.text == greedy.text  # greedy ignores the seed and the filters


@pytest.mark.parametrize("make_args,message", [
    (lambda run, tmp: ["--run", str(tmp / "missing")], "run folder .*missing does not exist"),
    (lambda run, tmp: ["--run", str(tmp)], "is not a run folder: it has no checkpoint.pt"),
    (lambda run, tmp: ["--checkpoint", str(run)], "--checkpoint takes a file"),
    (lambda run, tmp: ["--run", str(run), "--prompt", "To be \u00e9"], "character 'é' is not in the tokenizer's"),
    (lambda run, tmp: ["--run", str(run), "--prompt", ""], "the prompt is empty"),
    (lambda run, tmp: ["--run", str(run), "--prompt-ids", "1 x"], "--prompt-ids takes whitespace-separated integers"),
    (lambda run, tmp: ["--run", str(run), "--prompt-ids", "5000"], r"prompt token ids must be in \[0, "),
    (lambda run, tmp: ["--run", str(run), "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (lambda run, tmp: ["--run", str(run), "--tokens", "0"], "--max-new-tokens must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_status_2(run_dir, tmp_path, capsys, make_args, message):
    assert entry_point(make_args(run_dir, tmp_path) + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_a_truncated_checkpoint_is_a_clear_error(run_dir, tmp_path, capsys):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    assert entry_point(["--run", str(broken)]) == 2
    assert "is truncated or not a checkpoint" in capsys.readouterr().err
