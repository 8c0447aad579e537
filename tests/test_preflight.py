"""GPU pre-flight on the CPU: every Triton kernel the engine launches, compiled for sm_90 and sm_80.

tests/preflight.py drives the real launchers of engine.kernels at the model's shapes under a
compile-only stand-in driver (nothing executes), once per target, in two processes run side by side
(they must not inherit TRITON_INTERPRET). The interpreter runs what a real compile refuses (a
module-level Python float in a kernel, for one); this is the check that the kernels build, fit the
target's shared memory and keep every register in registers, with every autotune candidate.

Triton's on-disk cache keeps the compiled kernels (and the ptxas reports): a second run takes
seconds, a cold one (CI) a few minutes. The quick sweep covers every kernel and candidate list; the
`slow` one adds the remaining dtypes, head dims and flag combinations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "preflight.py"
CAPABILITIES = (90, 80)
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # bytes per block: 227 KB (H100/H200), 163 KB (A100)

pytest.importorskip("triton")


def _run_preflight(capability: int, sweep: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--capability", str(capability), "--sweep", sweep,
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"preflight sm_{capability} crashed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


def _run_both(sweep: str, tmp: Path) -> dict[int, dict]:
    with ThreadPoolExecutor(len(CAPABILITIES)) as pool:
        futures = {c: pool.submit(_run_preflight, c, sweep, tmp / f"preflight-{sweep}-sm{c}.json")
                   for c in CAPABILITIES}
        return {c: future.result() for c, future in futures.items()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict[int, dict]:
    return _run_both("quick", tmp_path_factory.mktemp("preflight"))


def _check(report: dict) -> None:
    """Everything the pre-flight asserts about one target's report, with every offender named."""
    capability = report["capability"]
    assert report["canary_failed_to_compile"], (
        "the canary kernel (a module-level float) compiled: the pre-flight is not compiling for real")
    problems = [f"{f['workload']}: {f['error']}" for f in report["failures"]]
    problems += sorted({f"{f['kernel']} {f['config']}: {f['error']}" for f in report["compile_failures"]})
    assert not problems, f"sm_{capability}: {len(problems)} launches do not compile:\n" + "\n".join(problems)
    compiled = {c["kernel"] for c in report["compiled"]}
    missing = sorted(set(report["kernels"]) - compiled)
    assert not missing, f"sm_{capability}: kernels the pre-flight never compiled: {missing}"
    limit = SHARED_MEMORY_LIMIT[capability]
    too_big = sorted({f"{c['kernel']} {c['config']} warps={c['num_warps']} stages={c['num_stages']}: "
                      f"{c['shared']} bytes" for c in report["compiled"] if c["shared"] > limit})
    assert not too_big, f"sm_{capability}: over the {limit} bytes of shared memory per block:\n" + "\n".join(too_big)
    spilling = sorted({f"{c['kernel']} {c['config']} warps={c['num_warps']} stages={c['num_stages']}: "
                       f"{c['spill_stores']} bytes spilled ({c['registers']} registers)"
                       for c in report["compiled"] if c["spill_stores"] or c["spill_loads"]})
    assert not spilling, f"sm_{capability}: autotune candidates that spill registers:\n" + "\n".join(spilling)
    atomic = sorted({c["kernel"] for c in report["compiled"] if c["atomics"]})
    assert not atomic, f"kernels with atomics (not bitwise repeatable, so a resume is not either): {atomic}"


def test_autotuners_keep_results_on_disk_and_key_varying_lengths_by_bucket(quick):
    """Every tuner keeps its choice on disk (a resumed run and every rank use one configuration), keys
    lengths that change from call to call (tokens, sequence lengths) by power-of-two bucket, and
    copies its output around timed calls only when a call accumulates into it."""
    tuners = quick[90]["autotuners"]
    assert tuners
    for tuner in tuners:
        assert tuner["cache_results"], tuner
        assert not {"M", "T_Q", "T_K"} & set(tuner["key"]), tuner
        assert (tuner["restore_value"] != []) == ("accumulate" in tuner["name"]), tuner


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_every_kernel_compiles_fits_and_does_not_spill(quick, capability):
    _check(quick[capability])


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[int, dict]:
    return _run_both("full", tmp_path_factory.mktemp("preflight-full"))


@pytest.mark.slow
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_full_sweep_compiles_fits_and_does_not_spill(full, capability):
    _check(full[capability])
