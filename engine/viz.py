"""`python -m engine.viz --run DIR`: figures that show what a run learned, written as PNGs.

    python -m engine.viz --run runs/toy-20261127 --prompt "ROMEO: But soft" --layer 2

Figures (in DIR/plots unless --out says otherwise):
- loss.png: training loss (every logged step) and the evaluations' train and validation loss,
  against optimizer steps and against tokens seen (from metrics.jsonl), and the validation loss in
  bits per character where the run recorded it (the last evaluation's losses go to stderr).
- attention_layer<L>.png: the attention weights of one layer for the prompt, one heatmap per head
  (row = query token, column = key token it attends to).
- attention_distance.png: every layer x head as one cell, coloured by its mean attention distance
  (how many tokens back a query looks, weighted by attention): local heads are small, heads that
  gather context from far away are large.
- positional_encoding.png: the position encoding matrix (positions x dimensions; the fixed
  sinusoids, or the learned table for a GPT-2-style run) and its dot-product similarity between
  positions, which shows how nearby positions resemble each other.

Attention weights come from the reference formula softmax(Q K^T / sqrt(D)) with the causal mask,
computed here from each layer's input and its qkv projection: fused attention kernels never
materialize the T x T weights. Drawing uses matplotlib's Agg renderer (no display needed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from engine.config import ArgumentParser
from engine.errors import UsageError, run_cli
from engine.model import GPT, sinusoidal_positions
from engine.sample import checkpoint_file, load_model

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
DPI = 110
TICK_LABEL_LIMIT = 64  # label heatmap axes with the tokens themselves up to this many tokens


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


# ----------------------------------------------------------------------------- loss curves

def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (training log rows with 'loss', evaluation rows with 'val_loss')."""
    train_rows, eval_rows = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # torn by a crash mid-write, as resuming treats it: skip it
            print(f"warning: skipping line {number} of {path}: not JSON (torn by a crash?): {line[:60]!r}",
                  file=sys.stderr)
            continue
        if not isinstance(row, dict):
            continue
        if "loss" in row:
            train_rows.append(row)
        if "val_loss" in row:
            eval_rows.append(row)
    return train_rows, eval_rows


def plot_loss(train_rows: list[dict], eval_rows: list[dict], path: Path) -> Path:
    """Loss against step (left) and against tokens seen (middle); where the run recorded it, the
    validation loss in bits per character (right), the unit that compares char, byte and BPE runs."""
    bpc_rows = [r for r in eval_rows if r.get("val_bits_per_char") is not None]
    figure = new_figure(18 if bpc_rows else 12, 4.5)
    panels = figure.subplots(1, 3 if bpc_rows else 2)
    by_step, by_tokens = panels[0], panels[1]
    for axes, key, label, scale in ((by_step, "step", "optimizer step", 1.0),
                                    (by_tokens, "tokens", "tokens seen (millions)", 1e-6)):
        if train_rows:
            axes.plot([r[key] * scale for r in train_rows], [r["loss"] for r in train_rows],
                      color="tab:blue", alpha=0.6, linewidth=1, label="train (logged steps)")
        if eval_rows:
            x = [r[key] * scale for r in eval_rows]
            axes.plot(x, [r["train_loss"] for r in eval_rows], "o-", color="tab:green", label="train (evaluation)")
            axes.plot(x, [r["val_loss"] for r in eval_rows], "s-", color="tab:red", label="validation")
        axes.set_xlabel(label)
        axes.set_ylabel("cross-entropy loss (nats per token)")
        axes.grid(alpha=0.3)
        axes.legend()
    by_step.set_title("Loss against optimizer step")
    by_tokens.set_title("Loss against tokens seen")
    if bpc_rows:
        panels[2].plot([r["step"] for r in bpc_rows], [r["val_bits_per_char"] for r in bpc_rows], "s-",
                       color="tab:purple", label="validation")
        panels[2].set_xlabel("optimizer step")
        panels[2].set_ylabel("bits per character")
        panels[2].set_title("Validation loss per character (comparable across tokenizers)")
        panels[2].grid(alpha=0.3)
        panels[2].legend()
    return save(figure, path)


def loss_summary(eval_rows: list[dict]) -> str | None:
    """The last evaluation as one line: nats per token and, where recorded, bits per character."""
    if not eval_rows:
        return None
    last = eval_rows[-1]
    bpc = last.get("val_bits_per_char")
    return (f"step {last['step']}: val loss {last['val_loss']:.4f} nats/token"
            + ("" if bpc is None else f", {bpc:.3f} bits/char"))


# ----------------------------------------------------------------------------- attention

@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Every layer's attention weights for idx (1, T): (n_layers, H, T, T), rows sum to 1.

    Each layer's input (the output of ln1) is captured with a forward pre-hook while the model
    runs; the weights are then computed from it with the reference formula, in fp32.
    """
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in model.blocks]
    try:
        model.eval()
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for block, x in zip(model.blocks, inputs):
        B, T, C = x.shape
        H = model.config.n_heads
        q, k, _ = block.attn.qkv(x).float().split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)  # (B, H, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=1)
        layers.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)[0])  # (H, T, T)
    return torch.stack(layers).cpu()


def mean_attention_distance(weights: torch.Tensor) -> torch.Tensor:
    """(L, H, T, T) weights -> (L, H): sum_j w_ij (i - j), averaged over the queries i."""
    T = weights.shape[-1]
    position = torch.arange(T, dtype=weights.dtype)
    distance = (position[:, None] - position[None, :]).clamp(min=0)  # (T, T): how far back key j is from query i
    return (weights * distance).sum(-1).mean(-1)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    labels = []
    for token in ids:
        text = tokenizer.decode([token])
        labels.append({"\n": "\\n", " ": "␣", "\t": "\\t"}.get(text, text))
    return labels


def plot_attention_layer(weights: torch.Tensor, layer: int, labels: list[str], path: Path) -> Path:
    """One heatmap per head of layer `layer`; weights (L, H, T, T)."""
    heads, T = weights.shape[1], weights.shape[-1]
    columns = min(heads, 4)
    rows = math.ceil(heads / columns)
    panel = min(max(0.1 * T, 3.5), 7.0)  # inches: room for one token label per row up to TICK_LABEL_LIMIT
    figure = new_figure(panel * columns + 1.5, panel * rows + 0.8)
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for head in range(rows * columns):
        axes = grid[head // columns, head % columns]
        if head >= heads:
            axes.set_visible(False)
            continue
        # A square-root colour scale: weights spread over many keys are small but should stay visible.
        image = axes.imshow(weights[layer, head].numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                            interpolation="nearest")
        axes.set_title(f"head {head}")
        axes.set_xlabel("key position (attended to)")
        axes.set_ylabel("query position")
        if T <= TICK_LABEL_LIMIT:
            axes.set_xticks(range(T), labels, fontsize=6, rotation=90)
            axes.set_yticks(range(T), labels, fontsize=6)
    figure.colorbar(image, ax=grid.ravel().tolist(), label="attention weight (square-root scale)", shrink=0.8)
    figure.suptitle(f"Attention weights, layer {layer} ({T} prompt tokens; each row sums to 1)")
    return save(figure, path)


def plot_attention_distance(distance: torch.Tensor, path: Path) -> Path:
    """(L, H) mean attention distances as a grid with the value written in each cell."""
    layers, heads = distance.shape
    figure = new_figure(max(5.0, 0.9 * heads + 2.5), max(3.5, 0.6 * layers + 1.8))
    axes = figure.subplots()
    image = axes.imshow(distance.numpy(), cmap="magma", aspect="auto", interpolation="nearest")
    middle = (distance.max() + distance.min()).item() / 2
    for layer in range(layers):
        for head in range(heads):
            value = distance[layer, head].item()
            colour = "black" if value > middle else "white"  # readable on magma's bright and dark ends
            axes.text(head, layer, f"{value:.1f}", ha="center", va="center", fontsize=8, color=colour)
    axes.set_xticks(range(heads))
    axes.set_yticks(range(layers))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title("Mean attention distance per head\n(tokens back; small = local, large = long range)")
    figure.colorbar(image, ax=axes, label="mean distance (tokens)")
    return save(figure, path)


# ----------------------------------------------------------------------------- positions

def position_matrix(model: GPT) -> tuple[torch.Tensor, str]:
    """The model's position encoding (T, d_model) and a name for it."""
    config = model.config
    if config.pos_encoding == "learned":
        return model.position_embedding.weight.detach().float().cpu(), "learned position embeddings"
    return sinusoidal_positions(config.max_seq_len, config.d_model), "sinusoidal position encoding"


def plot_positions(table: torch.Tensor, name: str, path: Path) -> Path:
    """The encoding matrix (positions x dimensions) and its dot-product similarity (positions x positions)."""
    figure = new_figure(13, 5)
    matrix_axes, similarity_axes = figure.subplots(1, 2)
    limit = table.abs().max().item()
    image = matrix_axes.imshow(table.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                               interpolation="nearest")
    matrix_axes.set_xlabel("dimension")
    matrix_axes.set_ylabel("position")
    matrix_axes.set_title(f"{name[0].upper() + name[1:]} ({table.shape[0]} x {table.shape[1]})")
    figure.colorbar(image, ax=matrix_axes, label="value")
    similarity = table @ table.T  # (T, T)
    image = similarity_axes.imshow(similarity.numpy(), cmap="viridis", interpolation="nearest")
    similarity_axes.set_xlabel("position")
    similarity_axes.set_ylabel("position")
    similarity_axes.set_title("Dot-product similarity between positions")
    figure.colorbar(image, ax=similarity_axes, label="PE[i] · PE[j]")
    return save(figure, path)


# ----------------------------------------------------------------------------- CLI

def viz_prompt(prompt: str | None, tokenizer, model: GPT) -> list[int]:
    """The prompt's ids (the last max_seq_len of them).

    By default a Shakespeare line; where the vocabulary cannot spell it (another corpus, opaque
    ids), 48 tokens the model writes itself from token 0.
    """
    window = model.config.max_seq_len
    if prompt is not None:
        ids = tokenizer.encode(prompt)
        if not ids:
            raise UsageError("the prompt is empty")
        return ids[-window:]
    if tokenizer.kind in ("char", "byte", "bpe"):
        try:
            return tokenizer.encode(DEFAULT_PROMPT)[-window:]
        except UsageError:
            pass
    generator = torch.Generator().manual_seed(0)
    start = torch.zeros(1, 1, dtype=torch.long)
    return model.generate(start, 47, top_k=10, generator=generator)[0].tolist()[-window:]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m engine.viz", description="Draw a run's loss curves, attention and "
                            "position encodings as PNG files.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, metavar="DIR", help="run folder written by engine.train")
    source.add_argument("--checkpoint", type=Path, metavar="FILE", help="a checkpoint.pt file")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the run's plots/)")
    parser.add_argument("--prompt", default=None, help=f"text whose attention is drawn (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer whose heads get one heatmap each (default: the last; negative counts from the end)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = checkpoint_file(args.run, args.checkpoint)
    model, tokenizer, _ = load_model(path, "cpu")
    n_layers = model.config.n_layers
    layer = n_layers - 1 if args.layer is None else args.layer
    if not -n_layers <= layer < n_layers:
        raise UsageError(f"--layer must be in [{-n_layers}, {n_layers}) for this {n_layers}-layer model, got {layer}")
    layer %= n_layers
    out = args.out or path.parent / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror or exc}") from None

    written = []
    metrics = path.parent / "metrics.jsonl"
    train_rows, eval_rows = read_metrics(metrics) if metrics.is_file() else ([], [])
    if train_rows or eval_rows:
        written.append(plot_loss(train_rows, eval_rows, out / "loss.png"))
    else:
        print(f"no training metrics in {metrics}: skipping loss.png", file=sys.stderr)

    ids = viz_prompt(args.prompt, tokenizer, model)
    weights = attention_weights(model, torch.tensor([ids]))  # (L, H, T, T)
    labels = token_labels(tokenizer, ids)
    written.append(plot_attention_layer(weights, layer, labels, out / f"attention_layer{layer}.png"))
    written.append(plot_attention_distance(mean_attention_distance(weights), out / "attention_distance.png"))
    table, name = position_matrix(model)
    written.append(plot_positions(table, name, out / "positional_encoding.png"))
    for figure_path in written:
        print(figure_path)
    summary = loss_summary(eval_rows)
    if summary:  # on stderr, like the notes (stdout lists only the files written), once all of them are
        print(summary, file=sys.stderr)
    return 0


def entry_point(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry_point())
