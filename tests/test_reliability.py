"""Issue 15, tried as an adversary would: one run per folder, every bad input one line, resume from anywhere.

Each test names the promise it checks. Runs are in-process (no torch import per run) with a model of a
few thousand parameters; the one subprocess is the live run that holds its folder.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.train
from engine.checkpoint import load_checkpoint
from engine.data import load_token_data
from engine.errors import UsageError
from engine.hf import entry_point as hf_entry_point
from engine.hf import hf_config, to_hf_tensors
from engine.model import GPT, GPTConfig
from engine.sample import entry_point as sample_entry_point
from engine.train import build_parser, entry_point, main
from engine.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--n-layers", "1", "--max-seq-len", "16",
        "--batch-size", "2", "--eval-iters", "1", "--sample-tokens", "0", "--backend", "torch"]

pytestmark = pytest.mark.usefixtures("single_thread", "restore_backend")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main([*TINY, "--data", str(corpus), "--max-steps", "4", "--log-interval", "2", "--eval-interval", "2",
                 "--out", str(run)]) == 0
    return run


def one_line_error(capsys, status: int, expected: str, code: int = 2) -> str:
    """Assert `status` is `code` and stderr is one 'error: ...' line containing `expected`; return it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    return lines[0]


# ----------------------------------------------------------------------------- 1. one run per folder

def test_a_live_run_holds_its_folder_and_sigkill_releases_it(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.train", *TINY, "--data", str(corpus), "--max-steps", "1000000",
         "--eval-interval", "2", "--log-interval", "1", "--out", str(run)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoint.pt").exists():
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        second = entry_point([*TINY, "--data", str(corpus), "--seed", "2", "--max-steps", "3", "--out", str(run)])
        line = one_line_error(capsys, second, f"pid {process.pid}")
        assert "in use" in line
        resumed = entry_point(["--resume", str(run), "--max-steps", "3"])
        one_line_error(capsys, resumed, f"pid {process.pid}")
        assert process.poll() is None  # the live run was not disturbed
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    step = load_checkpoint(run)["step"]
    assert main(["--resume", str(run), "--max-steps", str(step + 1)]) == 0  # the kernel released the lock
    assert not list(run.glob(".*.tmp"))


def test_default_run_folders_never_collide(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine.train.time, "strftime", lambda pattern, *args: "20260101-120000")  # the same second
    for _ in range(2):
        assert main([*TINY, "--data", str(corpus), "--max-steps", "1"]) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, folders
    assert all((folder / "checkpoint.pt").is_file() for folder in folders)


def test_default_run_folder_is_not_created_for_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, entry_point([*TINY, "--data", str(tmp_path / "missing.txt")]), "does not exist")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- 2. nanoGPT ids

def write_nanogpt(folder: Path, ids: np.ndarray, chars: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    split = len(ids) * 9 // 10
    ids[:split].astype(np.uint16).tofile(folder / "train.bin")
    ids[split:].astype(np.uint16).tofile(folder / "val.bin")
    if chars is not None:
        with open(folder / "meta.pkl", "wb") as handle:
            pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars))}, handle)
    return folder


@pytest.mark.parametrize("chars,bad_id,split", [("abcdefgh", 8, "train"), ("abcdefgh", 200, "val"),
                                                (None, 60000, "train")])
def test_nanogpt_ids_outside_the_vocabulary_are_refused_when_opened(tmp_path, chars, bad_id, split):
    ids = np.arange(1000) % 8
    ids[100 if split == "train" else 950] = bad_id
    folder = write_nanogpt(tmp_path / "data", ids, chars)
    vocab = 50257 if chars is None else len(chars)
    with pytest.raises(UsageError, match=f"{split}.bin holds token id {bad_id} .*vocabulary of {vocab}"):
        load_token_data(str(folder))


# ----------------------------------------------------------------------------- 3. foreign checkpoints

def foreign_run(finished_run: Path, folder: Path, change) -> Path:
    """A copy of finished_run whose checkpoint `change(state)` has edited."""
    shutil.copytree(finished_run, folder)
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "checkpoint.pt")
    return folder


def wrong_shape(state):
    state["model"]["blocks.0.ffn.fc1.weight"] = torch.zeros(7, 16)


def missing_tensor(state):
    del state["model"]["blocks.0.ffn.fc1.weight"]


def wrong_optimizer_shape(state):
    state["optimizer"]["state"]["blocks.0.ffn.fc1.weight"]["exp_avg"] = torch.zeros(7, 16)


FOREIGN = {
    "extra model key": (lambda state: state["model_config"].update(flash=True), "flash"),
    "extra train key": (lambda state: state["train_config"].update(warp_speed=9), "warp_speed"),
    "wrong shape": (wrong_shape, "blocks.0.ffn.fc1.weight has shape (7, 16), the model's config gives (32, 16)"),
    "missing tensor": (missing_tensor, "blocks.0.ffn.fc1.weight"),
    "object inside": (lambda state: state.update(extra=argparse.Namespace(a=1)), "argparse.Namespace"),
    "wrong optimizer shape": (wrong_optimizer_shape, ("the optimizer's blocks.0.ffn.fc1.weight's exp_avg has shape "
                                                      "(7, 16), the parameter has (32, 16)")),
}
TRAIN_ONLY = ("extra train key", "wrong optimizer shape")  # only a resumed run reads these
TOOLS = {
    "train": lambda run, tmp: entry_point(["--resume", str(run), "--max-steps", "6"]),
    "sample": lambda run, tmp: sample_entry_point(["--run", str(run), "--tokens", "2"]),
    "viz": lambda run, tmp: __import__("engine.viz").viz.entry_point(["--run", str(run), "--out", str(tmp / "p")]),
    "hf": lambda run, tmp: hf_entry_point(["export", "--run", str(run), "--out", str(tmp / "hf")]),
}


@pytest.mark.parametrize("case,tool", [(case, tool) for case in FOREIGN for tool in TOOLS
                                       if case not in TRAIN_ONLY or tool == "train"])
def test_foreign_checkpoints_are_one_line_naming_the_mismatch(tmp_path, finished_run, capsys, case, tool):
    if tool == "viz":
        pytest.importorskip("matplotlib")
    change, expected = FOREIGN[case]
    run = foreign_run(finished_run, tmp_path / "run", change)
    line = one_line_error(capsys, TOOLS[tool](run, tmp_path), expected)
    assert "weights_only" not in line and "Traceback" not in line


def test_hf_import_of_weights_that_disagree_with_their_config(tmp_path, capsys):
    pytest.importorskip("safetensors")
    import safetensors.torch

    shape = {"vocab_size": 40, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1, "max_seq_len": 16,
             "pos_encoding": "learned"}
    folder = tmp_path / "hf"
    folder.mkdir()
    safetensors.torch.save_file(to_hf_tensors(GPT(GPTConfig(**shape))), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(GPTConfig(**shape | {"d_ff": 48}))))
    status = hf_entry_point(["import", str(folder), "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, "transformer.h.0.mlp.c_fc.weight has shape (16, 32), the config.json gives (16, 48)")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- 4. and 5. the data on resume

def test_a_relative_data_path_is_stored_resolved(tmp_path, corpus, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    shutil.copy(corpus, first / "corpus.txt")
    monkeypatch.chdir(first)
    assert main([*TINY, "--data", "corpus.txt", "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert load_checkpoint(tmp_path / "run")["train_config"]["data"] == str(first / "corpus.txt")
    monkeypatch.chdir(second)
    assert main(["--resume", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    assert main(["--resume", str(tmp_path / "run"), "--data", str(first / "corpus.txt"), "--max-steps", "4"]) == 0
    monkeypatch.chdir(first)
    assert main(["--resume", str(tmp_path / "run"), "--data", "./corpus.txt", "--max-steps", "5"]) == 0


def test_an_edited_corpus_is_refused_on_resume(tmp_path, corpus, capsys):
    text = tmp_path / "corpus.txt"
    shutil.copy(corpus, text)
    ids = np.arange(1000) % 8
    nanogpt = write_nanogpt(tmp_path / "nanogpt", ids, "abcdefgh")
    for data, edit in ((text, lambda: text.write_text(text.read_text().replace("line 7\n", "line 8\n"))),
                       (nanogpt, lambda: write_nanogpt(nanogpt, np.roll(ids, 1), "abcdefgh"))):
        run = tmp_path / f"run-{data.name}"
        assert main([*TINY, "--data", str(data), "--max-steps", "2", "--out", str(run)]) == 0
        capsys.readouterr()
        edit()
        status = entry_point(["--resume", str(run), "--max-steps", "3"])
        one_line_error(capsys, status, "has changed since the checkpoint")
        assert load_checkpoint(run)["step"] == 2


# ----------------------------------------------------------------------------- 6. non-finite hyperparameters

@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--lr", "nan"], ["--weight-decay", "nan"],
                                   ["--weight-decay", "inf"], ["--grad-clip", "nan"], ["--grad-clip", "inf"],
                                   ["--min-lr", "nan"], ["--beta2", "nan"], ["--max-time", "9" * 400]])
def test_non_finite_hyperparameters_are_refused(tmp_path, corpus, capsys, flags):
    status = entry_point([*TINY, "--data", str(corpus), *flags, "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, "must be a finite number")
    assert not (tmp_path / "run").exists()


def strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_metrics_never_hold_nan_or_infinity(tmp_path, corpus):
    data = load_token_data(str(corpus))
    model_config = GPTConfig(vocab_size=data.tokenizer.vocab_size, d_model=16, n_heads=2, d_ff=32, n_layers=1,
                             max_seq_len=16)
    trainer = Trainer(model_config, TrainConfig(batch_size=2, backend="torch"), data, tmp_path, torch.device("cpu"),
                      torch.float32)
    trainer.metrics.write({"step": 1, "train_loss": float("nan"), "val_loss": float("inf"), "tokens": 64})
    row = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert row["train_loss"] is None and row["val_loss"] is None and row["tokens"] == 64


# ----------------------------------------------------------------------------- 7. read and write errors

def test_an_unreadable_data_file_is_one_line(tmp_path, corpus, monkeypatch, capsys):
    real_read_bytes = Path.read_bytes

    def read_bytes(path):
        if path.name == "corpus.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    status = entry_point([*TINY, "--data", str(corpus), "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, f"cannot read data file {corpus}: Permission denied")


def test_an_unwritable_token_cache_is_one_line(tmp_path, corpus, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(blocker / "cache"))
    status = entry_point([*TINY, "--data", str(corpus), "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, "cannot write the token cache")


def test_a_full_token_cache_folder_is_one_line_and_leaves_no_temp_file(tmp_path, corpus, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache))

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    status = entry_point([*TINY, "--data", str(corpus), "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, "No space left on device")
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_a_disk_filling_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = torch.save
    saves = []

    class FullDisk:
        """A file whose disk fills after 2000 bytes: torch.save then fails as it does on a real full disk
        (a RuntimeError from its zip writer, raised while handling the OSError)."""

        def __init__(self, handle):
            self.handle, self.room = handle, 2000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    def save(obj, handle, *args, **kwargs):
        saves.append(1)
        # The second checkpoint meets a full disk halfway through.
        return real_save(obj, FullDisk(handle) if len(saves) >= 2 else handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    status = entry_point([*TINY, "--data", str(corpus), "--max-steps", "6", "--eval-interval", "2", "--out", str(run)])
    line = one_line_error(capsys, status, "No space left on device", code=1)
    assert "--resume" in line
    monkeypatch.undo()
    assert load_checkpoint(run)["step"] == 2
    assert not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------- 8. the smaller holes

@pytest.mark.parametrize("flags,expected", [(["--temperature", "nan"], "--temperature must be a finite number"),
                                            (["--temperature", "inf"], "--temperature must be a finite number"),
                                            (["--seed", str(10**23)], "--seed must be")])
def test_sample_bad_numbers(finished_run, capsys, flags, expected):
    one_line_error(capsys, sample_entry_point(["--run", str(finished_run), *flags]), expected)


def test_train_seed_out_of_range(tmp_path, corpus, capsys):
    status = entry_point([*TINY, "--data", str(corpus), "--seed", str(10**23), "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, "seed must be")


def test_tokenizer_flag_with_a_nanogpt_folder_is_refused(tmp_path, capsys):
    folder = write_nanogpt(tmp_path / "data", np.arange(1000) % 8, "abcdefgh")
    status = entry_point([*TINY, "--data", str(folder), "--tokenizer", "byte", "--out", str(tmp_path / "run")])
    one_line_error(capsys, status, "--tokenizer does not apply to a nanoGPT folder")


def test_fp16_on_a_cpu_warns(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--data", str(corpus), "--dtype", "fp16", "--max-steps", "1", "--out", str(run)]) == 0
    assert "warning: --dtype fp16 on a CPU" in capsys.readouterr().err


def test_a_foreign_config_json_in_out_is_not_overwritten(tmp_path, corpus, capsys):
    out = tmp_path / "hf-model"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2"}')
    status = entry_point([*TINY, "--data", str(corpus), "--out", str(out)])
    one_line_error(capsys, status, "config.json")
    assert (out / "config.json").read_text() == '{"model_type": "gpt2"}'


def test_viz_skips_a_torn_metrics_line(tmp_path, finished_run, capsys):
    pytest.importorskip("matplotlib")
    from engine.viz import entry_point as viz_entry_point

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 3.1')  # killed mid-write
    assert viz_entry_point(["--run", str(run)]) == 0
    assert "skipping line" in capsys.readouterr().err
    assert (run / "plots" / "loss.png").is_file()


# ----------------------------------------------------------------------------- 9. resume logs the same rows

def test_an_interrupted_run_logs_the_rows_of_an_uninterrupted_one(tmp_path, corpus, monkeypatch):
    args = [*TINY, "--data", str(corpus), "--max-steps", "12", "--log-interval", "4", "--eval-interval", "100"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    real_step = Trainer.train_step

    def interrupted_step(self):
        result = real_step(self)
        if self.step == 6:  # Ctrl-C between two log steps
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    assert main([*args, "--out", str(tmp_path / "split")]) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "split")["step"] == 6
    assert main(["--resume", str(tmp_path / "split")]) == 0

    def rows(run):
        keep = ("step", "loss", "grad_norm", "skipped_steps", "tokens")
        return [{k: row[k] for k in keep} for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in row]

    assert [row["step"] for row in rows(tmp_path / "split")] == [4, 8, 12]
    assert rows(tmp_path / "split") == rows(tmp_path / "whole")


def test_max_time_is_not_inherited_by_resume(tmp_path, corpus):
    run = tmp_path / "run"
    assert main([*TINY, "--data", str(corpus), "--max-steps", "100000", "--max-time", "0.5s", "--out", str(run)]) == 0
    step = load_checkpoint(run)["step"]
    assert main(["--resume", str(run), "--max-steps", str(step + 2)]) == 0
    assert load_checkpoint(run)["train_config"]["max_time"] is None


# ----------------------------------------------------------------------------- 10. --help

def test_help_shows_the_presets_values_not_gptconfigs():
    text = " ".join(build_parser().format_help().split())
    assert "(default: 512)" not in text  # GPTConfig's d_model, which no CPU run uses
    assert "toy 64, nanogpt-cpu 128, default 512, gpt2 768" in text  # --d-model per preset


def test_help_does_not_import_the_distributed_checkpointing():
    code = ("import sys, engine.train; engine.train.build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
