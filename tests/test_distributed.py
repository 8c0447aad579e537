"""torchrun data parallelism on the CPU (gloo): N ranks with batch b train exactly like one process
with batch N*b, checkpoints move between world sizes, and FSDP2 matches too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "2", "--max-seq-len", "32",
         "--eval-iters", "2", "--sample-tokens", "0", "--log-interval", "1", "--eval-interval", "100",
         "--warmup-steps", "2", "--lr-decay-steps", "8", "--backend", "torch", "--dropout", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"all the world's a stage, and all the men and women merely players {i}\n"
                            for i in range(300)))
    return path


def train(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, "-m", "engine.train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "engine.train"]
    result = subprocess.run([*command, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def assert_same_trajectory(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus) -> Path:
    """One process, batch 4, 8 steps, with gradient accumulation 2 (micro-batches of 2)."""
    run = tmp_path_factory.mktemp("single") / "run"
    train(*SMALL, "--data", corpus, "--batch-size", "2", "--grad-accum", "2", "--max-steps", "8", "--out", run)
    return run


def test_two_ranks_match_one_process_with_twice_the_batch(tmp_path, corpus, single):
    run = tmp_path / "ddp"
    result = train(*SMALL, "--data", corpus, "--batch-size", "1", "--grad-accum", "2", "--max-steps", "8",
                   "--out", run, ranks=2)
    assert "2 ranks (DDP)" in result.stdout
    assert "Warning" not in result.stderr, result.stderr[-2000:]  # e.g. torch 2.13's on broadcast_buffers
    assert result.stdout.count("step 8/8") == 1  # only rank 0 logs
    assert_same_trajectory(losses(run), losses(single))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows[0]["tokens"] == 2 * 1 * 2 * 32  # global tokens per step: ranks x batch x accum x T
    assert load_checkpoint(run)["step"] == 8


def test_checkpoints_move_between_world_sizes(tmp_path, corpus, single):
    # 2 ranks for 4 steps, then 1 process to step 8.
    forward = tmp_path / "forward"
    train(*SMALL, "--data", corpus, "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4", "--out", forward,
          ranks=2)
    train("--resume", forward, "--batch-size", "2", "--max-steps", "8")
    assert_same_trajectory(losses(forward), losses(single))
    # 1 process for 4 steps, then 2 ranks to step 8.
    backward = tmp_path / "backward"
    train(*SMALL, "--data", corpus, "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4", "--out", backward)
    train("--resume", backward, "--batch-size", "1", "--max-steps", "8", ranks=2)
    assert_same_trajectory(losses(backward), losses(single))


def test_fsdp_matches_one_process(tmp_path, corpus, single):
    run = tmp_path / "fsdp"
    result = train(*SMALL, "--data", corpus, "--batch-size", "1", "--grad-accum", "2", "--max-steps", "8",
                   "--fsdp", "--out", run, ranks=2)
    assert "2 ranks (FSDP)" in result.stdout
    assert_same_trajectory(losses(run), losses(single))
    # The FSDP checkpoint holds full (unsharded) tensors: a single process resumes it.
    state = load_checkpoint(run)
    assert state["model"]["token_embedding.weight"].shape[1] == 32


def test_fsdp_needs_torchrun(tmp_path, corpus):
    result = subprocess.run([sys.executable, "-m", "engine.train", *SMALL, "--data", str(corpus), "--fsdp",
                             "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --fsdp shards the model across processes: launch with torchrun "
                                     "--nproc_per_node=N")


def test_ranks_share_the_default_run_folder_that_rank_0_claims(tmp_path, corpus):
    """Without --out rank 0 claims runs/<preset>-<time> (here taken already, so with -2) and tells the
    other ranks: one new folder, one run, and the folder that held the name is left alone."""
    now = time.time()
    taken = [tmp_path / "runs" / f"toy-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}" for s in range(120)]
    for folder in taken:  # every name the next two minutes would give
        folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "engine.train", *SMALL, "--data", str(corpus), "--batch-size", "1",
                             "--max-steps", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    new = sorted(set((tmp_path / "runs").iterdir()) - set(taken))
    assert len(new) == 1 and new[0].name.endswith("-2") and load_checkpoint(new[0])["step"] == 2, new
    assert all(not any(folder.iterdir()) for folder in taken)


ENDING = """
import atexit
import torch
from engine import distributed

context = distributed.setup("cpu")
distributed.wrap(torch.nn.Linear(2, 2), context, torch.device("cpu"), fsdp=False)  # DDP holds on to the group
for _ in range(3):
    distributed.any_rank(False, context, torch.device("cpu"))
distributed.teardown(context)
atexit.register(print, f"rank {context.rank}: atexit handlers ran")
print(f"rank {context.rank}: buffered output kept", end="")
distributed.exit_process(0)
"""


def test_a_worker_ends_cleanly_right_after_its_last_all_reduce(tmp_path):
    """A rank that tears down its group and exits right after an all_reduce: before exit_process, a gloo
    worker could still be waiting for the GIL to drop that all_reduce's tensors when the interpreter
    finalized, and the rank aborted after a successful run (this script: 3 of 10 runs; the engine's
    two-rank runs: about 1 in 30). Now the rank exits cleanly, its atexit handlers and output kept."""
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    for rank in (0, 1):
        assert f"rank {rank}: buffered output kept" in result.stdout
        assert f"rank {rank}: atexit handlers ran" in result.stdout


def test_exit_process_outside_a_job_is_sys_exit(monkeypatch):
    from engine import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as raised:
        distributed.exit_process(4)
    assert raised.value.code == 4
