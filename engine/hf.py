"""GPT-2 checkpoint interchange with Hugging Face: `python -m engine.hf export|import`.

    python -m engine.hf export --run runs/gpt2-small --out hf/gpt2-small
    python -m engine.hf import hf/gpt2 --out runs/gpt2-imported [--data data/openwebtext] [--dropout 0.1]

export writes a Hugging Face GPT-2 folder, config.json and model.safetensors, that
`transformers.GPT2LMHeadModel.from_pretrained(folder)` loads. Only models with GPT-2's architecture
export: learned positions, biases, tied embeddings (the `gpt2` preset, or any config with
--pos-encoding learned --bias --tie-embeddings); GELU tanh maps to GPT-2's "gelu_new", exact GELU to
"gelu". The run's own tokenizer goes along as engine_tokenizer.json (transformers ignores it;
import restores it); a BPE tokenizer also as tokenizer.json and tokenizer_config.json, which
`AutoTokenizer.from_pretrained(folder)` loads.

import reads such a folder (for example GPT-2 weights downloaded from the Hugging Face hub) and writes
a run folder at step 0 whose checkpoint `python -m engine.train --resume RUN` continues training and
`python -m engine.sample --run RUN` samples. Weights are converted to fp32. GPT-2's BPE tokens are
opaque ids to the engine (engine.data.IdTokenizer): training them needs a nanoGPT folder of
GPT-2 token ids (train.bin/val.bin), given here as --data because a resumed run keeps its data;
the folder's Hugging Face tokenizer files are copied to RUN/hf_tokenizer, which engine.sample uses
for text prompts and output when transformers is installed (otherwise --prompt-ids).

Layout differences: GPT-2 stores its linear layers as Conv1D with weights (in, out), the transpose
of nn.Linear's (out, in), and fuses Q, K and V in c_attn exactly as the engine's qkv does.
Neither direction imports transformers; the safetensors package is needed for .safetensors files.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from engine.checkpoint import CHECKPOINT_NAME, load_failure, save_checkpoint
from engine.config import ArgumentParser
from engine.data import (BPE_SPECIAL_TOKENS, BpeTokenizer, IdTokenizer, is_nanogpt_folder, load_tokenizer,
                         save_tokenizer)
from engine.errors import UsageError, run_cli
from engine.model import GPT, GPTConfig
from engine.sample import HF_TOKENIZER_DIR, checkpoint_file, load_model
from engine.train import resolved_data_path
from engine.trainer import TrainConfig, make_optimizer

WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
ENGINE_TOKENIZER_NAME = "engine_tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
LAYER_NORM_EPS = 1e-5  # engine.ops.layer_norm's default, the eps every LayerNorm of the model uses
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# Hugging Face names for GELU's tanh approximation (same formula) and the exact form.
ENGINE_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                      "gelu": "gelu"}


def require_safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UsageError("reading and writing model.safetensors needs the safetensors package "
                         "(pip install safetensors)") from None
    return safetensors.torch


# ----------------------------------------------------------------------------- names and layouts

def weight_map(config: GPTConfig) -> list[tuple[str, str, bool]]:
    """(engine name, Hugging Face name, transposed) for every tensor of a GPT-2-shaped model.

    Hugging Face names carry GPT2LMHeadModel's "transformer." prefix; the LM head is the token
    embedding (tied), so it is not listed.
    """
    names = [("token_embedding.weight", "wte.weight", False), ("position_embedding.weight", "wpe.weight", False)]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        names += [
            (ours + "ln1.weight", theirs + "ln_1.weight", False), (ours + "ln1.bias", theirs + "ln_1.bias", False),
            (ours + "attn.qkv.weight", theirs + "attn.c_attn.weight", True),  # Conv1D (C, 3C) = Linear (3C, C)^T
            (ours + "attn.qkv.bias", theirs + "attn.c_attn.bias", False),
            (ours + "attn.proj.weight", theirs + "attn.c_proj.weight", True),
            (ours + "attn.proj.bias", theirs + "attn.c_proj.bias", False),
            (ours + "ln2.weight", theirs + "ln_2.weight", False), (ours + "ln2.bias", theirs + "ln_2.bias", False),
            (ours + "ffn.fc1.weight", theirs + "mlp.c_fc.weight", True),  # Conv1D (C, d_ff)
            (ours + "ffn.fc1.bias", theirs + "mlp.c_fc.bias", False),
            (ours + "ffn.fc2.weight", theirs + "mlp.c_proj.weight", True),  # Conv1D (d_ff, C)
            (ours + "ffn.fc2.bias", theirs + "mlp.c_proj.bias", False),
        ]
    names += [("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False)]
    return [(ours, "transformer." + theirs, transposed) for ours, theirs, transposed in names]


def check_gpt2_shaped(config: GPTConfig) -> None:
    """Raise UsageError naming every way the config differs from GPT-2's architecture."""
    problems = []
    if config.pos_encoding != "learned":
        problems.append(f"pos_encoding is {config.pos_encoding!r} (GPT-2 learns its positions: 'learned')")
    if not config.bias:
        problems.append("bias is off (GPT-2 has biases in every linear layer and LayerNorm)")
    if not config.tie_embeddings:
        problems.append("tie_embeddings is off (GPT-2's LM head is its token embedding)")
    if problems:
        raise UsageError("this model does not have GPT-2's architecture, so it cannot be exported to a "
                         "Hugging Face GPT-2 folder: " + "; ".join(problems))


def hf_config(config: GPTConfig, vocab_size: int | None = None) -> dict:
    """The config.json of a Hugging Face GPT-2 model with this architecture (and vocab_size words,
    default the config's: see export_run for a padded vocabulary)."""
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    end_of_text = 50256 if vocab_size == 50257 else None  # GPT-2's <|endoftext|>; none otherwise
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": config.max_seq_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": HF_ACTIVATIONS[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "dtype": "float32",
    }


def engine_config(hf: dict, dropout: float) -> GPTConfig:
    """A Hugging Face GPT-2 config.json -> GPTConfig; anything the engine cannot reproduce is refused."""
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, only 'gpt2' imports")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ENGINE_ACTIVATIONS:
        problems.append(f"activation_function {activation!r} (supported: {', '.join(ENGINE_ACTIVATIONS)})")
    if abs(hf.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon is {hf.get('layer_norm_epsilon')} (the engine's LayerNorm uses 1e-5)")
    for name, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if hf.get(name, supported) != supported:
            problems.append(f"{name} is {hf.get(name)!r} (the engine supports {supported})")
    if problems:
        raise UsageError("cannot import this Hugging Face model: " + "; ".join(problems))
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"], n_layers=hf["n_layer"], max_seq_len=hf["n_positions"],
            dropout=dropout, pos_encoding="learned", bias=True, tie_embeddings=True,
            activation=ENGINE_ACTIVATIONS[activation],
        )
    except KeyError as exc:
        raise UsageError(f"the Hugging Face config.json lacks {exc.args[0]!r}") from None


def to_hf_tensors(model: GPT, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layouts (contiguous fp32 copies), the
    token embedding cut to its first vocab_size rows when given (a padded vocabulary's real words)."""
    state = model.state_dict()
    if vocab_size is not None:
        state["token_embedding.weight"] = state["token_embedding.weight"][:vocab_size]
    return {theirs: (state[ours].t() if transposed else state[ours]).float().contiguous().clone()
            for ours, theirs, transposed in weight_map(model.config)}


def from_hf_tensors(tensors: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the "transformer." prefix) -> a state dict for GPT(config)."""
    tensors = {name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name: tensor
               for name, tensor in tensors.items()}
    # Causal-mask buffers that older transformers versions saved with the weights; the engine has none.
    tensors = {name: tensor for name, tensor in tensors.items()
               if not name.endswith((".attn.bias", ".attn.masked_bias"))}
    mapping = weight_map(config)
    missing = [theirs for _, theirs, _ in mapping if theirs not in tensors]
    unexpected = sorted(set(tensors) - {theirs for _, theirs, _ in mapping} - {"lm_head.weight"})
    if missing or unexpected:
        raise UsageError(f"the weights do not match the config.json's GPT-2 shape: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}")
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    for ours, theirs, transposed in mapping:  # Conv1D layers hold the transpose of the engine's Linear
        shape = tuple(reversed(expected[ours].shape)) if transposed else tuple(expected[ours].shape)
        if tuple(tensors[theirs].shape) != shape:
            raise UsageError(f"the weights do not match the config.json: {theirs} has shape "
                             f"{tuple(tensors[theirs].shape)}, the config.json gives {shape}")
    if "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"]):
        raise UsageError("lm_head.weight differs from the token embedding: untied GPT-2 heads are not supported")
    state = {}
    for ours, theirs, transposed in mapping:
        tensor = tensors[theirs].float()
        state[ours] = tensor.t().contiguous() if transposed else tensor
    state["lm_head.weight"] = state["token_embedding.weight"]
    return state


# ----------------------------------------------------------------------------- export / import

def export_run(checkpoint: Path, out_dir: Path) -> Path:
    """Write the run's model as a Hugging Face GPT-2 folder; returns the folder."""
    safetensors_torch = require_safetensors()
    model, tokenizer, _ = load_model(checkpoint, "cpu")
    check_gpt2_shaped(model.config)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a folder")
    if (out_dir / WEIGHTS_NAME).exists() or (out_dir / "config.json").exists():
        raise UsageError(f"{out_dir} already holds a model; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    # A vocabulary padded past the tokenizer's (the gpt2 preset's 50304, --vocab-size) exports the
    # tokenizer's words only: the padding rows are never a target, and transformers' GPT-2 then gives
    # the same logits for every real word. An import keeps the vocabulary it reads: padding it would
    # add words with logit 0 to a tied head, changing GPT-2's distribution.
    vocab_size = min(model.config.vocab_size, tokenizer.vocab_size)
    safetensors_torch.save_file(to_hf_tensors(model, vocab_size), str(out_dir / WEIGHTS_NAME),
                                metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.config, vocab_size), indent=2) + "\n")
    save_tokenizer(tokenizer, out_dir / ENGINE_TOKENIZER_NAME)
    if isinstance(tokenizer, BpeTokenizer):  # a standard tokenizer: AutoTokenizer.from_pretrained(out_dir) loads it
        save_tokenizer(tokenizer, out_dir / "tokenizer.json")
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.max_seq_len,
                            "bos_token": BPE_SPECIAL_TOKENS[0], "eos_token": BPE_SPECIAL_TOKENS[0]}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


def read_hf_folder(folder: Path, dropout: float) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A Hugging Face GPT-2 folder -> (GPTConfig, engine state dict)."""
    if not folder.exists():
        raise UsageError(f"Hugging Face folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file; give the Hugging Face model folder (config.json + {WEIGHTS_NAME})")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {folder / 'config.json'}: {exc}") from None
    if not isinstance(hf, dict) or "model_type" not in hf:
        hint = " (it is an engine run: export it with python -m engine.hf export --run)" if (
            folder / "checkpoint.pt").is_file() else ""
        raise UsageError(f"{folder / 'config.json'} is not a Hugging Face model config: it has no model_type{hint}")
    config = engine_config(hf, dropout)
    if (folder / WEIGHTS_NAME).is_file():
        try:
            tensors = require_safetensors().load_file(str(folder / WEIGHTS_NAME))
        except Exception as exc:  # noqa: BLE001 - any unreadable weights file is the same user error
            raise UsageError(f"cannot read {folder / WEIGHTS_NAME}: {exc}") from None
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        try:
            tensors = torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(load_failure(folder / LEGACY_WEIGHTS_NAME, exc)) from None
    elif (folder / f"{WEIGHTS_NAME}.index.json").is_file():
        raise UsageError(f"{folder} holds a sharded checkpoint; only a single {WEIGHTS_NAME} imports")
    else:
        raise UsageError(f"{folder} has no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME})")
    return config, from_hf_tensors(tensors, config)


def make_run_folder(out_dir: Path) -> None:
    """Create the run folder for an import; never overwrite another run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a folder")
    if (out_dir / CHECKPOINT_NAME).exists():
        raise UsageError(f"{out_dir} already holds a run; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run folder {out_dir}: {exc.strerror or exc}") from None


def import_folder(folder: Path, out_dir: Path, data: str | None = None, dropout: float = 0.0) -> Path:
    """Write a run folder (step 0) holding the Hugging Face model; returns the folder."""
    config, state = read_hf_folder(folder, dropout)
    engine_tokenizer = folder / ENGINE_TOKENIZER_NAME
    tokenizer = load_tokenizer(engine_tokenizer) if engine_tokenizer.is_file() else IdTokenizer(config.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise UsageError(f"{engine_tokenizer} has {tokenizer.vocab_size} tokens, "
                         f"more than the model's {config.vocab_size}")
    if tokenizer.kind == "ids" and data is not None and not is_nanogpt_folder(data):
        raise UsageError(f"--data {data} is not a nanoGPT folder (train.bin/val.bin): this model's tokens are "
                         "GPT-2 BPE ids, so it trains on token ids, not on text")
    kind = tokenizer.kind if tokenizer.kind in ("char", "byte", "bpe") else "char"
    train_config = TrainConfig(data=resolved_data_path(data), tokenizer=kind)
    model = GPT(config)
    model.load_state_dict(state)
    make_run_folder(out_dir)
    save_checkpoint({
        "model": model.state_dict(),
        "optimizer": make_optimizer(model, train_config, torch.device("cpu")).state_dict(),
        "step": 0,
        "tokens_seen": 0,
        "elapsed": 0.0,
        "model_config": config.to_dict(),
        "train_config": train_config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "data_source": f"imported from {folder}",
        "rng": {"torch": torch.get_rng_state(), "data": torch.Generator().manual_seed(train_config.seed).get_state()},
    }, out_dir / CHECKPOINT_NAME)
    config_json = {"model": config.to_dict(), "train": train_config.to_dict(), "imported_from": str(folder)}
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    save_tokenizer(tokenizer, out_dir / "tokenizer.json")
    tokenizer_files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if tokenizer.kind == "ids" and tokenizer_files:
        (out_dir / HF_TOKENIZER_DIR).mkdir(exist_ok=True)
        for path in tokenizer_files:
            shutil.copy2(path, out_dir / HF_TOKENIZER_DIR / path.name)
    return out_dir


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m engine.hf",
                            description="Move GPT-2-shaped models to and from the Hugging Face format.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    export = commands.add_parser("export", help="write a run's model as a Hugging Face GPT-2 folder")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, metavar="DIR", help="run folder written by engine.train")
    source.add_argument("--checkpoint", type=Path, metavar="FILE", help="a checkpoint.pt file")
    export.add_argument("--out", type=Path, required=True, metavar="HFDIR",
                        help="folder to write (must not hold a model)")
    importer = commands.add_parser("import", help="make a run folder from a Hugging Face GPT-2 folder")
    importer.add_argument("folder", type=Path, metavar="HFDIR", help="folder with config.json and model.safetensors")
    importer.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder to create")
    importer.add_argument("--data", default=None,
                          help="the data later training uses (a resumed run keeps it): for GPT-2 BPE weights a "
                               "nanoGPT folder of token ids (train.bin/val.bin)")
    importer.add_argument("--dropout", type=float, default=0.0,
                          help="dropout for further training (GPT-2 was trained with 0.1; default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        out = export_run(checkpoint_file(args.run, args.checkpoint), args.out)
        print(f"wrote {out / 'config.json'} and {out / WEIGHTS_NAME}; load with "
              f"transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    else:
        out = import_folder(args.folder, args.out, args.data, args.dropout)
        print(f"wrote run {out} at step 0: sample with python -m engine.sample --run {out}, "
              f"train on with python -m engine.train --resume {out}")
    return 0


def entry_point(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry_point())
