"""The BPE tokenizer: training and caching, the standard tokenizer.json, bits per character, and a
BPE run through training, engine.sample, engine.viz and engine.hf export."""
from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.data import BPE_MIN_VOCAB, BpeTokenizer, bpe_tokenizer, load_token_data, load_tokenizer
from engine.errors import UsageError
from engine.model import GPT, preset
from engine.train import PRESET_TRAINING, build_parser, configs_for_new_run
from engine.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "".join(f"ROMEO: But soft, what light through yonder window breaks? It is line {i}.\n"
                 f"JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father {i}.\n" for i in range(60))
SMALL = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "2", "--max-seq-len", "32",
         "--batch-size", "4", "--eval-iters", "2", "--sample-tokens", "0", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe-corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, corpus) -> Path:
    """A tiny BPE run with GPT-2's architecture (so it exports), trained 4 steps through the CLI."""
    run = tmp_path_factory.mktemp("bpe-runs") / "run"
    status = train_main([*SMALL, "--data", str(corpus), "--tokenizer", "bpe", "--bpe-vocab", "320",
                         "--max-steps", "4", "--log-interval", "2", "--eval-interval", "4",
                         "--pos-encoding", "learned", "--out", str(run)])
    assert status == 0
    return run


def test_bpe_round_trips_any_text_and_has_the_requested_vocabulary():
    tokenizer = BpeTokenizer.train(CORPUS, 320)
    assert tokenizer.vocab_size == 320
    for text in ["ROMEO: But soft", "text it never saw: zebra, 42, é ü 中文 🙂\n\n  tabs\t"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Merges make the corpus shorter than its bytes; the whole-corpus encoder gives encode()'s ids.
    assert len(tokenizer.encode(CORPUS)) < len(CORPUS.encode()) / 2
    assert tokenizer.encode_corpus(CORPUS) == tokenizer.encode(CORPUS)


def test_bpe_vocabulary_the_corpus_cannot_fill_is_an_error():
    with pytest.raises(UsageError, match=r"--bpe-vocab 100000 is more than this corpus allows: .* at (\d+) tokens"):
        BpeTokenizer.train("tiny corpus, tiny corpus", 100000)
    with pytest.raises(UsageError, match=f"--bpe-vocab must be at least {BPE_MIN_VOCAB}"):
        BpeTokenizer.train(CORPUS, 100)


def test_bpe_is_cached_per_corpus_and_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    first = bpe_tokenizer(CORPUS, 300)
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds this tokenizer")

    monkeypatch.setattr(BpeTokenizer, "train", no_training)
    assert bpe_tokenizer(CORPUS, 300).json_text == first.json_text
    with pytest.raises(AssertionError):  # another vocabulary size is another cache entry
        bpe_tokenizer(CORPUS, 310)
    monkeypatch.undo()
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    cached[0].write_text("{ damaged")  # a damaged entry is trained again and replaced
    assert bpe_tokenizer(CORPUS, 300).json_text == first.json_text
    assert cached[0].read_text() == first.json_text


def test_unparsable_tokenizer_json_is_one_line_error_exit_2(tmp_path, corpus):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE"')
    result = subprocess.run([sys.executable, "-m", "engine.train", *SMALL, "--data", str(corpus), "--tokenizer",
                             str(bad), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a valid Hugging Face tokenizer.json" in lines[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="cannot read tokenizer"):
        load_tokenizer(bad)


def test_default_preset_uses_bpe_and_is_about_25m_parameters_toy_stays_characters():
    # One table for every device: --preset default is the same BPE model on a GPU and on a CPU.
    assert PRESET_TRAINING["default"]["tokenizer"] == "bpe" and "tokenizer" not in PRESET_TRAINING["toy"]
    _, _, train_config, _ = configs_for_new_run(build_parser().parse_args(["--preset", "default", "--device", "cpu"]))
    assert train_config.tokenizer == "bpe" and train_config.bpe_vocab == 8192
    _, _, toy_config, _ = configs_for_new_run(build_parser().parse_args(["--preset", "toy"]))
    assert toy_config.tokenizer == "char"
    with torch.device("meta"):
        parameters = GPT(preset("default", vocab_size=8192)).num_parameters()
    assert 22e6 < parameters < 26e6, parameters  # 6 x 512, 8 heads, 2048 FFN, 8192 tied: 23.11M


def test_tokens_per_character_of_the_validation_text(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    text = tmp_path / "corpus.txt"
    text.write_text("naïve café " * 400)
    assert load_token_data(str(text), "char").val_tokens_per_char() == 1.0
    by_bytes = load_token_data(str(text), "byte")
    # Two of the eleven characters of "naïve café " are two bytes each.
    assert by_bytes.val_tokens_per_char() == pytest.approx(13 / 11, rel=0.01)
    bpe = load_token_data(str(text), "bpe", bpe_vocab=265)
    val_text = bpe.tokenizer.decode(bpe.val.tolist())
    assert bpe.val_tokens_per_char() == pytest.approx(len(bpe.val) / len(val_text))
    assert bpe.val_tokens_per_char() < 1.0


def test_bpe_run_saves_a_standard_tokenizer_json(bpe_run):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(bpe_run / "tokenizer.json")
    assert ours.kind == "bpe" and ours.vocab_size == 320
    text = "ROMEO: wherefore art thou, é?"
    assert tokenizers.Tokenizer.from_file(str(bpe_run / "tokenizer.json")).encode(text).ids == ours.encode(text)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_run / "tokenizer.json"))
    assert fast.encode(text) == ours.encode(text) and fast.decode(fast.encode(text)) == text
    config = json.loads((bpe_run / "config.json").read_text())
    assert config["model"]["vocab_size"] == 320 and config["train"]["tokenizer"] == "bpe"


def test_bpe_run_metrics_report_bits_per_character(bpe_run, corpus):
    evaluations = [json.loads(line) for line in (bpe_run / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" in line]
    assert [row["step"] for row in evaluations] == [4]
    data = load_token_data(str(corpus), "bpe", load_tokenizer(bpe_run / "tokenizer.json"))
    expected = evaluations[0]["val_loss"] / math.log(2) * data.val_tokens_per_char()
    assert evaluations[0]["val_bits_per_char"] == pytest.approx(expected)
    assert data.val_tokens_per_char() < 0.5  # BPE tokens span several characters each


def test_bpe_run_samples_and_draws(bpe_run, tmp_path, capsys):
    from engine.sample import main as sample_main
    from engine.viz import main as viz_main

    out = io.StringIO()
    assert sample_main(["--run", str(bpe_run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "1",
                        "--device", "cpu"], out=out) == 0
    text = out.getvalue()
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:\n")
    assert viz_main(["--run", str(bpe_run), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr()
    assert "bits/char" in printed.err and printed.out.split() == [str(tmp_path / "plots" / name) for name in
                                                                   ("loss.png", "attention_layer1.png",
                                                                    "attention_distance.png",
                                                                    "positional_encoding.png")]


def test_bpe_run_exports_a_tokenizer_transformers_loads(bpe_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from engine.hf import export_run, import_folder

    folder = export_run(bpe_run / "checkpoint.pt", tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(bpe_run / "tokenizer.json")
    assert auto.encode("JULIET: Deny thy father") == ours.encode("JULIET: Deny thy father")
    assert auto.eos_token == "<|endoftext|>"
    imported = import_folder(folder, tmp_path / "imported")
    assert load_tokenizer(imported / "tokenizer.json").json_text == ours.json_text


def test_bpe_run_resumes_with_its_own_tokenizer(bpe_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(bpe_run, run)
    assert train_main(["--resume", str(run), "--max-steps", "6", "--eval-interval", "6"]) == 0
    state = load_checkpoint(run)
    assert state["step"] == 6 and state["tokenizer"]["tokenizer_json"] == (bpe_run / "tokenizer.json").read_text()
    assert (run / "tokenizer.json").read_text() == (bpe_run / "tokenizer.json").read_text()
