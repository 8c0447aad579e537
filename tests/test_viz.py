"""engine.viz figures (valid, sensibly sized PNGs; attention weights that are the model's own) and the
TensorBoard mirror of metrics.jsonl."""
from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch

pytest.importorskip("matplotlib")

import engine.trainer  # after the skip check: engine.viz needs matplotlib
from engine import ops
from engine.model import GPT, GPTConfig
from engine.train import entry_point as train_entry_point
from engine.train import main as train_main
from engine.viz import attention_weights, mean_attention_distance
from engine.viz import entry_point as viz_entry_point
from engine.viz import main as viz_main

CORPUS = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_MODEL = ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64", "--max-seq-len", "24"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained through the CLI with TensorBoard on: metrics with 3 log rows and 2 evaluations."""
    folder = tmp_path_factory.mktemp("viz")
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS)
    run = folder / "run"
    status = train_main(["--data", str(corpus), *TINY_MODEL, "--batch-size", "4", "--max-steps", "6",
                         "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "2", "--sample-tokens", "0",
                         "--device", "cpu", "--tensorboard", "--out", str(run)])
    assert status == 0
    ops.set_backend("auto")
    return run


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_figure(path) -> None:
    width, height = png_size(path)
    assert 400 <= width <= 4000 and 300 <= height <= 4000, (path.name, width, height)
    assert path.stat().st_size > 15_000, f"{path.name} is suspiciously small (blank?)"


def test_viz_writes_every_figure_as_a_sensible_png(run_dir, capsys):
    assert viz_main(["--run", str(run_dir), "--layer", "0"]) == 0
    names = ["loss.png", "attention_layer0.png", "attention_distance.png", "positional_encoding.png"]
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / "plots" / name) for name in names]
    for name in names:
        check_figure(run_dir / "plots" / name)


def test_learned_positions_and_a_checkpoint_without_metrics(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    run = tmp_path / "run"
    assert train_main(["--data", str(corpus), *TINY_MODEL, "--pos-encoding", "learned", "--n-heads", "4",
                       "--batch-size", "2", "--max-steps", "1", "--eval-iters", "1", "--sample-tokens", "0",
                       "--device", "cpu", "--out", str(run)]) == 0
    (run / "metrics.jsonl").unlink()
    out = tmp_path / "figures"
    assert viz_main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(out), "--prompt", "It is the east"]) == 0
    assert "skipping loss.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["attention_distance.png", "attention_layer1.png",
                                                     "positional_encoding.png"]
    for path in out.iterdir():
        check_figure(path)


def test_attention_weights_are_the_ones_the_model_applies():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, d_model=32, n_heads=4, d_ff=32, n_layers=3, max_seq_len=16)).eval()
    idx = torch.randint(20, (1, 9))
    inputs, outputs = [], []
    layer = model.blocks[1].attn

    def capture(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    layer.register_forward_hook(capture)
    weights = attention_weights(model, idx)  # (L, H, T, T)
    assert weights.shape == (3, 4, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 9))
    assert torch.all(weights.triu(diagonal=1) == 0)
    # Rebuild layer 1's output from the drawn weights: weights @ V, heads merged, output projection.
    with torch.no_grad():
        v = layer.qkv(inputs[0]).split(32, dim=2)[2].view(1, 9, 4, 8).transpose(1, 2)  # (1, H, T, D)
        rebuilt = layer.proj((weights[1] @ v[0]).transpose(0, 1).reshape(1, 9, 32))
    torch.testing.assert_close(rebuilt, outputs[0], atol=1e-5, rtol=1e-5)


def test_mean_attention_distance():
    T = 6
    on_self = torch.eye(T).expand(1, 2, T, T)
    on_first = torch.zeros(1, 2, T, T)
    on_first[..., 0] = 1.0
    assert torch.equal(mean_attention_distance(on_self), torch.zeros(1, 2))
    torch.testing.assert_close(mean_attention_distance(on_first), torch.full((1, 2), (T - 1) / 2))


@pytest.mark.parametrize("make_args,message", [
    (lambda run, tmp: ["--run", str(tmp / "missing")], "run folder .*missing does not exist"),
    (lambda run, tmp: ["--run", str(tmp)], "is not a run folder"),
    (lambda run, tmp: ["--run", str(run), "--layer", "2"], r"--layer must be in \[-2, 2\)"),
    (lambda run, tmp: ["--run", str(run), "--prompt", "ROMEO \u00e9"], "character 'é' is not in the tokenizer's"),
])
def test_bad_input_is_one_line_and_exit_status_2(run_dir, tmp_path, capsys, make_args, message):
    assert viz_entry_point(make_args(run_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err


# ----------------------------------------------------------------------------- TensorBoard

def test_tensorboard_mirrors_the_metrics_rows(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "train_loss", "val_loss"} <= set(events.Tags()["scalars"])
    for name in ("loss", "lr", "grad_norm", "val_loss", "train_loss"):
        expected = [(row["step"], row[name]) for row in rows if name in row]
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in logged] == [step for step, _ in expected]
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(logged, expected))
    assert all(row["grad_norm"] > 0 for row in rows if "loss" in row)


def test_tensorboard_flag_without_the_package_is_one_line(monkeypatch, tmp_path, capsys):
    real_find_spec = engine.trainer.importlib.util.find_spec
    monkeypatch.setattr(engine.trainer.importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real_find_spec(name, *args))
    assert train_entry_point(["--tensorboard", "--max-steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: tensorboard logging was requested but the tensorboard package is not installed "
                   "(pip install tensorboard)\n")
    assert not (tmp_path / "run").exists()

