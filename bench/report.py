"""Results: JSON rows on disk, markdown tables, PNG plots and the compact summary.

A results folder holds one `<op>.jsonl` per op (one JSON object per measurement, appended as it
is measured, so an interrupted run keeps what it measured) and `train.jsonl` from bench.train.
This module renders from them `<op>.md` (the full table), `<op>.png` (TFLOP/s or GB/s against
the sweep variable, one line per backend) and `summary.md` (the compact tables).

    python -m bench.report DIR [--no-plot]   re-render DIR's tables and plots, print the summary

Row fields (bench.harness writes them; bench.train writes the `train` variant):
    op, backend, label (shape as text), shape (dict), dtype, pass (fwd | bwd | fwd+bwd | step),
    status (ok | oom | error: ...), ms, tflops, gbps, peak_mem_mb, speedup (baseline ms / ms),
    baseline, flop, bytes, repeats, device, torch, triton, commit, date.
"""
from __future__ import annotations

import argparse
import json
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


def markdown_table(rows: list[dict]) -> str:
    """Every op row: shape, dtype, pass, backend, ms, TFLOP/s, GB/s, peak MiB, speedup, note."""
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
    columns.append((_baseline_header(rows), lambda r: ratio(r.get("speedup"))))
    if any(row["status"] != "ok" for row in rows):
        columns.append(("note", lambda r: "" if r["status"] == "ok" else r["status"]))
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
        rows = load_rows(path)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a results folder holding <op>.jsonl files")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    for path in sorted(args.folder.glob("*.jsonl")):
        render_op(args.folder, path.stem, plot=not args.no_plot)
    summary = compact_summary(args.folder)
    (args.folder / "summary.md").write_text(f"# Benchmark summary\n\n{summary}\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
