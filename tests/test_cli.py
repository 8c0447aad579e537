"""`python -m engine.train` as a user runs it: end to end, signals, and every bad input.

Bad input must give one line on stderr starting with "error:", exit status 2, no traceback,
and leave an existing run folder exactly as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "2", "--max-seq-len", "32",
         "--batch-size", "4", "--eval-iters", "2", "--sample-tokens", "0"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.train", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    result = run_cli(*SMALL, "--data", corpus, "--max-steps", "20", "--log-interval", "5", "--eval-interval", "10",
                     "--sample-tokens", "60", "--out", run)
    assert result.returncode == 0, result.stderr
    return run


def test_end_to_end_training_prints_losses_and_a_sample(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [5, 10, 15, 20]
    for row in rows:
        if "loss" in row:
            assert set(row) >= {"step", "loss", "lr", "tokens_per_s", "tokens", "elapsed_s"}
    assert [row["step"] for row in rows if "val_loss" in row] == [10, 20]
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["train"]["max_steps"] == 20


def test_stdout_shows_progress_and_sample(tmp_path, corpus):
    result = run_cli(*SMALL, "--data", corpus, "--max-steps", "10", "--log-interval", "5", "--eval-interval", "10",
                     "--sample-tokens", "30", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "step 5/10 | loss" in result.stdout and "tok/s" in result.stdout
    assert "step 10: train loss" in result.stdout and "val loss" in result.stdout
    assert "\nsample:\n" in result.stdout


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_continues(tmp_path, corpus, signal_number):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.train", *SMALL, "--data", str(corpus), "--max-steps", "100000",
         "--log-interval", "1", "--eval-interval", "100000", "--out", str(run)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr
    step = load_checkpoint(run)["step"]
    assert step >= 3
    assert f"{signal.Signals(signal_number).name} received: saved the checkpoint at step {step}" in stdout
    resumed = run_cli("--resume", run, "--max-steps", step + 2)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run)["step"] == step + 2


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    cases = [
        (tmp_path / "missing.txt", "does not exist"),
        (empty, "is empty"),
        (binary, "looks binary"),
    ]
    for path, expected in cases:
        assert_one_line_error(run_cli(*SMALL, "--data", path, "--out", tmp_path / "out"), expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["--d-model", "100", "--n-heads", "8"], "d_model (100) must be divisible by n_heads (8)"),
    (["--lr", "-1"], "lr must be positive, got -1.0"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--backend", "fast"], "unknown backend 'fast'"),
    (["--backend", "cuda"], "backend 'cuda' is unavailable"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--max-time", "soon"], "invalid duration 'soon'"),
    (["--device", "cuda"], "no CUDA GPU is available"),
])
def test_bad_flags(tmp_path, corpus, args, expected):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("a GPU is present")
    assert_one_line_error(run_cli(*SMALL, "--data", corpus, *args, "--out", tmp_path / "out"), expected)
    assert not (tmp_path / "out").exists()


def test_triton_without_gpu_or_interpreter_is_unavailable(tmp_path, corpus):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run_cli(*SMALL, "--data", corpus, "--backend", "triton", "--out", tmp_path / "out", env=env)
    assert_one_line_error(result, "backend 'triton' is unavailable: no CUDA GPU")
    assert "available: reference, torch" in result.stderr


def test_existing_run_is_never_overwritten(finished_run, corpus):
    before = folder_digest(finished_run)
    result = run_cli(*SMALL, "--data", corpus, "--max-steps", "5", "--out", finished_run)
    assert_one_line_error(result, f"{finished_run} already holds a run; continue it with --resume")
    assert folder_digest(finished_run) == before


def test_resume_with_mismatched_config_is_refused(finished_run, corpus):
    before = folder_digest(finished_run)
    assert_one_line_error(run_cli("--resume", finished_run, "--d-model", "64"),
                          "checkpoint config mismatch: d_model is 32 in the checkpoint but --d-model 64 was given")
    assert_one_line_error(run_cli("--resume", finished_run, "--preset", "toy"), "checkpoint config mismatch")
    assert_one_line_error(run_cli("--resume", finished_run, "--data", corpus.parent / "other.txt"),
                          "checkpoint config mismatch: data")
    assert folder_digest(finished_run) == before


def test_bad_checkpoints(tmp_path, finished_run):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (finished_run / "checkpoint.pt").read_bytes()
    (truncated / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(3)}, foreign / "checkpoint.pt")
    text = tmp_path / "text"
    text.mkdir()
    (text / "checkpoint.pt").write_text("not a checkpoint at all")
    for folder, expected in [(truncated, "is truncated or not a checkpoint"),
                             (foreign, "is not a gpt-engine checkpoint"),
                             (text, "is truncated or not a checkpoint"),
                             (tmp_path / "missing", "does not exist"),
                             (tmp_path, "no checkpoint.pt in")]:
        before = folder_digest(folder) if folder.exists() else None
        assert_one_line_error(run_cli("--resume", folder), expected)
        if before is not None:
            assert folder_digest(folder) == before


def test_unwritable_output_folder(tmp_path, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(run_cli(*SMALL, "--data", corpus, "--out", blocker / "run"),
                          "cannot write to output folder")


def test_list_backends():
    result = run_cli("--list-backends")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["reference", "torch", "triton", "cuda", "cpp"]
