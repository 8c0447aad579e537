"""GPT-2 interchange with Hugging Face (engine.hf), checked offline against transformers' GPT2LMHeadModel."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.hf import entry_point, import_folder
from engine.sample import load_model
from engine.sample import main as sample_main
from engine.train import main as train_main

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
CORPUS = "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n" * 30


pytestmark = pytest.mark.usefixtures("single_thread")


def hf_model(vocab_size=61, activation="gelu_new", n_layer=2):
    """A small random GPT-2 (odd FFN width, non-zero biases and LayerNorm parameters)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4,
                                     n_inner=80, activation_function=activation, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def train_run(folder: Path, *flags: str) -> Path:
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS)
    run = folder / "run"
    assert train_main(["--data", str(corpus), "--d-model", "32", "--n-heads", "4", "--n-layers", "2", "--d-ff", "80",
                       "--max-seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--eval-iters", "1",
                       "--sample-tokens", "0", "--device", "cpu", "--out", str(run), *flags]) == 0
    return run


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_imported_model_gives_the_logits_of_transformers(tmp_path, activation):
    reference = hf_model(activation=activation)
    reference.save_pretrained(tmp_path / "hf")
    import_folder(tmp_path / "hf", tmp_path / "run")
    model, tokenizer, state = load_model(tmp_path / "run" / "checkpoint.pt")
    assert model.config.activation == ("gelu_tanh" if activation == "gelu_new" else "gelu")
    assert (model.config.d_ff, model.config.max_seq_len, model.config.pos_encoding) == (80, 32, "learned")
    assert tokenizer.kind == "ids" and state["step"] == 0
    idx = torch.randint(61, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-5, rtol=1e-5)


def test_exported_run_loads_in_transformers_with_the_same_logits(tmp_path):
    run = train_run(tmp_path, "--pos-encoding", "learned", "--activation", "gelu_tanh")
    assert entry_point(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    model, tokenizer, _ = load_model(run / "checkpoint.pt")
    idx = torch.randint(tokenizer.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reference(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["activation_function"], config["n_inner"]) == ("gpt2", "gelu_new", 80)

    # And back: the re-imported run has the same weights and the character tokenizer, and samples text.
    assert entry_point(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "again")]) == 0
    again = load_checkpoint(tmp_path / "again")
    original = load_checkpoint(run)
    assert again["model"].keys() == original["model"].keys()
    for name, tensor in original["model"].items():
        assert torch.equal(again["model"][name], tensor), name
    assert again["tokenizer"] == original["tokenizer"]
    samples = [sample(folder, "--prompt", "Friends", "--tokens", "12", "--seed", "3")
               for folder in (run, tmp_path / "again")]
    assert samples[0] == samples[1] and samples[0].startswith("Friends")


def test_a_padded_vocabulary_exports_the_tokenizer_words_with_the_same_logits(tmp_path):
    # --vocab-size 64 pads the character tokenizer's vocabulary (as the gpt2 preset pads 50257 to 50304).
    run = train_run(tmp_path, "--pos-encoding", "learned", "--vocab-size", "64")
    assert entry_point(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    model, tokenizer, _ = load_model(run / "checkpoint.pt")
    assert model.config.vocab_size == 64 > tokenizer.vocab_size
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.vocab_size == tokenizer.vocab_size
    idx = torch.randint(tokenizer.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reference(idx).logits, model(idx)[..., :tokenizer.vocab_size], atol=1e-5, rtol=1e-5)


class Collect:
    """A text stream that keeps what is written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def sample(run: Path, *flags: str) -> str:
    out = Collect()
    assert sample_main(["--run", str(run), "--device", "cpu", *flags], out=out) == 0
    return out.text


def test_a_non_gpt2_shaped_model_refuses_export(tmp_path, capsys):
    run = train_run(tmp_path, "--no-tie-embeddings")  # sinusoidal positions, untied head
    assert entry_point(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this model does not have GPT-2's architecture") and err.count("\n") == 1
    assert "pos_encoding is 'sinusoidal'" in err and "tie_embeddings is off" in err
    assert not (tmp_path / "hf").exists()


def test_imported_gpt2_trains_on_token_ids_and_samples_through_its_hf_tokenizer(tmp_path):
    # A byte-level BPE tokenizer with no merges: ids 0..255 are the bytes, 256 is <|endoftext|>.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {symbol: b for b, symbol in enumerate(symbols)} | {"<|endoftext|>": 256}
    hf = tmp_path / "hf"
    hf_model(vocab_size=257).save_pretrained(hf)
    transformers.GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(hf)
    data = tmp_path / "ids"
    data.mkdir()
    for split, size in (("train", 4000), ("val", 500)):
        np.random.default_rng(0).integers(0, 257, size).astype(np.uint16).tofile(data / f"{split}.bin")

    assert entry_point(["import", str(hf), "--out", str(tmp_path / "run"), "--data", str(data)]) == 0
    run = tmp_path / "run"
    assert (run / "hf_tokenizer").is_dir()
    text = sample(run, "--prompt", "Hi \u00e9", "--tokens", "8")
    assert text.startswith("Hi \u00e9")
    ids = sample(run, "--prompt-ids", "72 105", "--tokens", "5").split()
    assert ids[:2] == ["72", "105"] and len(ids) == 7 and all(0 <= int(i) < 257 for i in ids)

    assert train_main(["--resume", str(run), "--max-steps", "2", "--batch-size", "2", "--eval-iters", "1",
                       "--sample-tokens", "0", "--warmup-steps", "0", "--lr", "1e-4"]) == 0
    resumed = load_checkpoint(run)
    assert resumed["step"] == 2 and resumed["model_config"]["vocab_size"] == 257


def test_engine_imports_and_exports_without_transformers(tmp_path):
    run = train_run(tmp_path, "--pos-encoding", "learned")
    script = (
        "import sys; sys.modules['transformers'] = None; sys.modules['tensorboard'] = None\n"
        "import engine.hf, engine.sample, engine.viz, engine.train\n"
        f"sys.exit(engine.hf.entry_point(['export', '--run', {str(run)!r}, '--out', {str(tmp_path / 'hf')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def write_config(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("prepare,message", [
    (lambda tmp: tmp / "missing", "Hugging Face folder .*missing does not exist"),
    (lambda tmp: tmp, "has no config.json: not a Hugging Face model folder"),
    (lambda tmp: (write_config(tmp / "llama", model_type="llama"), tmp / "llama")[1],
     "model_type is 'llama', only 'gpt2' imports"),
    (lambda tmp: (write_config(tmp / "relu", model_type="gpt2", activation_function="relu", vocab_size=5, n_embd=8,
                               n_head=2, n_layer=1, n_positions=8), tmp / "relu")[1],
     "activation_function 'relu'"),
    (lambda tmp: (write_config(tmp / "noweights", model_type="gpt2", vocab_size=5, n_embd=8, n_head=2, n_layer=1,
                               n_positions=8), tmp / "noweights")[1], "has no model.safetensors"),
])
def test_import_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, prepare, message):
    assert entry_point(["import", str(prepare(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_import_refuses_weights_that_do_not_match_the_config(tmp_path, capsys):
    hf_model(n_layer=2).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"n_layer": 3}))
    assert entry_point(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "missing ['transformer.h.2.ln_1.weight'" in capsys.readouterr().err


def test_import_refuses_an_engine_run_folder_and_an_existing_run(tmp_path, capsys):
    run = train_run(tmp_path, "--pos-encoding", "learned")
    assert entry_point(["import", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "it is an engine run: export it with python -m engine.hf export --run" in capsys.readouterr().err
    hf_model().save_pretrained(tmp_path / "hf")
    assert entry_point(["import", str(tmp_path / "hf"), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert entry_point(["export", "--run", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "already holds a model" in capsys.readouterr().err
