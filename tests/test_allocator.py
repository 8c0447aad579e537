"""engine.allocator: on a CPU, glibc's malloc keeps freed memory, so training steps stop page-faulting."""
import json
import os
import platform
import subprocess
import sys

import pytest

from engine import allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the malloc settings apply to glibc only")

# Trains the toy model a few steps (the Trainer calls keep_freed_memory on a CPU) and prints the minor page
# faults per step after warm-up. In its own process: malloc's settings, once changed, stay for the process.
STEPS = """
import json, resource, sys, pathlib, torch
from engine import allocator
from engine.data import load_token_data
from engine.model import preset
from engine.trainer import TrainConfig, Trainer
torch.set_num_threads(1)
data = load_token_data(sys.argv[1], "char")
config = preset("toy", vocab_size=data.tokenizer.vocab_size)
trainer = Trainer(config, TrainConfig(batch_size=32, max_steps=100, dtype="fp32", sample_tokens=0), data,
                  pathlib.Path(sys.argv[2]), torch.device("cpu"), torch.float32, log=lambda *a: None)
for _ in range(8):
    trainer.train_step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    trainer.train_step()[0].item()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"faults": faults, "tuned": allocator.keep_freed_memory()}))
"""
# Variables that change glibc's malloc: the child starts from an environment without them.
MALLOC_VARIABLES = ("GLIBC_TUNABLES", "ENGINE_DEFAULT_MALLOC", "MALLOC_")


def faults_per_step(corpus, run_dir, env_extra: dict) -> dict:
    """{"faults": minor page faults per step, "tuned": whether keep_freed_memory changed malloc there}."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(MALLOC_VARIABLES)}
    done = subprocess.run([sys.executable, "-c", STEPS, str(corpus), str(run_dir)], capture_output=True, text=True,
                          env={**env, **env_extra}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_cpu_training_steps_reuse_freed_memory(corpus, tmp_path):
    # glibc's defaults map and unmap the step's large activations again every step (3,200 to 11,400 faults per
    # step in five runs here); with the engine's settings the steps reuse the heap (0 to 450).
    default = faults_per_step(corpus, tmp_path / "default", {"ENGINE_DEFAULT_MALLOC": "1"})
    tuned = faults_per_step(corpus, tmp_path / "tuned", {})
    assert not default["tuned"]
    if not tuned["tuned"]:
        pytest.skip("this glibc rejected the thresholds (mallopt returned 0)")
    assert 5 * tuned["faults"] < default["faults"], (tuned, default)


@pytest.mark.parametrize("variable, value", [("MALLOC_MMAP_THRESHOLD_", "1"), ("ENGINE_DEFAULT_MALLOC", "1"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_user_settings_are_left_alone(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert not allocator.keep_freed_memory()


def test_tunables_of_other_glibc_parts_do_not_count_as_malloc_settings(monkeypatch):
    for name in [name for name in os.environ if name.startswith(MALLOC_VARIABLES)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert allocator._user_set_malloc() is False
