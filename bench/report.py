"""Results: JSON rows on disk, markdown tables, PNG plots and the compact summary.

A results folder holds one `<op>.jsonl` per op (one JSON object per measurement, appended as it
is measured, so an interrupted run keeps what it measured) and `train.jsonl` from bench.train.
This module renders from them `<op>.md` (the full table), `<op>.png` (TFLOP/s or GB/s against
the sweep variable, one line per backend) and `summary.md` (the compact tables).

    python -m bench.report DIR [--no-plot]   re-render DIR's tables and plots, print the summary

Row fields (bench.harness writes them; bench.train writes the `train` variant):
    op, backend, label (shape as text), shape (dict), dtype, pass (fwd | bwd | fwd+bwd | step),
    status (ok | oom | error: ...), ms, tflops, gbps, peak_mem_mb, speedup (baseline ms / ms),
    baseline, flop, bytes, repeats, calls_per_batch, launch_us, after_warmup (what compiled during the
    timed calls), device, torch, triton, commit, date.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "step")


class RowWriter:
    """Appends rows to a JSONL file as they are measured."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def load_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; a line cut short (a run killed mid-write) is skipped with a warning."""
    rows = []
    for number_, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{number_}: skipping an incomplete row", file=sys.stderr)
    return rows


def number(value: float | None) -> str:
    """Three significant digits without exponents; '-' for a missing value."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _baseline_header(rows: list[dict]) -> str:
    baselines = {row.get("baseline") for row in rows}
    return f"vs {baselines.pop()}" if len(baselines) == 1 else "speedup"


def compiled_after_warmup(row: dict) -> str:
    """'' or e.g. 'after warm-up: 2 triton_compiles': work that compiled inside the timed calls."""
    counts = row.get("after_warmup") or {}
    return ", ".join(f"{value} {name}" for name, value in counts.items() if value)


def note(row: dict) -> str:
    """A row's failure, or what compiled after its warm-up (either makes its time suspect)."""
    if row["status"] != "ok":
        return row["status"]
    compiled = compiled_after_warmup(row)
    return f"after warm-up: {compiled}" if compiled else ""


def markdown_table(rows: list[dict]) -> str:
    """Every op row: shape, dtype, pass, backend, ms, TFLOP/s, GB/s, peak MiB, launch us, speedup, note.

    ms is device time per call on a GPU; 'launch us' the host time to issue one call (bench.harness)."""
    if not rows:
        return "(no rows)"
    if all(row["op"] == "train" for row in rows):
        return train_table(rows)
    columns = [("shape", lambda r: r["label"]), ("dtype", lambda r: r["dtype"]), ("pass", lambda r: r["pass"]),
               ("backend", lambda r: r["backend"]), ("ms", lambda r: number(r["ms"]))]
    if any(row.get("tflops") is not None for row in rows):
        columns.append(("TFLOP/s", lambda r: number(r.get("tflops"))))
    if any(row.get("gbps") is not None for row in rows):
        columns.append(("GB/s", lambda r: number(r.get("gbps"))))
    if any(row.get("peak_mem_mb") is not None for row in rows):
        columns.append(("peak MiB", lambda r: number(r.get("peak_mem_mb"))))
    if any(row.get("launch_us") is not None for row in rows):
        columns.append(("launch us", lambda r: number(r.get("launch_us"))))
    columns.append((_baseline_header(rows), lambda r: ratio(r.get("speedup"))))
    if any(note(row) for row in rows):
        columns.append(("note", note))
    return _markdown([name for name, _ in columns], [[get(row) for _, get in columns] for row in rows])


def train_table(rows: list[dict]) -> str:
    """bench.train rows: preset, tokens per step, backend, step time, tokens/s, MFU, peak memory, speedup.

    The ops column shows which backend each op resolved to, for `auto` and `compile` (for a named
    backend it is that backend)."""
    header = ["preset", "batch x seq", "dtype", "backend", "ops", "step ms", "tokens/s", "model TFLOP/s", "MFU",
              "MFU vs matmul", "peak MiB", _baseline_header(rows), "note"]
    lines = []
    for row in rows:
        shape = row["shape"]
        lines.append([
            shape["preset"], f"{shape['batch_size']} x {shape['seq_len']}", row["dtype"], row["backend"],
            row.get("ops") if row["backend"] in ("auto", "compile") and row.get("ops") else "-",
            number(row["ms"]), number(row.get("tokens_per_s")), number(row.get("tflops")),
            "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%",
            "-" if row.get("mfu_vs_matmul") is None else f"{100 * row['mfu_vs_matmul']:.1f}%",
            number(row.get("peak_mem_mb")), ratio(row.get("speedup")), "" if row["status"] == "ok" else row["status"],
        ])
    return _markdown(header, lines)


def plot_rows(rows: list[dict], path: Path) -> bool:
    """TFLOP/s (or GB/s) against the sweep variable, a subplot per pass, a line per backend.

    Returns False (and writes nothing) when there is nothing to plot."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot {path}", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [row for row in rows if row["status"] == "ok" and row.get(row.get("metric", "tflops")) is not None
              and row.get("x_axis") in row["shape"]]
    passes = [name for name in PASS_ORDER if any(row["pass"] == name for row in points)]
    if len(points) < 2:
        return False
    figure, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.2), squeeze=False)
    dtypes = sorted({row["dtype"] for row in points})
    for axis, pass_name in zip(axes[0], passes):
        series: dict[str, dict] = defaultdict(dict)
        for row in points:
            if row["pass"] != pass_name:
                continue
            name = " ".join(part for part in (row["backend"], row.get("series", ""),
                                              row["dtype"] if len(dtypes) > 1 else "") if part)
            series[name][row["shape"][row["x_axis"]]] = row[row["metric"]]  # a later run of the same point wins
        for name, values in sorted(series.items()):
            xs = sorted(values)
            axis.plot(xs, [values[x] for x in xs], marker="o", label=name)
        x_values = sorted({row["shape"][row["x_axis"]] for row in points})
        if len(x_values) > 1 and x_values[-1] / x_values[0] >= 8:
            axis.set_xscale("log", base=2)
        axis.set_xlabel(points[0]["x_axis"])
        axis.set_ylabel("TFLOP/s" if points[0]["metric"] == "tflops" else "GB/s")
        axis.set_title(pass_name)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{points[0]['op']} on {points[0]['device']} ({', '.join(dtypes)})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def render_op(out_dir: Path, op: str, plot: bool = True) -> list[Path]:
    """Write <op>.md (and <op>.png) from <op>.jsonl; returns the files written."""
    rows = load_rows(out_dir / f"{op}.jsonl")
    written = [out_dir / f"{op}.md"]
    written[0].write_text(f"# {op}\n\n{markdown_table(rows)}\n")
    if plot and op != "train" and plot_rows(rows, out_dir / f"{op}.png"):
        written.append(out_dir / f"{op}.png")
    return written


def _latest(rows: list[dict], key) -> dict:
    latest = {}
    for row in rows:
        latest[key(row)] = row
    return latest


def compact_summary(out_dir: Path) -> str:
    """The short tables: per (op, shape, dtype, pass) one line with each backend's ms and speedup,
    peak memory of fwd+bwd where measured, and training tokens/s per backend."""
    op_rows, train_rows = [], []
    for path in sorted(Path(out_dir).glob("*.jsonl")):
        rows = [row for row in load_rows(path) if row.get("op")]
        (train_rows if path.stem == "train" else op_rows).extend(rows)
    sections = []
    if op_rows:
        backends = list(dict.fromkeys(row["backend"] for row in op_rows))
        latest = _latest(op_rows, lambda r: (r["op"], r["label"], r["dtype"], r["pass"], r["backend"]))
        keys = list(dict.fromkeys((r["op"], r["label"], r["dtype"], r["pass"]) for r in op_rows))
        lines = []
        for key in keys:
            cells = []
            for backend in backends:
                row = latest.get((*key, backend))
                if row is None:
                    cells.append("")
                elif row["status"] != "ok":
                    cells.append(row["status"].split(":")[0])
                else:
                    cells.append(f"{number(row['ms'])} ({ratio(row.get('speedup'))})")
            lines.append([key[0], key[1], key[2], key[3], *cells])
        sections.append(f"ms per call ({_baseline_header(op_rows)} in brackets)\n\n"
                        + _markdown(["op", "shape", "dtype", "pass", *backends], lines))
        memory_keys = [key for key in keys if key[3] == "fwd+bwd" and any(
            (latest.get((*key, b)) or {}).get("peak_mem_mb") is not None for b in backends)]
        if memory_keys:
            lines = [[*key[:3], *[number((latest.get((*key, b)) or {}).get("peak_mem_mb")) for b in backends]]
                     for key in memory_keys]
            sections.append("peak MiB of fwd+bwd (working memory beyond the inputs)\n\n"
                            + _markdown(["op", "shape", "dtype", *backends], lines))
    if train_rows:
        latest = _latest(train_rows, lambda r: (r["label"], r["dtype"], r["backend"]))
        sections.append("training\n\n" + train_table(list(latest.values())))
    return "\n\n".join(sections) if sections else f"no results in {out_dir}"


# ----------------------------------------------------------------------------- the GPU check's summary
# bench/gpu_check.sh calls check_summary after every stage; it reads only what the stages wrote, so
# it works on a folder of a run cut short at any point.

# Issue 14's targets: (what, threshold, compare as ">=" or "<=").
TARGETS = {
    "attention_fwd_tflops": ("triton attention fwd TFLOP/s, D=128 T=4096 causal", 350.0, ">="),
    "attention_d128_vs_sdpa": ("triton attention fwd+bwd vs SDPA's best backend, D=128 T=4096", 1.0, ">="),
    "attention_d64_vs_sdpa": ("triton attention fwd+bwd vs SDPA's best backend, D=64 T=4096", 0.9, ">="),
    "attention_cuda_vs_triton": ("cuda attention fwd+bwd time / triton's, D=128 T=4096", 2.0, "<="),
    "ffn_vs_torch": ("triton FFN fwd+bwd vs torch", 1.2, ">="),
    "ffn_vs_compile": ("triton FFN fwd+bwd vs torch.compile", 1.0, ">="),
    "layer_norm_vs_copy": ("triton LayerNorm fwd GB/s / copy GB/s (widest C)", 0.8, ">="),
    "linear_ce_memory": ("triton fused linear CE peak memory / torch's, V=50304", 1 / 3, "<="),
    "train_mfu": ("gpt2 training MFU with auto", 0.40, ">="),
    "train_vs_compile": ("gpt2 training tokens/s, auto vs torch.compile of torch", 1.1, ">="),
}
SDPA_NAMES = ("torch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
CHECK_TAIL_LINES = 15
TRAIN_WARMUP_STEPS = 2  # bench/gpu_check.sh runs bench.train with --warmup 2


def _read_tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def _jsonl(path: Path) -> list[dict]:
    return load_rows(path) if path.exists() else []


def _main_job_line(folder: Path, backend: str) -> list[str] | None:
    """backend, steps, first step s, tokens/s (median after step 10), final loss, val loss, compiled after step 2."""
    steps = _jsonl(folder / "runs" / f"main_{backend}-steps.jsonl")
    metrics = _jsonl(folder / "runs" / f"main_{backend}-metrics.jsonl")
    if not steps and not metrics:
        return None
    train = [row for row in metrics if row.get("loss") is not None and "tokens_per_s" in row]
    steady = [row["tokens_per_s"] for row in train if row["step"] > 10] or [row["tokens_per_s"] for row in train]
    final = [row["loss"] for row in train[-10:]]
    val = [row["val_loss"] for row in metrics if "val_loss" in row]
    first = next((row["seconds"] for row in steps if row["step"] == 1), None)
    second = next((row for row in steps if row["step"] == 2), None)
    compiled = "-"
    if second is not None and len(steps) > 2:
        after = {name: steps[-1][name] - second[name] for name in ("triton_compiles", "autotune_keys", "dynamo_graphs")}
        compiled = ", ".join(f"{value} {name}" for name, value in after.items() if value) or "none"
    return [backend, str(steps[-1]["step"] if steps else "-"), number(first),
            number(statistics.median(steady) if steady else None),
            number(sum(final) / len(final) if final else None), number(val[-1] if val else None), compiled]


def _loss_agreement(folder: Path) -> str:
    losses = {}
    for backend in ("auto", "torch"):
        rows = _jsonl(folder / "runs" / f"main_{backend}-metrics.jsonl")
        losses[backend] = {row["step"]: row["loss"] for row in rows if row.get("loss") is not None}
    common = sorted(set(losses["auto"]) & set(losses["torch"]))
    if not common:
        return ""
    last = common[-10:]
    auto_mean = sum(losses["auto"][s] for s in last) / len(last)
    torch_mean = sum(losses["torch"][s] for s in last) / len(last)
    worst = max(abs(losses["auto"][s] - losses["torch"][s]) for s in common)
    relative = abs(auto_mean - torch_mean) / max(abs(torch_mean), 1e-9)
    verdict = "agree" if relative <= 0.02 else "DIFFER"
    return (f"losses auto vs torch over {len(common)} common steps: last-10 means {auto_mean:.4f} vs {torch_mean:.4f} "
            f"({100 * relative:.2f}% apart: {verdict} within 2%); largest per-step gap {worst:.4f}")


def _test_lines(folder: Path) -> list[list[str]]:
    """One line per pytest file: stage, file, passed, failed, errors, skipped, note (failures, or where it was cut)."""
    import re
    from xml.etree import ElementTree

    lines = []
    for log in sorted(folder.glob("pytest-*.log")):
        stage, _, name = log.stem.removeprefix("pytest-").partition("-")
        xml = folder / f"junit-{stage}-{name}.xml"
        if xml.exists():
            try:
                root = ElementTree.parse(xml).getroot()
            except ElementTree.ParseError:
                root = None
            if root is not None:
                suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
                total = {key: sum(int(suite.get(key, 0)) for suite in suites)
                         for key in ("tests", "failures", "errors", "skipped")}
                failing = [case.get("name", "?") for case in root.iter("testcase")
                           if case.find("failure") is not None or case.find("error") is not None]
                passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
                lines.append([stage, name, str(passed), str(total["failures"]), str(total["errors"]),
                              str(total["skipped"]), ", ".join(failing)[:200]])
                continue
        text = log.read_text(errors="replace")
        results = re.findall(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, flags=re.MULTILINE)
        started = re.findall(r"^(\S+::\S+)", text, flags=re.MULTILINE)
        cut = started[-1] if started and len(started) > len(results) else "?"
        lines.append([stage, name, str(results.count("PASSED")), str(results.count("FAILED")),
                      str(results.count("ERROR")), str(results.count("SKIPPED")),
                      f"no JUnit file: cut off (timeout) in {cut}"])
    return lines


def _sanitizer_line(folder: Path, stage: str) -> str | None:
    import re

    log = folder / f"{stage}.log"
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
    problems = re.findall(r"^(\d+) problem\(s\) in", text, flags=re.MULTILINE)
    parts = []
    if errors:
        parts.append(f"{errors[-1]} sanitizer error(s)")
    if hazards:
        parts.append(f"{hazards[-1]} hazard(s)")
    parts.append(f"{problems[-1]} wrong result(s)" if problems else "the op driver did not finish")
    return f"{stage}: " + ", ".join(parts)


def _op_rows(folder: Path) -> dict[tuple, dict]:
    """Latest ok op row by (op, backend, pass, frozen shape)."""
    latest = {}
    for path in sorted(folder.glob("*.jsonl")):
        for row in load_rows(path):
            if row.get("op") and row.get("status") == "ok" and isinstance(row.get("shape"), dict):
                latest[(row["op"], row["backend"], row["pass"], tuple(sorted(row["shape"].items())))] = row
    return latest


def _find(rows: dict, op: str, backend: str, pass_name: str, **shape) -> dict | None:
    found = None
    for (row_op, row_backend, row_pass, key), row in rows.items():
        if (row_op, row_backend, row_pass) == (op, backend, pass_name) and all(
                dict(key).get(name) == value for name, value in shape.items()):
            found = row
    return found


def target_values(folder: Path) -> dict[str, float | None]:
    """Measured value per TARGETS key, None where the run did not measure it."""
    rows = _op_rows(folder)
    values: dict[str, float | None] = dict.fromkeys(TARGETS)

    def ms(op, backend, pass_name, **shape):
        row = _find(rows, op, backend, pass_name, **shape)
        return None if row is None else row["ms"]

    forward = _find(rows, "attention", "triton", "fwd", T=4096, D=128, causal=True)
    values["attention_fwd_tflops"] = forward and forward.get("tflops")
    for head_dim, key in ((128, "attention_d128_vs_sdpa"), (64, "attention_d64_vs_sdpa")):
        triton = ms("attention", "triton", "fwd+bwd", T=4096, D=head_dim, causal=True)
        sdpa = [t for t in (ms("attention", name, "fwd+bwd", T=4096, D=head_dim, causal=True) for name in SDPA_NAMES)
                if t is not None]
        values[key] = min(sdpa) / triton if triton and sdpa else None
    cuda = ms("attention", "cuda", "fwd+bwd", T=4096, D=128, causal=True)
    triton = ms("attention", "triton", "fwd+bwd", T=4096, D=128, causal=True)
    values["attention_cuda_vs_triton"] = cuda / triton if cuda and triton else None
    triton = ms("ffn", "triton", "fwd+bwd")
    for other, key in (("torch", "ffn_vs_torch"), ("compile", "ffn_vs_compile")):
        theirs = ms("ffn", other, "fwd+bwd")
        values[key] = theirs / triton if theirs and triton else None
    widths = sorted({dict(key).get("C") for (op, _, _, key) in rows if op == "layer_norm"} - {None})
    if widths:
        norm = _find(rows, "layer_norm", "triton", "fwd", C=widths[-1])
        copy = _find(rows, "copy", "copy", "fwd", C=widths[-1])
        values["layer_norm_vs_copy"] = norm["gbps"] / copy["gbps"] if norm and copy else None
    fused = _find(rows, "linear_cross_entropy", "triton", "fwd+bwd", V=50304)
    plain = _find(rows, "linear_cross_entropy", "torch", "fwd+bwd", V=50304)
    if fused and plain and fused.get("peak_mem_mb") is not None and plain.get("peak_mem_mb"):
        values["linear_ce_memory"] = fused["peak_mem_mb"] / plain["peak_mem_mb"]
    train = {row["backend"]: row for row in _jsonl(folder / "train.jsonl") if row.get("status") == "ok"}
    if "auto" in train:
        values["train_mfu"] = train["auto"].get("mfu")
        if "compile" in train:
            values["train_vs_compile"] = train["auto"]["tokens_per_s"] / train["compile"]["tokens_per_s"]
    return values


def check_summary(folder: Path) -> str:
    """The GPU check's short summary (markdown); its last table answers issue 14's questions."""
    folder = Path(folder)
    run = {fields[0]: fields[1] for fields in _read_tsv(folder / "run.tsv") if len(fields) >= 2}
    stages = [fields for fields in _read_tsv(folder / "stages.tsv")[1:] if len(fields) >= 4]
    status = {fields[0]: fields[1] for fields in stages}
    out = [f"# GPU check: {run.get('device', '?')}, commit {run.get('commit', '?')}, started {run.get('started', '?')}",
           "", f"- corpus of the main job: {run.get('corpus', '?')}; {run.get('check', 'check: ?')}"]
    out += _device_lines(folder / "device.log")
    main_lines = [line for line in (_main_job_line(folder, b) for b in ("auto", "torch")) if line]
    if main_lines:
        out += ["", f"## main job (python -m engine.train {run.get('main_args', '')})", "",
                _markdown(["backend", "steps", "first step s", "tokens/s", "final loss", "val loss",
                           "compiled after step 2"], main_lines)]
        agreement = _loss_agreement(folder)
        if agreement:
            out += ["", agreement]
    tests = _test_lines(folder)
    if tests:
        out += ["", "## tests (gpu and not slow)", "",
                _markdown(["stage", "file", "passed", "failed", "errors", "skipped", "note"], tests)]
    sanitizer = [line for line in (_sanitizer_line(folder, s) for s in
                                   ("sanitize_memcheck", "sanitize_racecheck", "sanitize_ops")) if line]
    if sanitizer:
        out += ["", "## sanitizer", "", *[f"- {line}" for line in sanitizer]]
    benchmarks = compact_summary(folder)
    if not benchmarks.startswith("no results"):
        out += ["", "## benchmarks", "", benchmarks, "", _compiled_after_warmup_line(folder)]
    if (folder / "check.log").exists():
        tail = (folder / "check.log").read_text(errors="replace").splitlines()[-CHECK_TAIL_LINES:]
        out += ["", f"## check (the last {CHECK_TAIL_LINES} lines of check.log)", "", "```", *tail, "```"]
    values = target_values(folder)
    measured = []
    for key, (label, threshold, comparison) in TARGETS.items():
        value = values[key]
        met = value is not None and (value >= threshold if comparison == ">=" else value <= threshold)
        measured.append([label, number(value), f"{comparison} {threshold:.3g}",
                         "-" if value is None else ("met" if met else "MISSED")])
    out += ["", "## targets", "", _markdown(["target", "measured", "wanted", "verdict"], measured)]
    out += ["", "## stages", "", _markdown(["stage", "status", "seconds", "limit"], stages)]
    answers = [
        ["1 build", _stage_answer(status, stages, "build")],
        ["2 every backend correct", _stage_answer(status, stages, "check")],
        ["3 main job auto / torch", f"{status.get('main_auto', 'not run')} / {status.get('main_torch', 'not run')}"],
        ["4 gpu tests", _tests_answer(tests, status)],
        ["5 sanitizer", "; ".join(sanitizer) or status.get("sanitize_memcheck", "not run")],
        ["6 targets met", (f"{sum(row[3] == 'met' for row in measured)} of {len(measured)} "
                           f"({sum(row[3] == '-' for row in measured)} not measured)")],
    ]
    out += ["", "## answers", "", _markdown(["question", "answer"], answers)]
    return "\n".join(out) + "\n"


def _compiled_after_warmup_line(folder: Path) -> str:
    """How many op rows compiled or autotuned inside their timed calls, and the same per bench.train run."""
    rows = [row for path in sorted(folder.glob("*.jsonl")) for row in load_rows(path) if row.get("op")]
    suspect = [row for row in rows if compiled_after_warmup(row)]
    line = f"compiled after warm-up: {len(suspect)} of {len(rows)} op rows"
    if suspect:
        line += " (" + "; ".join(f"{r['op']} {r['backend']} {r['pass']} {r['label']}" for r in suspect[:5]) + ")"
    steps = _jsonl(folder / "runs" / "bench_train-steps.jsonl")
    runs: list[list[dict]] = []
    for row in steps:  # a new Trainer starts at step 1 again
        if not runs or row["step"] <= runs[-1][-1]["step"]:
            runs.append([])
        runs[-1].append(row)
    names = [row["backend"] for row in _jsonl(folder / "train.jsonl")]
    parts = []
    for index, run in enumerate(runs):
        name = names[index] if len(names) == len(runs) else f"run {index + 1}"
        warm = next((row for row in run if row["step"] == TRAIN_WARMUP_STEPS), None)
        if warm is None or warm is run[-1]:
            continue
        after = {key: run[-1][key] - warm[key] for key in ("triton_compiles", "autotune_keys", "dynamo_graphs")}
        parts.append(f"{name}: " + (", ".join(f"{v} {k}" for k, v in after.items() if v) or "none"))
    if parts:
        line += f"; bench.train after step {TRAIN_WARMUP_STEPS}: " + "; ".join(parts)
    return line


def _device_lines(path: Path) -> list[str]:
    """From device.log: nvidia-smi's values line, the Python/torch line, the device properties line."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    kept = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("name,")]
    kept += [line.strip() for line in lines if line.startswith("python ") or " SMs, " in line]
    return [f"- {line}" for line in kept]


def _stage_answer(status: dict, stages: list[list[str]], name: str) -> str:
    row = next((fields for fields in stages if fields[0] == name), None)
    return "not run" if row is None else f"{row[1]} ({row[2]} s)"


def _tests_answer(tests: list[list[str]], status: dict) -> str:
    if not tests:
        return status.get("tests", "not run")
    passed = sum(int(line[2]) for line in tests)
    failed = sum(int(line[3]) + int(line[4]) for line in tests)
    cut = sum(line[6].startswith("no JUnit") for line in tests)
    return f"{passed} passed, {failed} failed or errors, {cut} file(s) cut off ({len(tests)} files)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a results folder holding <op>.jsonl files")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--check-summary", action="store_true",
                        help="print the GPU check's summary of the folder (bench/gpu_check.sh) and nothing else")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.check_summary:
        print(check_summary(args.folder), end="")
        return 0
    for path in sorted(args.folder.glob("*.jsonl")):
        render_op(args.folder, path.stem, plot=not args.no_plot)
    summary = compact_summary(args.folder)
    (args.folder / "summary.md").write_text(f"# Benchmark summary\n\n{summary}\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
