"""The distribution installs one top-level import name, `engine`, and shadows nothing.

PyPI has an unrelated package named `kernels` (a dependency of transformers). Our Triton kernels
live in the checkout's kernels/ folder but are imported as `engine.kernels`; nothing of ours may be
importable as a top-level `kernels` or `bench`, neither from an installed wheel nor from the
repository root (where `python -m pytest` and `python -m bench.*` put the checkout on sys.path).
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "runs", "__pycache__", "*.egg-info", "*.so",
                                     ".pytest_cache", "venv", ".venv", "notebooks")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the checkout, built from a copy of its sources with the C++ extension skipped."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCES)
    environment = {**os.environ, "ENGINE_SKIP_EXTENSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(source)],
        capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = work.glob("*.whl")
    return built


def test_the_wheel_installs_only_engine(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"engine"}, f"the wheel installs {sorted(top_level)}"
    for kernel in ("attention", "ffn", "layer_norm", "cross_entropy"):
        assert f"engine/kernels/{kernel}.py" in names, f"engine/kernels/{kernel}.py missing from the wheel"
    assert not any(name.startswith("engine/kernels/README") for name in names)


def test_the_installed_wheel_imports_the_kernels_as_engine_kernels(wheel, tmp_path):
    """Unpacked wheel on PYTHONPATH, run from elsewhere: engine.kernels imports from it, `bench` does not exist."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import importlib.util, engine.kernels.attention as a; print(a.__file__); "
            "print(importlib.util.find_spec('bench'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr
    kernel_file, bench_spec = result.stdout.split("\n")[:2]
    assert Path(kernel_file).is_relative_to(site)
    assert bench_spec == "None"


def pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not pypi_kernels_installed(), reason="PyPI's `kernels` is not installed (transformers brings it)")
@pytest.mark.parametrize("cwd", ["repository root", "elsewhere"])
def test_pypi_kernels_is_not_shadowed(cwd, tmp_path):
    where = ROOT if cwd == "repository root" else tmp_path
    result = run_python("import kernels, engine.kernels.attention; print(kernels.__file__)", where)
    assert result.returncode == 0, result.stderr
    found = Path(result.stdout.strip()).resolve()
    assert not found.is_relative_to(ROOT), f"`import kernels` found the checkout's {found}"


def test_transformers_gpt2_runs_from_the_repository_root():
    pytest.importorskip("transformers")
    code = ("import torch, transformers; "
            "config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50, n_positions=16); "
            "model = transformers.GPT2LMHeadModel(config); "
            "print(tuple(model(torch.zeros(1, 4, dtype=torch.long)).logits.shape))")
    result = run_python(code, ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 4, 50)"
