"""The bench harness, its results, the training benchmark and the profiling hooks, on the CPU."""
from __future__ import annotations

import json
import math
import sys
from datetime import datetime

import pytest
import torch

from bench import attention, autotune, cross_entropy, ffn, harness, layer_norm, plain_gpt, report, sanitize_ops
from bench import train as bench_train
from engine import profiling
from engine.data import ByteTokenizer, IdTokenizer, TokenData
from engine.model import GPT, GPTConfig, preset
from engine.config import resolve_dtype
from engine.trainer import TrainConfig, Trainer

ROW_FIELDS = {"op", "backend", "label", "shape", "dtype", "pass", "status", "ms", "tflops", "gbps", "peak_mem_mb",
              "speedup", "baseline", "flop", "bytes", "repeats", "device", "torch", "triton", "commit", "date"}
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- FLOP and byte counts

def test_attention_flop_by_hand():
    # B=1, H=2, T=4, D=8: Q K^T and P V are 2 * 4 * 4 * 8 = 256 FLOP each per head -> 1024, causal half -> 512.
    shape = {"B": 1, "H": 2, "T": 4, "D": 8, "causal": True}
    assert attention.attention_flop(shape) == {"fwd": 512, "bwd": 1280, "fwd+bwd": 1792}
    assert attention.attention_flop({**shape, "causal": False})["fwd"] == 1024


def test_ffn_flop_by_hand():
    # N=3, d_model=4, d_ff=8: one matmul is 2 * 3 * 4 * 8 = 192 FLOP; forward has 2, backward 4.
    assert ffn.ffn_flop({"N": 3, "d_model": 4, "d_ff": 8}) == {"fwd": 384, "bwd": 768, "fwd+bwd": 1152}


def test_linear_cross_entropy_flop_by_hand():
    # N=2, d=3, V=5: the logits are 2 * 2 * 3 * 5 = 60 FLOP; backward computes dX and dW.
    flop = cross_entropy.linear_cross_entropy_flop({"N": 2, "d_model": 3, "V": 5})
    assert flop == {"fwd": 60, "bwd": 120, "fwd+bwd": 180}


def test_memory_bound_bytes_by_hand():
    # LayerNorm N=2, C=3 in fp32: forward reads x, writes y (12 values) + weight, bias (6) = 72 bytes;
    # backward reads x, dy, writes dx (18) + weight, dweight, dbias (9) = 108 bytes. bf16 halves both.
    assert layer_norm.layer_norm_bytes({"N": 2, "C": 3}, torch.float32) == {"fwd": 72, "bwd": 108, "fwd+bwd": 180}
    assert layer_norm.layer_norm_bytes({"N": 2, "C": 3}, torch.bfloat16)["fwd+bwd"] == 90
    # cross-entropy N=2, V=3 in fp32: forward reads 6 logits (24) + 2 int64 targets (16) = 40;
    # backward reads the logits and writes their gradient (48) + targets (16) = 64.
    assert cross_entropy.cross_entropy_bytes({"N": 2, "V": 3}, torch.float32) == {"fwd": 40, "bwd": 64, "fwd+bwd": 104}


def test_train_flop_per_token_follows_the_palm_convention():
    model = GPT(GPTConfig(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=8,
                          pos_encoding="learned"))
    without_positions = model.num_parameters() - 8 * 16
    assert bench_train.flop_per_token(model, 8) == 6 * without_positions + 12 * 2 * 8 * 16


def test_peak_table_by_gpu_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.5),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Other GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench_train.peak_tflops(cuda, torch.bfloat16) == peak
    assert bench_train.peak_tflops(cuda, torch.float32) is None
    assert bench_train.peak_tflops(CPU, torch.bfloat16) is None


# ----------------------------------------------------------------------------- the harness on the CPU

def small_attention_run(tmp_path, backends):
    writer = report.RowWriter(tmp_path / "attention.jsonl")
    shape = {"B": 1, "H": 2, "T": 16, "D": 8, "causal": True}
    return harness.run(attention.SPEC, [shape], dtype=torch.float32, device=CPU, backends=backends, repeats=2,
                       sink=writer)


def test_harness_rows_are_well_formed(tmp_path):
    rows = small_attention_run(tmp_path, ["reference", "torch"])
    assert [(row["backend"], row["pass"]) for row in rows] == [
        ("torch", "fwd"), ("torch", "bwd"), ("torch", "fwd+bwd"),  # the baseline runs first
        ("reference", "fwd"), ("reference", "bwd"), ("reference", "fwd+bwd"),
    ]
    by_key = {(row["backend"], row["pass"]): row for row in rows}
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["status"] == "ok" and row["op"] == "attention" and row["dtype"] == "fp32"
        assert row["ms"] > 0 and row["repeats"] == 2 and row["input_sets"] == 1
        assert row["peak_mem_mb"] is None  # not measured on the CPU
        assert row["flop"] == attention.attention_flop(row["shape"])[row["pass"]]
        assert math.isclose(row["tflops"], row["flop"] / (row["ms"] * 1e-3) / 1e12)
        assert row["gbps"] is None and row["label"] == "B=1 H=2 T=16 D=8 causal"
        expected = by_key[("torch", row["pass"])]["ms"] / row["ms"]
        assert math.isclose(row["speedup"], expected)
        assert row["device"].startswith("CPU") and row["torch"] == torch.__version__
        datetime.fromisoformat(row["date"])
    assert all(by_key[("torch", name)]["speedup"] == 1.0 for name in harness.PASSES)
    on_disk = report.load_rows(tmp_path / "attention.jsonl")
    assert on_disk == json.loads(json.dumps(rows))
    table = report.markdown_table(on_disk)
    assert table.splitlines()[0] == "| shape | dtype | pass | backend | ms | TFLOP/s | vs torch |"
    assert len(table.splitlines()) == 2 + len(rows)


def test_harness_records_a_failing_backend_and_goes_on(tmp_path):
    def mismatched(shape, dtype, device):  # K has a different head size: every backend must refuse
        q = torch.randn(1, 1, 8, 4, requires_grad=True)
        k = torch.randn(1, 1, 8, 5, requires_grad=True)
        return harness.Inputs((q, k, k), {"causal": True})

    spec = harness.OpBench("attention", mismatched, flop=attention.attention_flop)
    rows = harness.run(spec, [{"B": 1, "H": 1, "T": 8, "D": 4, "causal": True}], dtype=torch.float32, device=CPU,
                       backends=["torch", "reference"], passes=("fwd",), repeats=1)
    assert len(rows) == 2
    assert all(row["status"].startswith("error: ") and row["ms"] is None and row["speedup"] is None for row in rows)
    assert "note" in report.markdown_table(rows)


def test_backend_selection_names_what_it_skips():
    chosen, skipped = harness.select_backends("attention", "cpu", ["torch", "no-such-backend", "torch"], False)
    assert chosen == ["torch"]
    assert "no-such-backend" in skipped["no-such-backend"]
    chosen, skipped = harness.select_backends("attention", "cpu", None, True)
    assert {"reference", "torch"} <= set(chosen) and chosen[-1] == harness.COMPILE
    assert set(chosen) | set(skipped) == set(harness.ops.available_backends()) | {harness.COMPILE}


def test_attention_cli_prints_a_table_with_ratios(tmp_path, capsys):
    status = attention.main(["--T", "16", "--D", "8", "--repeats", "2", "--backends", "torch,reference",
                             "--passes", "fwd", "--out", str(tmp_path), "--no-plot"])
    assert status == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "| shape | dtype | pass | backend | ms | TFLOP/s | vs torch |" in lines
    torch_line = next(line for line in lines if "| fwd | torch |" in line)
    reference_line = next(line for line in lines if "| fwd | reference |" in line)
    assert torch_line.endswith("| 1.00x |") and reference_line.endswith("x |")
    assert (tmp_path / "attention.md").exists()


def test_report_renders_tables_plot_and_summary(tmp_path):
    small_attention_run(tmp_path, ["torch", "reference"])
    written = report.render_op(tmp_path, "attention", plot=True)
    assert tmp_path / "attention.png" in written and (tmp_path / "attention.png").stat().st_size > 0
    with open(tmp_path / "attention.jsonl", "a") as handle:
        handle.write('{"op": "attention", "cut sh')  # a row cut short by a killed run is skipped
    assert report.main([str(tmp_path), "--no-plot"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| op | shape | dtype | pass | torch | reference |" in summary


# ----------------------------------------------------------------------------- bench.train

def test_bench_train_runs_toy_steps(tmp_path, capsys):
    status = bench_train.main(["--presets", "toy", "--backends", "reference,torch", "--steps", "1", "--warmup", "1",
                               "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path)])
    assert status == 0
    rows = report.load_rows(tmp_path / "train.jsonl")
    assert [row["backend"] for row in rows] == ["torch", "reference"]
    for row in rows:
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["ms"] > 0
        assert row["shape"] == {"preset": "toy", "batch_size": 2, "seq_len": 32, "params": row["shape"]["params"]}
        assert row["mfu"] is None and 0 < row["mfu_vs_matmul"] and math.isfinite(row["loss"])
    assert rows[0]["speedup"] == 1.0 and math.isclose(rows[1]["speedup"], rows[0]["ms"] / rows[1]["ms"])
    assert "| toy | 2 x 32 | fp32 | reference |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bench.train --baseline plain

@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "learned", "bias": False}])
def test_plain_baseline_is_the_engine_model(overrides):
    # Same parameter names and shapes, so the engine's initial weights load into the plain model, and
    # from them it computes the same loss and gradients: the baseline differs in implementation only.
    config = GPTConfig(vocab_size=23, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=12, **overrides)
    torch.manual_seed(0)
    model = GPT(config)
    baseline = plain_gpt.PlainGPT(config)
    baseline.load_state_dict(model.state_dict(), strict=True)
    idx, targets = torch.randint(0, 23, (3, 12)), torch.randint(0, 23, (3, 12))
    loss, plain_loss = model.loss(idx, targets), baseline.loss(idx, targets)
    torch.testing.assert_close(plain_loss, loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    plain_loss.backward()
    plain_grads = dict(baseline.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(plain_grads[name].grad, parameter.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_plain_baseline_initializes_like_the_engine():
    # GPT-2's init on both sides: std 0.02, residual projections 0.02 / sqrt(2 n_layers), zero biases.
    config = GPTConfig(vocab_size=64, d_model=64, n_heads=2, d_ff=256, n_layers=8, max_seq_len=32)
    torch.manual_seed(0)
    ours = dict(GPT(config).named_parameters())
    for name, parameter in plain_gpt.PlainGPT(config).named_parameters():
        assert parameter.shape == ours[name].shape, name
        if parameter.dim() >= 2:
            assert math.isclose(parameter.std().item(), ours[name].std().item(), rel_tol=0.15), name
        else:
            assert torch.equal(parameter, ours[name]), name  # LayerNorm ones, bias zeros
    assert math.isclose(ours["blocks.0.ffn.fc2.weight"].std().item(), 0.02 / 4, rel_tol=0.1)


PLAIN_ARGS = ["--baseline", "plain", "--presets", "toy", "--steps", "2", "--batch-size", "2", "--eval-iters", "1",
              "--threads", "1"]


def test_bench_train_against_plain_runs_alternated_pairs(tmp_path, capsys, monkeypatch):
    # Each side in this process (the real runs are processes of their own: the next test).
    sides = []

    def in_process(spec):
        sides.append((spec["kind"], spec["seed"], spec["dtype"]))
        result = bench_train.plain_run(spec)
        return {**result, "process_s": result["train_s"] + 1.0, "process_cpu_s": result["train_cpu_s"] + 1.0}

    monkeypatch.setattr(bench_train, "run_plain_pair_side", in_process)
    assert bench_train.main([*PLAIN_ARGS, "--pairs", "2", "--out", str(tmp_path)]) == 0
    assert sides == [("engine", 1337, "auto"), ("plain", 1337, "fp32"), ("plain", 1338, "fp32"),
                     ("engine", 1338, "auto")]
    rows = report.load_rows(tmp_path / "train_vs_plain.jsonl")
    assert [row["order"] for row in rows] == [["engine", "plain"], ["plain", "engine"]]
    for row in rows:
        for side in ("engine", "plain"):
            result = row[side]
            assert result["tokens_per_s"] > 0 and result["train_s"] > 0, result
            assert math.isfinite(result["val_loss"]) and result["dtype"] in ("fp32", "bf16")
        assert row["ratios"]["tok/s"] == pytest.approx(row["engine"]["tokens_per_s"] / row["plain"]["tokens_per_s"])
        assert row["ratios"]["process s"] == pytest.approx(row["plain"]["process_s"] / row["engine"]["process_s"])
    out = capsys.readouterr().out
    assert "## toy, batch 2, 2 steps, engine --dtype auto, plain fp32" in out
    assert "toy (engine " in out and "tok/s ratio" in out


@pytest.mark.slow
def test_bench_train_against_plain_runs_each_side_in_its_own_process(tmp_path):
    assert bench_train.main([*PLAIN_ARGS, "--pairs", "1", "--out", str(tmp_path)]) == 0
    (row,) = report.load_rows(tmp_path / "train_vs_plain.jsonl")
    for side in ("engine", "plain"):
        # The process also imports torch, loads the corpus and builds the model: longer than its loop.
        assert row[side]["process_s"] > row[side]["train_s"] > 0 and row[side]["process_cpu_s"] > 0


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(True, False, torch.bfloat16),
                                                              (False, True, torch.bfloat16),
                                                              (False, False, torch.float32)])
def test_dtype_auto_is_bf16_on_cpus_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_dtype("auto", CPU) == expected
    assert resolve_dtype("fp32", CPU) == torch.float32


def test_bf16_on_the_cpu_trains_like_fp32(tmp_path):
    # bf16 autocast keeps fp32 weights, optimizer state and loss: the same steps reach about the same loss.
    data = bench_train.random_token_data(32, 16, 8)
    data = TokenData(train=data.train % 8, val=data.val % 8, tokenizer=IdTokenizer(32), source="8 of 32 ids")
    final = {}
    for dtype in (torch.float32, torch.bfloat16):
        config = TrainConfig(batch_size=8, max_steps=30, warmup_steps=3, lr=3e-3, eval_interval=30, eval_iters=2,
                             sample_tokens=0, log_interval=30)
        trainer = Trainer(preset("toy", vocab_size=32, n_layers=2, max_seq_len=16), config, data,
                          tmp_path / str(dtype), CPU, dtype, log=lambda *args: None)
        (tmp_path / str(dtype)).mkdir()
        assert trainer.run() == 0
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        final[dtype] = [row for row in report.load_rows(tmp_path / str(dtype) / "metrics.jsonl") if "val_loss" in row]
    fp32, bf16 = final[torch.float32][-1]["val_loss"], final[torch.bfloat16][-1]["val_loss"]
    assert fp32 < math.log(32) - 1.0  # learned that only 8 of the 32 tokens occur (ln 8 = 2.08)
    assert abs(bf16 - fp32) < 0.05, (fp32, bf16)


# ----------------------------------------------------------------------------- profiling hooks

@pytest.fixture
def counting_nvtx(monkeypatch):
    """Replace the NVTX provider with one that records the ranges; ranges are off again afterwards."""
    events = []
    monkeypatch.setattr(profiling, "_find_nvtx", lambda: (lambda name: events.append(("push", name)),
                                                          lambda: events.append(("pop", None)), "test"))
    yield events
    profiling.enable_nvtx(False)


def test_nvtx_ranges_cost_nothing_when_off_and_mark_each_layer_when_on(counting_nvtx):
    model = GPT(preset("toy", vocab_size=32, n_layers=2, max_seq_len=16))
    idx = torch.randint(0, 32, (1, 16))
    profiling.enable_nvtx(False)
    assert profiling.nvtx_range("x") is profiling.nvtx_range("y")  # one shared no-op context manager
    expected = model(idx)
    assert counting_nvtx == []
    assert profiling.enable_nvtx(True)
    torch.testing.assert_close(model(idx), expected, rtol=0, atol=0)
    pushed = [name for kind, name in counting_nvtx if kind == "push"]
    assert pushed == ["block0.attention", "block0.ffn", "block1.attention", "block1.ffn"]
    assert sum(kind == "pop" for kind, _ in counting_nvtx) == len(pushed)


def test_nvtx_switch_is_a_noop_without_a_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    model = GPT(preset("toy", vocab_size=32, n_layers=1, max_seq_len=16))
    idx = torch.randint(0, 32, (1, 16))
    expected = model(idx)
    try:
        profiling.enable_nvtx(True)  # the nvtx package (no profiler attached), or off with a warning
        torch.testing.assert_close(model(idx), expected, rtol=0, atol=0)
        monkeypatch.setattr(profiling, "_find_nvtx", lambda: None)
        assert profiling.enable_nvtx(True) is False and not profiling.nvtx_enabled()
    finally:
        profiling.enable_nvtx(False)


def test_step_profiler_writes_a_chrome_trace_of_the_chosen_steps(tmp_path):
    messages = []
    profiler = profiling.StepProfiler(tmp_path / "trace.json", True, skip=1, steps=2, log=messages.append)
    for _ in range(5):
        with torch.profiler.record_function("work"):
            torch.randn(32, 32) @ torch.randn(32, 32)
        profiler.step()
    profiler.close()
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert sum(event.get("name") == "work" for event in trace["traceEvents"]) == 2  # steps 2 and 3 only
    assert messages == [f"profile: Chrome trace of 2 step(s) written to {tmp_path / 'trace.json'}"]
    off = profiling.StepProfiler(tmp_path / "off.json", False)
    off.step()
    off.close()
    assert not (tmp_path / "off.json").exists()


def test_trainer_profile_flag_writes_a_trace_into_the_run_folder(tmp_path):
    data = bench_train.random_token_data(256, 16, 2)
    data.tokenizer = ByteTokenizer()
    config = TrainConfig(batch_size=2, max_steps=3, eval_iters=1, profile=True, nvtx=True, sample_tokens=0,
                         device="cpu", dtype="fp32")
    trainer = Trainer(preset("toy", vocab_size=256, n_layers=1, max_seq_len=16), config, data, tmp_path, CPU,
                      torch.float32, log=lambda message: None)
    try:
        assert trainer.run() == 0
    finally:
        profiling.enable_nvtx(False)
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert sum(event.get("name") == "train_step" for event in trace["traceEvents"]) == 2  # steps 2 and 3


# ----------------------------------------------------------------------------- k calls per timed batch

class SteppedClock:
    """A clock that moves only when told: each work call advances it by a fixed number of ms."""

    def __init__(self) -> None:
        self.now, self.finished = 0.0, False

    def mark(self) -> float:
        return self.now

    def finish(self) -> None:
        self.finished = True

    def elapsed_ms(self, start: float, end: float) -> float:
        return end - start


def test_time_batches_times_k_back_to_back_calls_per_pair_of_marks():
    clock, calls, prepared, before = SteppedClock(), [], [], []

    def work(i):
        calls.append(i)
        clock.now += 2.0 + i  # input set i "takes" 2 + i ms

    per_call, issue = harness.time_batches(work, prepared.append, n_sets=3, calls_per_batch=4, batches=2,
                                           clock=clock, before_batch=before.append)
    assert calls == prepared == [0, 1, 2, 0, 1, 2, 0, 1]  # rotation continues across batches
    assert per_call == [(2 + 3 + 4 + 2) / 4, (3 + 4 + 2 + 3) / 4]  # one mark pair per batch of 4
    assert clock.finished and len(issue) == 2 and all(seconds >= 0 for seconds in issue)
    # before_batch sees nothing before the first batch, then the previous batch's whole host time.
    assert before[0] is None and math.isclose(before[1], issue[0] * 4)


def test_time_calls_on_the_cpu_runs_k_calls_per_batch_and_counts_nothing_compiled():
    calls = []
    timing = harness.time_calls(calls.append, lambda i: None, 2, CPU, repeats=4, calls_per_batch=3)
    assert len(calls) == 1 + 4 * 3  # one warm-up call, then 4 batches of 3
    assert (timing.repeats, timing.calls_per_batch, timing.launch_us) == (4, 3, None)
    assert timing.ms >= 0 and timing.after_warmup == {"triton_compiles": 0, "autotune_keys": 0, "dynamo_graphs": 0}


def test_rows_record_the_batching_and_a_bad_count_is_refused(tmp_path):
    shape = {"B": 1, "H": 1, "T": 8, "D": 8, "causal": True}
    rows = harness.run(attention.SPEC, [shape], dtype=torch.float32, device=CPU, backends=["torch"],
                       passes=("fwd",), repeats=2, calls_per_batch=3)
    assert rows[0]["calls_per_batch"] == 3 and rows[0]["repeats"] == 2 and rows[0]["launch_us"] is None
    assert rows[0]["after_warmup"] == {"triton_compiles": 0, "autotune_keys": 0, "dynamo_graphs": 0}
    with pytest.raises(SystemExit, match="--calls-per-batch must be at least 1"):
        attention.main(["--T", "8", "--D", "8", "--calls-per-batch", "0", "--out", str(tmp_path)])


def test_report_notes_work_compiled_after_warm_up():
    row = {"op": "layer_norm", "label": "N=2 C=3", "dtype": "bf16", "pass": "fwd", "backend": "triton", "ms": 0.01,
           "status": "ok", "speedup": None, "baseline": "torch", "launch_us": 35.0,
           "after_warmup": {"triton_compiles": 2, "autotune_keys": 0, "dynamo_graphs": 0}}
    assert report.note(row) == "after warm-up: 2 triton_compiles"
    table = report.markdown_table([row, {**row, "after_warmup": {"triton_compiles": 0}}]).splitlines()
    assert table[0].endswith("| launch us | vs torch | note |")
    assert table[2].endswith("| 35.0 | - | after warm-up: 2 triton_compiles |") and table[3].endswith("| 35.0 | - |  |")


def test_extra_competitors_run_only_when_named_and_a_copy_spec_has_no_backward(tmp_path):
    chosen, _ = harness.select_backends("attention", "cpu", None, False, tuple(attention.SPEC.extra))
    assert not set(chosen) & set(attention.SDPA_BACKENDS)
    shape = {"B": 1, "H": 2, "T": 16, "D": 8, "causal": True}
    rows = harness.run(attention.SPEC, [shape], dtype=torch.float32, device=CPU, backends=["torch", "sdpa-math"],
                       passes=("fwd",), repeats=1)
    assert [row["status"] for row in rows] == ["ok", "ok"] and rows[1]["backend"] == "sdpa-math"
    assert layer_norm.main(["--rows", "8", "--C", "16", "--repeats", "1", "--backends", "torch", "--copy",
                           "--passes", "fwd,bwd", "--out", str(tmp_path), "--no-plot"]) == 0
    copies = report.load_rows(tmp_path / "copy.jsonl")
    assert [(row["backend"], row["pass"], row["status"]) for row in copies] == [("copy", "fwd", "ok")]
    assert copies[0]["bytes"] == 2 * 8 * 16 * 4 and copies[0]["gbps"] > 0


# ----------------------------------------------------------------------------- bench.autotune

def test_autotune_modes_select_candidates():
    assert autotune.parse_mode(None) == ("full", 0, 1) and autotune.parse_mode("quick") == ("quick", 0, 1)
    assert autotune.parse_mode("shard:1/3") == ("shard", 1, 3)
    for bad in ("fast", "shard:3/3", "shard:1"):
        with pytest.raises(ValueError, match="ENGINE_AUTOTUNE"):
            autotune.parse_mode(bad)
    candidates = list(range(8))
    assert autotune.select(candidates, "quick") == [0] and autotune.select(candidates, "full") == candidates
    shards = [autotune.select(candidates, "shard", i, 3) for i in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5]] and sorted(c for shard in shards for c in shard) == candidates
    assert autotune.select([0, 1], "shard", 5, 8) == [0]  # never none


def test_autotune_switch_narrows_after_the_kernels_own_pruning(monkeypatch):
    import triton

    configs = [triton.Config({"BLOCK": block}, num_warps=4) for block in (16, 32, 64, 128)]

    def keep_big(configs, named_args, **kwargs):  # a kernel's own pruning, e.g. by kind of input
        return [config for config in configs if config.kwargs["BLOCK"] >= 32]

    @triton.autotune(configs=configs, key=["n"], prune_configs_by={"early_config_prune": keep_big})
    @triton.jit
    def kernel(x_ptr, n, BLOCK: triton.language.constexpr):
        pass

    monkeypatch.setattr(autotune, "autotuners", lambda: {"test.kernel": kernel})
    assert "the first candidate of each of 1 autotuned kernels" in autotune.apply("quick")
    assert [c.kwargs["BLOCK"] for c in kernel.early_config_prune(configs, {})] == [32]
    kernel.early_config_prune = keep_big
    autotune.apply("shard:1/2")
    assert [c.kwargs["BLOCK"] for c in kernel.early_config_prune(configs, {})] == [64]
    assert len(kernel.configs) == 4  # the list itself stays whole: the autotuner still prunes and benchmarks


def test_autotune_runner_logs_every_train_step(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", Trainer.train_step)  # restored after the test
    log = tmp_path / "steps.jsonl"
    autotune.log_train_steps(log)
    data = bench_train.random_token_data(256, 16, 2)
    config = TrainConfig(batch_size=2, max_steps=2, sample_tokens=0, device="cpu", dtype="fp32")
    trainer = Trainer(preset("toy", vocab_size=256, n_layers=1, max_seq_len=16), config, data, tmp_path / "run", CPU,
                      torch.float32, log=lambda message: None)
    trainer.train_step()
    trainer.train_step()
    rows = report.load_rows(log)
    assert [row["step"] for row in rows] == [1, 2] and all(row["seconds"] > 0 for row in rows)
    assert set(rows[0]) == {"step", "seconds", "triton_compiles", "autotune_keys", "dynamo_graphs"}


def test_autotune_runner_runs_a_module_and_refuses_bad_input(monkeypatch, capsys):
    assert autotune.main([]) == 2
    monkeypatch.setenv("ENGINE_AUTOTUNE", "sometimes")
    assert autotune.main(["json.tool", "--help"]) == 2
    assert "ENGINE_AUTOTUNE='sometimes' is not one of" in capsys.readouterr().err
    monkeypatch.delenv("ENGINE_AUTOTUNE")
    assert autotune.main(["json.tool", "--help"]) == 0  # ran json.tool's main, which printed its help
    assert "usage:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bench.sanitize_ops

def test_sanitize_driver_runs_the_extension_ops_on_the_cpu(capsys):
    assert sanitize_ops.main(["--device", "cpu", "--ops", "cross_entropy,ffn_epilogues", "--dtypes", "fp32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "0 problem(s) in cross_entropy, ffn_epilogues x fp32 on cpu"
    assert sum(line.startswith("ok   ") for line in printed) == 4  # CE, 2 x bias_gelu, bias_residual
    assert sanitize_ops.main(["--device", "cpu", "--ops", "softmax"]) == 2


def test_sanitize_driver_runs_the_whole_ffn_op(capsys):
    assert sanitize_ops.main(["--device", "cpu", "--ops", "ffn", "--dtypes", "fp32,bf16"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:-1]] == ["ok", "ok"] and printed[-1].startswith("0 problem(s)")


def test_sanitize_driver_flags_a_wrong_result():
    right = torch.tensor([1.0, 2.0, 3.0])
    assert sanitize_ops.compare("op", [("out", right, right)], torch.float32) == []
    problems = sanitize_ops.compare("op", [("out", right * 1.01, right), ("nan", right * math.nan, right)],
                                    torch.float32)
    assert len(problems) == 2 and problems[0].startswith("op: out relative error 0.01")


# ----------------------------------------------------------------------------- the GPU check's summary

def _op_row(op, backend, pass_name, shape, ms, **fields):
    return {"op": op, "backend": backend, "pass": pass_name, "shape": shape, "label": harness.shape_label(shape),
            "dtype": "bf16", "status": "ok", "ms": ms, "speedup": None, "baseline": "torch", "peak_mem_mb": None,
            **fields}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_stage_outputs(tmp_path):
    """What the GPU check's stages write: stage table, run facts, training steps and metrics, JUnit and pytest
    logs (one file cut off), a sanitizer log, op benchmark rows and failed bench.train rows."""
    (tmp_path / "stages.tsv").write_text("stage\tstatus\tseconds\tlimit\nbuild\tok\t80\t150\ncheck\tok\t60\t150\n"
                                         "main_auto\tok\t50\t90\nmain_torch\tok\t30\t60\n"
                                         "tests\ttimed out after 150s\t150\t150\n"
                                         "sanitize_memcheck\tfailed (exit 86)\t40\t60\n")
    (tmp_path / "run.tsv").write_text("device\tNVIDIA H200\ncommit\tabc123\ncorpus\ttests/data/shakespeare.txt\n"
                                      "check\tengine/check.py found\n")
    counts = {"triton_compiles": 100, "autotune_keys": 10, "dynamo_graphs": 0}
    _write_jsonl(tmp_path / "runs" / "main_auto-steps.jsonl", [
        {"step": 1, "seconds": 31.5, **counts}, {"step": 2, "seconds": 0.1, **counts},
        {"step": 3, "seconds": 0.1, **counts, "triton_compiles": 101}])
    _write_jsonl(tmp_path / "runs" / "main_torch-steps.jsonl", [{"step": s, "seconds": 0.1, **counts} for s in (1, 2, 3)])
    for backend, offset in (("auto", 0.0), ("torch", 0.01)):
        _write_jsonl(tmp_path / "runs" / f"main_{backend}-metrics.jsonl",
                     [{"step": s, "loss": 4.0 - 0.1 * s + offset, "tokens_per_s": 1000.0 * s} for s in range(1, 13)]
                     + [{"step": 12, "train_loss": 2.8, "val_loss": 2.9}])
    (tmp_path / "junit-tests-test_a.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0"><testcase name="test_one"/>'
        '<testcase name="test_two"><failure message="x"/></testcase><testcase name="test_three"/></testsuite>'
        '</testsuites>')
    (tmp_path / "pytest-tests-test_a.log").write_text("...")
    (tmp_path / "pytest-tests-test_b.log").write_text(
        "tests/test_b.py::test_x PASSED [ 50%]\ntests/test_b.py::test_y ")
    (tmp_path / "sanitize_memcheck.log").write_text("ok   x\n0 problem(s) in attention\n========= ERROR SUMMARY: 3 errors\n")
    d128 = {"B": 4, "H": 16, "T": 4096, "D": 128, "causal": True}
    _write_jsonl(tmp_path / "attention.jsonl", [
        _op_row("attention", "triton", "fwd", d128, 1.0, tflops=400.0),
        _op_row("attention", "triton", "fwd+bwd", d128, 2.0), _op_row("attention", "sdpa-flash", "fwd+bwd", d128, 2.4),
        _op_row("attention", "torch", "fwd+bwd", d128, 2.6), _op_row("attention", "cuda", "fwd+bwd", d128, 3.0)])
    lce = {"N": 8192, "d_model": 768, "V": 50304}
    _write_jsonl(tmp_path / "linear_cross_entropy.jsonl", [
        _op_row("linear_cross_entropy", "torch", "fwd+bwd", lce, 5.0, peak_mem_mb=1000.0),
        _op_row("linear_cross_entropy", "triton", "fwd+bwd", lce, 4.0, peak_mem_mb=500.0)])
    _write_jsonl(tmp_path / "train.jsonl", [
        {"op": "train", "backend": name, "status": "error: x", "label": "gpt2", "dtype": "bf16", "ms": None,
         "shape": {"preset": "gpt2", "batch_size": 8, "seq_len": 1024}} for name in ("torch", "auto")])
    _write_jsonl(tmp_path / "runs" / "bench_train-steps.jsonl",
                 [{"step": s, "seconds": 0.1, **counts} for s in (1, 2, 3)]
                 + [{"step": s, "seconds": 0.1, **counts, "autotune_keys": 10 + (s > 2)} for s in (1, 2, 3)])


# What check_summary must say about _write_stage_outputs' files, a line each.
CHECK_SUMMARY_LINES = [
    "compiled after warm-up: 0 of 9 op rows; bench.train after step 2: torch: none; auto: 1 autotune_keys",
    "tests/data/shakespeare.txt",
    # tokens/s: the median after step 10 (steps 11, 12); final loss: the mean of the last 10 steps' losses.
    "| auto | 3 | 31.5 | 11,500 | 3.25 | 2.90 | 1 triton_compiles |",
    "| torch | 3 | 0.1 | 11,500 | 3.26 | 2.90 | none |",
    "last-10 means 3.2500 vs 3.2600 (0.31% apart: agree within 2%)",
    "| tests | test_a | 2 | 1 | 0 | 0 | test_two |",
    "| tests | test_b | 1 | 0 | 0 | 0 | no JUnit file: cut off (timeout) in tests/test_b.py::test_y |",
    "- sanitize_memcheck: 3 sanitizer error(s), 0 wrong result(s)",
    "| triton attention fwd TFLOP/s, D=128 T=4096 causal | 400 | >= 350 | met |",
    "| triton attention fwd+bwd vs SDPA's best backend, D=128 T=4096 | 1.20 | >= 1 | met |",
    "| cuda attention fwd+bwd time / triton's, D=128 T=4096 | 1.50 | <= 2 | met |",
    "| triton fused linear CE peak memory / torch's, V=50304 | 0.5 | <= 0.333 | MISSED |",
    "| gpt2 training MFU with auto | - | >= 0.4 | - |",
]


def test_check_summary_answers_from_what_the_stages_wrote(tmp_path):
    _write_stage_outputs(tmp_path)
    summary = report.check_summary(tmp_path)
    assert summary.startswith("# GPU check: NVIDIA H200, commit abc123")
    for line in CHECK_SUMMARY_LINES:
        assert line in summary, line
    answers = summary[summary.index("## answers"):]
    assert summary.rstrip().endswith(answers.rstrip())  # the answers table comes last
    assert "| 4 gpu tests | 3 passed, 1 failed or errors, 1 file(s) cut off (2 files) |" in answers
    assert "| 6 targets met | 3 of 10 (6 not measured) |" in answers
    assert report.main([str(tmp_path), "--check-summary"]) == 0  # the CLI the script calls


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_packs_one_archive_after_every_stage(tmp_path):
    """The script itself on the CPU: the device stage, then one stage selected and cut off by its limit."""
    import os
    import subprocess
    import tarfile

    results, pack = tmp_path / "results", tmp_path / "pack"
    env = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "GPU_CHECK_ONLY": "sanitize",
           "GPU_CHECK_LIMIT_sanitize_ops": "1", "GPU_CHECK_PACK_DIR": str(pack),
           "GPU_CHECK_SCRATCH": str(tmp_path / "scratch"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(harness.REPO_ROOT / "bench" / "gpu_check.sh"), str(results)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = [line.split("\t") for line in (results / "stages.tsv").read_text().splitlines()[1:]]
    status = {fields[0]: fields[1] for fields in stages}
    assert status["device"] == "ok" and status["backends"] == "not selected"
    assert status["sanitize_ops"] == "timed out after 1s"
    assert status["main_auto"] == "not selected" and status["bench_train"] == "not selected"
    with tarfile.open(pack / "gpu-check.tar.gz") as archive:
        names = set(archive.getnames())
        packed_summary = archive.extractfile("results/gpu-check-summary.md").read().decode()
    assert {"results/stages.tsv", "results/run.tsv", "results/device.log", "results/sanitize_ops.log",
            "results/gpu-check-summary.md"} <= names
    summary = (pack / "gpu-check-summary.md").read_text()
    assert summary == packed_summary and "| sanitize_ops | timed out after 1s |" in summary
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the answers table prints last


def test_gpu_check_command_lines_parse():
    """Every command line the GPU branch of gpu_check.sh builds is accepted by its module's parser: a
    renamed flag must fail here, not in the middle of the 9 minutes on a GPU."""
    import re
    import shlex

    from engine import train as engine_train

    script = (harness.REPO_ROOT / "bench" / "gpu_check.sh").read_text()
    gpu_branch = script[script.index("else\n    MAIN_ARGS"):script.index("# What the stage functions read")]

    def words(name):
        match = re.search(r"(?<![A-Z_])" + name + r"=\((.*?)\)\n", gpu_branch, flags=re.DOTALL)
        return shlex.split(match.group(1).replace("\\\n", " "))

    out = ["--out", "unused"]
    for name, module in (("ATTENTION_ARGS", attention), ("ATTENTION_SWEEP_ARGS", attention), ("FFN_ARGS", ffn),
                         ("LAYER_NORM_ARGS", layer_norm), ("CROSS_ENTROPY_ARGS", cross_entropy),
                         ("TRAIN_ARGS", bench_train)):
        module.build_parser().parse_args(words(name) + out)
    for name in ("MAIN_ARGS", "PREWARM_TRAIN_ARGS"):
        engine_train.build_parser().parse_args(words(name) + ["--data", "x", "--backend", "auto"] + out)
    prewarm = "".join(re.findall(r'PREWARM_BENCH\+?="(.*?)"', gpu_branch)).split(";")
    modules = {"bench.attention": attention, "bench.ffn": ffn, "bench.train": bench_train}
    assert [shlex.split(line)[0] for line in prewarm] == list(modules)
    for line in prewarm:
        command = shlex.split(line)
        modules[command[0]].build_parser().parse_args(command[1:] + out)
