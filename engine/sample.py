"""`python -m engine.sample`: generate text from a trained run, streaming tokens as they come.

    python -m engine.sample --run runs/toy-20261127 --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 40

The run folder (or `--checkpoint FILE`) supplies the model, its config and its tokenizer. Generation
uses the model's KV cache (GPT.stream): the prompt is encoded once, then each new token costs one
position; `--no-cache` recomputes the whole context each step and gives the same tokens for the same
seed. Once the text outgrows the model's max_seq_len, the model sees the last max_seq_len tokens.

Tokenizers: a character run encodes only characters of its training corpus (any other is a one-line
error, exit status 2); a byte or BPE run encodes any text. A run whose tokens are opaque ids (a nanoGPT BPE
folder, or GPT-2 weights imported with engine.hf) takes its prompt as ids (`--prompt-ids "464 3290"`)
and prints ids, unless the run folder holds the Hugging Face tokenizer files that `engine.hf import`
copies (folder hf_tokenizer/) and transformers is installed: then prompts and output are text.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

from engine import ops
from engine.check import prepare_backends
from engine.checkpoint import CHECKPOINT_NAME, check_model_state, load_checkpoint
from engine.config import ArgumentParser, resolve_device, resolve_dtype
from engine.data import Tokenizer, tokenizer_from_dict
from engine.errors import UsageError, run_cli
from engine.model import GPT
from engine.ops.backend import DTYPES
from engine.train import model_config_of, warn_slow_dtype

HF_TOKENIZER_DIR = "hf_tokenizer"


def checkpoint_file(run: Path | None, checkpoint: Path | None) -> Path:
    """The checkpoint named by --run DIR or --checkpoint FILE, with a one-line error if it is not there."""
    if checkpoint is not None:
        if not checkpoint.exists():
            raise UsageError(f"checkpoint {checkpoint} does not exist")
        if checkpoint.is_dir():
            raise UsageError(f"--checkpoint takes a file; {checkpoint} is a folder (use --run {checkpoint})")
        return checkpoint
    if not run.exists():
        raise UsageError(f"run folder {run} does not exist")
    if not run.is_dir():
        raise UsageError(f"--run takes a folder; {run} is a file (use --checkpoint {run})")
    if not (run / CHECKPOINT_NAME).is_file():
        raise UsageError(f"{run} is not a run folder: it has no {CHECKPOINT_NAME} (train one with "
                         f"python -m engine.train --out {run})")
    return run / CHECKPOINT_NAME


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """A checkpoint file -> (model in eval mode on device, its tokenizer, the checkpoint dict)."""
    state = load_checkpoint(path)
    model = GPT(model_config_of(state, path))
    check_model_state(state["model"], model, f"checkpoint {path}")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer_from_dict(state["tokenizer"]), state


class HFTokenizer:
    """A Hugging Face tokenizer folder (e.g. GPT-2's BPE) behind the engine's encode/decode interface."""

    kind = "hf"

    def __init__(self, folder: Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UsageError(f"{folder} holds a Hugging Face tokenizer, which needs transformers "
                             "(pip install transformers); or give --prompt-ids to work with token ids") from None
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def text_tokenizer(tokenizer, run_folder: Path, use_ids: bool):
    """The run's tokenizer, or its Hugging Face tokenizer when its own tokens are opaque ids."""
    hf_folder = run_folder / HF_TOKENIZER_DIR
    if tokenizer.kind == "ids" and hf_folder.is_dir() and not use_ids:
        return HFTokenizer(hf_folder)
    return tokenizer


def prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(token) for token in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"--prompt-ids takes whitespace-separated integers, got {args.prompt_ids!r}") from None
    elif args.prompt is not None:
        if tokenizer.kind == "ids":
            raise UsageError("this run's tokens are opaque ids (no text tokenizer): give the prompt with --prompt-ids")
        ids = tokenizer.encode(args.prompt)
    elif tokenizer.kind == "char" and "\n" not in tokenizer.chars or tokenizer.kind == "ids":
        ids = [0]
    else:
        ids = tokenizer.encode("\n")
    if not ids:
        raise UsageError("the prompt is empty; give at least one character (or one id)")
    return ids


class StreamDecoder:
    """Turns a growing list of ids into text pieces to print as they come.

    It decodes everything so far and hands out what is new, holding back text that ends in an
    incomplete multi-byte character (U+FFFD) until the next token completes it.
    """

    def __init__(self, tokenizer, prompt: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt)
        self.emitted = len(tokenizer.decode(self.ids))

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m engine.sample", description="Generate text from a trained run.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, metavar="DIR",
                        help="run folder written by engine.train (or engine.hf import)")
    source.add_argument("--checkpoint", type=Path, metavar="FILE", help="a checkpoint.pt file")
    parser.add_argument("--prompt", default=None,
                        help="text to continue (default: a newline, or token 0 where the vocabulary has none)")
    parser.add_argument("--prompt-ids", default=None, metavar="IDS",
                        help="the prompt as token ids, e.g. '464 3290' (for runs whose tokens are opaque ids)")
    parser.add_argument("--max-new-tokens", "--tokens", dest="tokens", type=int, default=200, metavar="N",
                        help="tokens to generate (default: 200); --tokens is the older name")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="divides the logits; 0 is greedy, higher is more random (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the most likely tokens that together reach probability p (nucleus)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same text")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole context for every token instead of using the KV cache")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="'auto' (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), 'fp32', "
                             "'bf16' or 'fp16'")
    parser.add_argument("--backend", default="auto", help="kernel backend: auto, reference, torch, ...")
    parser.add_argument("--no-self-check", action="store_true",
                        help="do not check the chosen backends against reference on this device first")
    return parser


def check_sampling_args(args) -> None:
    if args.tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {args.tokens}")
    if not math.isfinite(args.temperature):
        raise UsageError(f"--temperature must be a finite number, got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    check_sampling_args(args)
    path = checkpoint_file(args.run, args.checkpoint)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    warn_slow_dtype(dtype, device)
    ops.set_backend(args.backend)
    model, tokenizer, _ = load_model(path, device)
    prepare_backends(model.config, device, dtype, self_check=not args.no_self_check, training=False,
                     decode=not args.no_cache)
    tokenizer = text_tokenizer(tokenizer, path.parent, use_ids=args.prompt_ids is not None)
    prompt = prompt_ids(args, tokenizer)
    vocab_size = model.config.vocab_size
    if max(prompt) >= vocab_size or min(prompt) < 0:
        raise UsageError(f"prompt token ids must be in [0, {vocab_size}), got {min(prompt)}..{max(prompt)}")

    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    decoder = StreamDecoder(tokenizer, prompt)
    out.write(tokenizer.decode(prompt))
    out.flush()
    with autocast:
        for token in model.stream(idx, args.tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, generator=generator, use_cache=not args.no_cache):
            out.write(decoder.feed(int(token[0, 0])))  # the one host sync per token: printing needs it
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    return 0


def entry_point(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry_point())
