"""engine.check (the device check) and `auto`'s self-check: broken backends are routed around under
`auto` and refused when chosen, verdicts are cached on disk per versions, and the CLI's table and JSON."""
from __future__ import annotations

import json

import pytest
import torch

from engine import check, ops
from engine.model import GPTConfig
from engine.ops import reference, registry
from engine.ops.backend import OP_NAMES, Backend

CPU = torch.device("cpu")
CONFIG = GPTConfig(vocab_size=40, d_model=32, n_heads=2, d_ff=64, n_layers=1, max_seq_len=32)
pytestmark = pytest.mark.usefixtures("single_thread")


def _wrong_layer_norm(x, weight, bias, eps=1e-5):
    return reference.layer_norm(x, weight, bias, eps) * 1.01  # 1% off: far outside the 2x rule


def _nan_ffn(x, w1, b1, w2, b2, residual, *, activation="gelu", dropout_p=0.0):
    out = reference.ffn(x, w1, b1, w2, b2, residual, activation=activation, dropout_p=dropout_p)
    return out * torch.where(torch.arange(out.shape[-1]) == 3, float("nan"), 1.0).to(out.dtype)


def _raising_attention(q, k, v, *, causal=True, scale=None, dropout_p=0.0):
    raise RuntimeError("kernel exploded")


BROKEN = Backend("broken", frozenset({"cpu"}), {
    **reference.BACKEND.ops, "attention": _raising_attention, "ffn": _nan_ffn, "layer_norm": _wrong_layer_norm,
})


@pytest.fixture
def broken_backend(monkeypatch, tmp_path):
    """`auto` on the CPU prefers "broken" (wrong LayerNorm values, NaN in the FFN, an attention that
    raises; right cross-entropies), then torch; verdicts cached in a fresh folder."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.BACKEND_LOCATIONS, "broken", "tests.test_check:BROKEN")
    monkeypatch.setitem(registry._loaded, "broken", BROKEN)
    monkeypatch.setattr(registry, "AUTO_PREFERENCE", {"cpu": ("broken", "torch")})
    registry.clear_self_check_failures()
    yield
    ops.set_backend("auto")
    registry.clear_self_check_failures()


def test_auto_routes_around_each_broken_op_with_one_warning(broken_backend):
    ops.set_backend("auto")
    assert ops.resolve_name("attention", "cpu", dtype=torch.float32, head_dim=16) == "broken"  # unchecked
    warnings = []
    line = check.prepare_backends(CONFIG, CPU, torch.float32, warn=warnings.append)
    assert line.startswith("attention=torch, ffn=torch, layer_norm=torch, cross_entropy=broken, "
                           "linear_cross_entropy=broken (self-check in fp32: torch x3, broken x2 ok, 0 of 8 cached")
    assert len(warnings) == 3
    expected = {"attention": "RuntimeError: kernel exploded", "ffn": "non-finite values",
                "layer_norm": "layer_norm output: max |error|"}
    for warning, (op, error) in zip(warnings, expected.items()):
        assert warning.startswith(f"warning: self-check: {op} on broken failed (")
        assert error in warning and warning.endswith("); using the next candidate")
    q = torch.randn(1, 2, 5, 16)
    ops.attention(q, q, q)  # resolved to torch now: does not raise
    assert ops.resolve_name("attention", "cpu", dtype=torch.float32, head_dim=16) == "torch"


def test_explicit_broken_backend_is_refused(broken_backend):
    ops.set_backend("broken")
    with pytest.raises(ops.BackendError, match=r"backend 'broken' failed its self-check of 'attention' on this cpu "
                                               r"device \(.*RuntimeError: kernel exploded\)"):
        check.prepare_backends(CONFIG, CPU, torch.float32)
    # The failure is remembered for this process: a later explicit call says so too.
    with pytest.raises(ops.BackendError, match="failed its self-check of 'attention'"):
        ops.attention(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))


def test_train_cli_exits_2_for_a_broken_explicit_backend_and_trains_around_it_under_auto(broken_backend, tmp_path,
                                                                                         capsys):
    from engine.train import entry_point

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 60)
    small = ["--data", str(corpus), "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "1",
             "--max-seq-len", "16", "--batch-size", "2", "--eval-iters", "1", "--sample-tokens", "0"]
    assert entry_point([*small, "--backend", "broken", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: backend 'broken' failed its self-check of 'attention'") and err.count("\n") == 1
    assert not (tmp_path / "refused").exists()

    registry.clear_self_check_failures()
    assert entry_point([*small, "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert [line.split(" failed")[0] for line in captured.err.splitlines() if line.startswith("warning: self")] == [
        "warning: self-check: attention on broken", "warning: self-check: ffn on broken",
        "warning: self-check: layer_norm on broken"]
    assert "backends: attention=torch, ffn=torch, layer_norm=torch, cross_entropy=broken" in captured.out


def test_no_self_check_skips_it(broken_backend, tmp_path):
    ops.set_backend("auto")
    line = check.prepare_backends(CONFIG, CPU, torch.float32, self_check=False)
    assert line.startswith("attention=broken, ffn=broken") and line.endswith("(self-check skipped)")
    assert not check.cache_path().exists()


def test_a_cached_verdict_is_reused_and_a_version_change_invalidates_it(broken_backend, monkeypatch):
    ops.set_backend("auto")
    first = check.prepare_backends(CONFIG, CPU, torch.float32, warn=lambda line: None)
    assert " 0 of " in first
    cache = json.loads(check.cache_path().read_text())
    assert {json.loads(key)["backend"] for key in cache} == {"broken", "torch"}
    assert all({"device", "capability", "torch", "triton", "engine", "op", "dtype"} <= set(json.loads(key))
               for key in cache)

    registry.clear_self_check_failures()
    calls = []
    real_check_op = check.check_op
    monkeypatch.setattr(check, "check_op", lambda *args: calls.append(args[:2]) or real_check_op(*args))
    warnings = []
    second = check.prepare_backends(CONFIG, CPU, torch.float32, warn=warnings.append)
    assert calls == [] and len(warnings) == 3  # the cached failures still route around
    assert second.split(" (self-check")[0] == first.split(" (self-check")[0]
    assert f"{len(cache)} of {len(cache)} cached" in second

    registry.clear_self_check_failures()
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    third = check.prepare_backends(CONFIG, CPU, torch.float32, warn=lambda line: None)
    assert " 0 of " in third and ("attention", "broken") in calls
    assert check.main(["--clear-cache"]) == 0
    assert not check.cache_path().exists()


def test_device_check_fails_each_kind_of_breakage(broken_backend, capsys, tmp_path):
    path = tmp_path / "r.json"
    assert check.main(["--device", "cpu", "--backends", "broken", "--no-speed", "--json", str(path)]) == 1
    rows = {row["op"]: row for row in json.loads(path.read_text())["results"]}
    assert {op: row["status"] for op, row in rows.items()} == {
        "attention": "FAIL", "ffn": "FAIL", "layer_norm": "FAIL", "cross_entropy": "ok", "linear_cross_entropy": "ok"}
    assert "RuntimeError: kernel exploded" in rows["attention"]["cases"][0]["message"]
    assert "non-finite values" in rows["ffn"]["cases"][0]["message"]
    assert "bound" in rows["layer_norm"]["cases"][0]["message"]
    assert capsys.readouterr().out.rstrip().endswith("FAILED: see the rows marked FAIL")


def test_device_check_table_and_json_for_every_backend(tmp_path, capsys):
    pytest.importorskip("triton")
    backends = ["reference", "torch", "cpp", "triton"]
    for name in backends:
        if not ops.available_backends()[name][0]:
            pytest.skip(f"backend {name} is unavailable here: {ops.available_backends()[name][1]}")
    path = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--dtype", "fp32", "--backends", ",".join(backends), "--no-speed",
                       "--json", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("engine.check on cpu (") and "in fp32 | torch " in lines[0]
    assert lines[1].split() == ["op", "backend", "result", "error/bound", "vs", "torch", "note"]
    table = [line.split() for line in lines[2:2 + 5 * len(backends)]]
    assert [(row[0], row[1], row[2]) for row in table] == [
        (op, name, "ok") for op in OP_NAMES for name in backends]
    assert all(0 <= float(row[3]) <= 1 for row in table)
    assert lines[-1] == "every check passed"
    report = json.loads(path.read_text())
    assert report["ok"] is True and report["dtype"] == "fp32"
    assert {"device", "capability", "torch", "triton", "engine"} <= set(report)
    cpp_attention = next(r for r in report["results"] if (r["op"], r["backend"]) == ("attention", "cpp"))
    decode = [case for case in cpp_attention["cases"] if "T_k=" in case["label"]]
    assert decode and all(case["status"] == "n/a" for case in decode)  # csrc's attention takes T_q = T_k only
    triton_attention = next(r for r in report["results"] if (r["op"], r["backend"]) == ("attention", "triton"))
    assert [c["status"] for c in triton_attention["cases"] if "D=96" in c["label"]] == ["n/a"]
    assert all(c["status"] == "ok" for c in triton_attention["cases"] if "D=96" not in c["label"])


def test_device_check_in_bf16_runs_the_ops_under_autocast_as_the_trainer_does(broken_backend, tmp_path):
    if not ops.available_backends()["cpp"][0]:
        pytest.skip("the cpp backend is not built")
    path = tmp_path / "bf16.json"
    assert check.main(["--device", "cpu", "--dtype", "bf16", "--backends", "cpp,broken", "--no-speed", "--json",
                       str(path)]) == 1
    report = json.loads(path.read_text())
    assert report["dtype"] == "bf16"
    status = {(r["op"], r["backend"]): r["status"] for r in report["results"]}
    assert all(status[(op, "cpp")] == "ok" for op in OP_NAMES)
    # LayerNorm sees the fp32 residual stream, so it is held to fp32's bound: a 1% error fails even in a
    # bf16 run (bf16's slack would let it through).
    assert status[("layer_norm", "broken")] == "FAIL"


def test_speed_ratios_against_torch(capsys):
    assert check.main(["--device", "cpu", "--backends", "torch,reference"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:12]]
    assert all(row[4].endswith("x") for row in rows)
    assert all(row[4] == "1.00x" for row in rows if row[1] == "torch")


@pytest.mark.parametrize("args,expected", [
    (["--dtype", "fp8"], "error: unknown dtype 'fp8'; choose among fp32, fp16, bf16"),
    (["--backends", "fast"], "error: unknown backend 'fast'"),
    (["--backends", "auto"], "error: --backends takes backend names"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_and_exit_2(args, expected, capsys):
    try:
        status = check.entry_point(args)
    except SystemExit as exited:  # argparse's own errors
        status = exited.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
