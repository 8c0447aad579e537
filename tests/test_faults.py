"""Faults a long run meets: SIGKILL at any moment, non-finite steps, a full disk, hostile data."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.data import load_token_data
from engine.errors import UsageError
from engine.model import GPTConfig
from engine.train import entry_point, main
from engine.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "2", "--max-seq-len", "32",
         "--batch-size", "4", "--eval-iters", "1", "--sample-tokens", "0", "--backend", "torch"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"now is the winter of our discontent {i}\n" for i in range(300)))
    return path


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """Kill a process that saves a large checkpoint in a loop at random moments: the file is always
    a complete checkpoint, the previous or the new one."""
    target = tmp_path / "checkpoint.pt"
    script = textwrap.dedent(f"""
        import torch
        from engine.checkpoint import save_checkpoint
        payload = torch.randn(4_000_000)  # 16 MB: each save takes a noticeable time
        step = 0
        while True:
            step += 1
            save_checkpoint({{"step": step, "payload": payload, "model": {{}}, "optimizer": {{}},
                             "model_config": {{}}, "train_config": {{}}, "tokenizer": {{}}, "rng": {{}}}},
                            {str(target)!r})
    """)
    rng = random.Random(0)
    last_step = 0
    for _ in range(4):
        process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = load_checkpoint(target)
        assert state["payload"].shape == (4_000_000,)
        assert state["step"] >= 1
        last_step = state["step"]
    assert last_step >= 1
    save_checkpoint({"step": last_step + 1}, target)  # the next save clears temp files of killed saves
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_sigkilled_run_resumes(tmp_path, corpus):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.train", *SMALL, "--data", str(corpus), "--max-steps", "100000",
         "--eval-interval", "2", "--log-interval", "1", "--out", str(run)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and not ((run / "checkpoint.pt").exists() and load_checkpoint(run)["step"] >= 4):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = load_checkpoint(run)["step"]
    assert step >= 4
    assert main(["--resume", str(run), "--max-steps", str(step + 3)]) == 0
    assert load_checkpoint(run)["step"] == step + 3


def make_trainer(tmp_path, corpus, **train_overrides) -> Trainer:
    data = load_token_data(str(corpus))
    model_config = GPTConfig(vocab_size=data.tokenizer.vocab_size, d_model=32, n_heads=2, d_ff=64, n_layers=2,
                             max_seq_len=32)
    config = TrainConfig(batch_size=4, backend="torch", **train_overrides)
    return Trainer(model_config, config, data, tmp_path, torch.device("cpu"), torch.float32)


def test_a_non_finite_step_changes_nothing_and_is_counted(tmp_path, corpus):
    trainer = make_trainer(tmp_path, corpus)
    trainer.train_step()  # one good step, so the optimizer has state
    with torch.no_grad():
        trainer.model.blocks[0].ffn.fc1.bias[0] = float("nan")  # every later loss is NaN
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    moments = {id(p): s["exp_avg"].clone() for p, s in trainer.optimizer.state.items()}
    loss, finite = trainer.train_step()
    assert not finite.item() and loss.item() == 0.0
    assert trainer.guard.skipped_steps.item() == 1 and trainer.guard.bad_streak.item() == 1
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), weights[name]) or name == "blocks.0.ffn.fc1.bias", name
    for p, s in trainer.optimizer.state.items():
        assert torch.equal(s["exp_avg"], moments[id(p)])
        assert s["step"].item() == 1  # the skipped step did not advance Adam's step count


def test_too_many_non_finite_steps_stop_the_run(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    status = main([*SMALL, "--data", str(corpus), "--max-steps", "200", "--lr", "1e9", "--warmup-steps", "0",
                   "--grad-clip", "0", "--max-bad-steps", "3", "--log-interval", "1", "--out", str(run)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "stopping: the loss or gradient norm was not finite for 3 consecutive steps since step" in out
    state = load_checkpoint(run)
    assert state["skipped_steps"] >= 3 and state["step"] < 200


def test_full_disk_is_an_error_before_training(tmp_path, corpus, monkeypatch, capsys):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert entry_point([*SMALL, "--data", str(corpus), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: not enough free disk space in") and "MB needed" in error
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_single_enormous_line_trains(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("lorem ipsum dolor sit amet " * 20_000)  # 540 KB, no newline
    run = tmp_path / "run"
    assert main([*SMALL, "--data", str(path), "--max-steps", "3", "--out", str(run)]) == 0
    assert load_checkpoint(run)["step"] == 3


def test_data_loader_fuzz(tmp_path):
    """Random bytes: the loader either returns token data or raises one UsageError, never anything else."""
    rng = random.Random(1234)
    outcomes = {"data": 0, "error": 0}
    for i in range(150):
        size = rng.choice([0, 1, 7, 100, 5000])
        if rng.random() < 0.5:
            content = bytes(rng.randrange(256) for _ in range(size))
        else:  # mostly text with occasional damage
            content = bytearray("".join(rng.choice("abc \n—é") for _ in range(size)).encode())
            for _ in range(rng.randrange(3)):
                if content:
                    content[rng.randrange(len(content))] = rng.randrange(256)
            content = bytes(content)
        path = tmp_path / f"fuzz{i}.txt"
        path.write_bytes(content)
        try:
            data = load_token_data(str(path), rng.choice(["char", "byte"]))
            data.check_fits(16)
            x, y = data.batch("train", 2, 16, torch.Generator().manual_seed(i))
            assert x.shape == (2, 16) and int(x.max()) < data.tokenizer.vocab_size
            outcomes["data"] += 1
        except UsageError as error:
            assert str(error) and "\n" not in str(error)
            outcomes["error"] += 1
    assert outcomes["data"] > 0 and outcomes["error"] > 0, outcomes


def test_a_streak_between_log_steps_still_stops_the_run(tmp_path, corpus, capsys):
    """The limit counts the longest streak since the last log step, not the streak at the log step."""
    run = tmp_path / "run"
    status = main([*SMALL, "--data", str(corpus), "--max-steps", "200", "--lr", "1e9", "--warmup-steps", "0",
                   "--grad-clip", "0", "--max-bad-steps", "3", "--log-interval", "50", "--out", str(run)])
    assert status == 1
    assert "not finite for" in capsys.readouterr().out
    assert load_checkpoint(run)["step"] == 50  # stopped at the first log step after the streak


def test_a_torn_metrics_line_does_not_block_resume(tmp_path, corpus):
    run = tmp_path / "run"
    assert main([*SMALL, "--data", str(corpus), "--max-steps", "4", "--log-interval", "1", "--out", str(run)]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')  # killed mid-write
    assert main(["--resume", str(run), "--max-steps", "6"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]


def test_max_time_is_per_invocation(tmp_path, corpus):
    run = tmp_path / "run"
    assert main([*SMALL, "--data", str(corpus), "--max-steps", "100000", "--max-time", "1s", "--out", str(run)]) == 0
    first = load_checkpoint(run)["step"]
    assert main(["--resume", str(run), "--max-time", "2s"]) == 0  # two more seconds of training (not inherited)
    assert load_checkpoint(run)["step"] > first + 1


def test_explicit_backend_without_dropout_is_refused_before_the_run_folder(tmp_path, corpus, capsys):
    from engine import ops

    if not ops.available_backends()["cpp"][0]:
        pytest.skip("the cpp backend is not built")
    status = entry_point([*SMALL, "--data", str(corpus), "--backend", "cpp", "--dropout", "0.1",
                          "--out", str(tmp_path / "run")])
    ops.set_backend("auto")
    assert status == 2
    assert "backend 'cpp' does not implement dropout in 'attention'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stale_metrics_without_checkpoint_are_refused(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    assert entry_point([*SMALL, "--data", str(corpus), "--out", str(run)]) == 2
    assert "holds metrics.jsonl of an earlier run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 4.0}\n'


def test_weights_only_checkpoint_starts_a_fresh_optimizer(tmp_path, corpus):
    trainer = make_trainer(tmp_path, corpus)
    state = trainer.state()
    state["optimizer"] = {"state": {}, "param_groups": []}  # what engine.hf import writes, in effect
    data = trainer.data
    resumed = Trainer(trainer.model_config, trainer.config, data, tmp_path, torch.device("cpu"), torch.float32,
                      checkpoint=state)
    assert len(resumed.optimizer.state) == 0  # no zero-lr step taken: Adam's bias correction starts at 1
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name])
