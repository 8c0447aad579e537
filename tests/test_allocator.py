"""engine.allocator: on a CPU, glibc's malloc keeps freed memory, so training steps stop page-faulting."""
import json
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
import json, resource, sys, tempfile, pathlib, torch
from engine.data import load_token_data
from engine.model import preset
from engine.trainer import TrainConfig, Trainer
torch.set_num_threads(1)
data = load_token_data(sys.argv[1], "char")
config = preset("toy", vocab_size=data.tokenizer.vocab_size)
trainer = Trainer(config, TrainConfig(batch_size=32, max_steps=100, dtype="fp32", sample_tokens=0), data,
                  pathlib.Path(tempfile.mkdtemp()), torch.device("cpu"), torch.float32, log=lambda *a: None)
for _ in range(8):
    trainer.train_step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    trainer.train_step()[0].item()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4))
"""


def faults_per_step(corpus, env_extra: dict) -> float:
    import os
    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", STEPS, str(corpus)], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_cpu_training_steps_reuse_freed_memory(corpus):
    # glibc's defaults map and unmap the step's large activations again every step (3,200 to 11,400 faults per
    # step in five runs here); with the engine's settings the steps reuse the heap (0 to 450).
    default = faults_per_step(corpus, {"ENGINE_DEFAULT_MALLOC": "1"})
    tuned = faults_per_step(corpus, {})
    assert 5 * tuned < default, (tuned, default)


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "ENGINE_DEFAULT_MALLOC"])
def test_user_settings_are_left_alone(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    assert not allocator.keep_freed_memory()
