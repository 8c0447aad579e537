"""The training loop in-process: learning, schedule, checkpoints and exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import VERSION, load_checkpoint, save_checkpoint
from engine.errors import UsageError
from engine.train import main
from engine.trainer import TrainConfig, learning_rate

SMALL_MODEL = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "2", "--max-seq-len", "32"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metrics(run) if "loss" in row}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n" for i in range(400)]
    path.write_text("".join(lines))
    return path


def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.55)  # halfway through the cosine
    assert learning_rate(110, config) == pytest.approx(0.1)
    assert learning_rate(500, config) == pytest.approx(0.1)


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"min_lr must be in \[0, lr=0.001\], got 0.5"):
        TrainConfig(min_lr=0.5)


def test_loss_falls_on_the_default_corpus(tmp_path, capsys):
    run = tmp_path / "run"
    status = main(["--preset", "toy", "--max-seq-len", "64", "--batch-size", "16", "--max-steps", "40",
                   "--lr", "3e-3", "--warmup-steps", "5", "--log-interval", "5", "--eval-interval", "40",
                   "--eval-iters", "4", "--sample-tokens", "40", "--out", str(run)])
    assert status == 0
    losses = train_losses(run)
    # From about ln(71) = 4.26 (uniform over the characters) to below the unigram entropy (~3.4).
    assert losses[40] < losses[5] - 0.5 and losses[40] < 3.4, losses
    evaluation = [row for row in metrics(run) if "val_loss" in row]
    assert len(evaluation) == 1 and evaluation[0]["val_loss"] < 3.5
    out = capsys.readouterr().out
    assert "sample:" in out and "preset 'toy'" in out
    for name in ("checkpoint.pt", "config.json", "tokenizer.json", "metrics.jsonl"):
        assert (run / name).is_file(), name


def common_args(corpus: Path) -> list[str]:
    return [*SMALL_MODEL, "--data", str(corpus), "--batch-size", "4", "--dropout", "0.1", "--log-interval", "1",
            "--eval-interval", "100", "--eval-iters", "2", "--sample-tokens", "0", "--warmup-steps", "3"]


def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path, corpus):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*common_args(corpus), "--max-steps", "12", "--out", str(whole)]) == 0
    assert main([*common_args(corpus), "--max-steps", "6", "--lr-decay-steps", "12", "--out", str(split)]) == 0
    assert load_checkpoint(split)["step"] == 6
    assert main(["--resume", str(split), "--max-steps", "12"]) == 0
    whole_losses, split_losses = train_losses(whole), train_losses(split)
    assert sorted(split_losses) == list(range(1, 13))  # no duplicated or missing rows after resuming
    assert split_losses == whole_losses  # bit-identical on the CPU
    a, b = load_checkpoint(whole)["model"], load_checkpoint(split)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_version_1_checkpoint_resumes_exactly(tmp_path, corpus):
    """Format version 1 named the feed-forward layers blocks.N.fc1/fc2; version 2 blocks.N.ffn.fc1/fc2."""
    whole, old = tmp_path / "whole", tmp_path / "old"
    assert main([*common_args(corpus), "--max-steps", "8", "--out", str(whole)]) == 0
    assert main([*common_args(corpus), "--max-steps", "4", "--lr-decay-steps", "8", "--out", str(old)]) == 0
    state = torch.load(old / "checkpoint.pt", weights_only=True)

    def version_1_name(name):
        return name.replace(".ffn.fc", ".fc")

    state["model"] = {version_1_name(name): tensor for name, tensor in state["model"].items()}
    state["optimizer"]["state"] = {version_1_name(name): entry for name, entry in state["optimizer"]["state"].items()}
    for group in state["optimizer"]["param_groups"]:
        group["params"] = [version_1_name(name) for name in group["params"]]
    assert "blocks.0.fc1.weight" in state["model"] and "blocks.0.fc1.weight" in state["optimizer"]["state"]
    save_checkpoint({**state, "version": 1}, old / "checkpoint.pt")
    assert main(["--resume", str(old), "--max-steps", "8"]) == 0
    assert train_losses(old) == train_losses(whole)
    a, b = load_checkpoint(whole)["model"], load_checkpoint(old)["model"]
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)


def test_a_checkpoint_of_an_unknown_version_names_the_versions_it_can_read(tmp_path):
    save_checkpoint({"version": 99}, tmp_path / "checkpoint.pt")  # save_checkpoint adds the format
    with pytest.raises(UsageError, match=f"has format version 99, expected 1 or {VERSION}"):
        load_checkpoint(tmp_path)


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    assert main([*common_args(corpus), "--max-steps", "4", "--out", str(run)]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 99.0}) + "\n")  # as if logged, then killed before saving
    assert main(["--resume", str(run), "--max-steps", "6"]) == 0
    assert train_losses(run)[5] != 99.0
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5, 6]


def test_max_time_stops_and_saves(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main([*common_args(corpus), "--max-steps", "100000", "--max-time", "1s", "--out", str(run)]) == 0
    step = load_checkpoint(run)["step"]
    assert 0 < step < 100000
    assert f"max_time reached at step {step}" in capsys.readouterr().out


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, corpus):
    """Two micro-batches of 4 give the same first step as... the same 8 sequences drawn in order."""
    args = [*SMALL_MODEL, "--data", str(corpus), "--log-interval", "1", "--eval-interval", "100",
            "--eval-iters", "1", "--sample-tokens", "0", "--max-steps", "1"]
    assert main([*args, "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "accum")]) == 0
    row = metrics(tmp_path / "accum")[0]
    assert row["tokens"] == 4 * 2 * 32 and row["loss"] > 0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_foreign_and_truncated_checkpoints(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {}}, foreign / "checkpoint.pt")
    with pytest.raises(UsageError, match="is not a gpt-engine checkpoint"):
        load_checkpoint(foreign)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    save_checkpoint({"step": 1, "payload": torch.zeros(1000)}, truncated / "checkpoint.pt")
    data = (truncated / "checkpoint.pt").read_bytes()
    (truncated / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="is truncated or not a checkpoint"):
        load_checkpoint(truncated)
