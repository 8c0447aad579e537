"""Corpora, tokenizers, the token cache and batches."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from engine.data import (
    ByteTokenizer,
    CharTokenizer,
    default_corpus_text,
    load_token_data,
    strip_play_markdown,
    tokenizer_from_dict,
)
from engine.errors import UsageError

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO_

**HAMLET**  
Who's there? _\\[Aside]_  
Stand, and unfold yourself.

**HORATIO**  
Friends to this ground.

_Exit_
"""


def test_strip_play_markdown_keeps_speakers_and_lines_only():
    assert strip_play_markdown(PLAY) == (
        "HAMLET:\nWho's there?\nStand, and unfold yourself.\n\nHORATIO:\nFriends to this ground.\n"
    )


@pytest.fixture(scope="module")
def shakespeare():
    return default_corpus_text()


def test_default_corpus_is_the_plays_as_plain_text(shakespeare):
    assert 4_000_000 < len(shakespeare) < 5_500_000
    assert "HAMLET:\n" in shakespeare and "To be, or not to be" in shakespeare
    for markup in ("**", "# ", "_["):
        assert markup not in shakespeare


def test_char_tokenizer_round_trip_and_unknown_character():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.vocab_size == 8
    assert tokenizer.decode(tokenizer.encode("low hello")) == "low hello"
    with pytest.raises(UsageError, match="character 'z' is not in the tokenizer's vocabulary"):
        tokenizer.encode("zoo")
    assert tokenizer_from_dict(tokenizer.to_dict()).chars == tokenizer.chars


def test_byte_tokenizer_handles_any_text():
    tokenizer = ByteTokenizer()
    text = "naïve — ünïcödé"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < 256


def test_text_file_split_is_deterministic_and_cached(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefghij" * 100)
    first = load_token_data(str(corpus))
    second = load_token_data(str(corpus))
    assert len(first.train) == 900 and len(first.val) == 100
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert isinstance(first.train, np.memmap)
    assert first.tokenizer.decode(first.val[:10]) == "abcdefghij"


def test_batches_are_shifted_windows(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(chr(ord("a") + i % 26) for i in range(3000)))
    data = load_token_data(str(corpus))
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, _ = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_folder_of_text_files(tmp_path):
    (tmp_path / "b.md").write_text("second file " * 50)
    (tmp_path / "a.txt").write_text("first file " * 50)
    (tmp_path / "skip.csv").write_text("not read")
    data = load_token_data(str(tmp_path))
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]))
    assert text.startswith("first file") and "second file" in text and "not read" not in text


def test_nanogpt_folder_with_meta(tmp_path):
    chars = sorted(set("hello world"))
    ids = np.array([chars.index(c) for c in "hello world" * 100], dtype=np.uint16)
    ids[:1000].tofile(tmp_path / "train.bin")
    ids[1000:].tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    data = load_token_data(str(tmp_path))
    assert data.tokenizer.vocab_size == len(chars)
    assert data.tokenizer.decode(data.train[:11]) == "hello world"
    assert len(data.val) == 100


def test_nanogpt_folder_without_meta_uses_gpt2_ids(tmp_path):
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    data = load_token_data(str(tmp_path))
    assert data.tokenizer.vocab_size == 50257 and data.tokenizer.kind == "ids"


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_meta_pickle_with_objects_is_refused(tmp_path, capsys):
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3, "itos": Exploit()}, f)
    with pytest.raises(UsageError, match="meta.pkl may hold only plain data"):
        load_token_data(str(tmp_path))
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"text\x00with\x00nul", "looks binary"),
    (b"caf\xe9 latin-1", r"is not UTF-8 text \(invalid byte at offset 3\)"),
])
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_token_data(str(path))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_token_data(str(tmp_path / "nope.txt"))
    with pytest.raises(UsageError, match="has no .txt or .md files"):
        load_token_data(str(tmp_path))


def test_truncated_bin_file(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x01\x00" * 50 + b"\x01")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(UsageError, match="train.bin is truncated"):
        load_token_data(str(tmp_path))


def test_corpus_shorter_than_a_sequence(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words here")
    data = load_token_data(str(path))
    with pytest.raises(UsageError, match="the train split has 18 tokens, fewer than one sequence of 65"):
        data.check_fits(64)
