"""Names users know: `engine.train --config FILE.toml` (and the config.toml a run writes), and
`engine.sample --max-new-tokens` (with --tokens as its older alias)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.config import config_toml
from engine.train import parse_args
from engine.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30
SMALL = {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 2, "max_seq_len": 32, "batch_size": 4,
         "eval_iters": 2, "sample_tokens": 0, "device": "cpu"}

pytestmark = pytest.mark.usefixtures("single_thread")


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config-corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_file_values_apply_and_the_command_line_overrides_them(tmp_path):
    config = write_toml(tmp_path / "run.toml", 'max_steps = 100\nmax-time = "15m"\nlr = 1\ncompile = true\n'
                                               'preset = "toy"\nd_model = 48\ndata = "corpus.txt"\n')
    args = parse_args(["--config", str(config), "--max-steps", "7", "--no-compile"])
    assert args.max_steps == 7 and args.compile is False  # the command line wins
    assert args.max_time == 900.0 and args.lr == 1.0 and isinstance(args.lr, float)
    assert args.preset == "toy" and args.d_model == 48 and args.data == "corpus.txt"
    assert args.batch_size is None  # neither given: the preset's value applies later


@pytest.mark.parametrize("text,expected", [
    ("max_stepz = 10\n", "unknown key 'max_stepz'"),
    ("[training]\nmax_steps = 10\n", "unknown key 'training'"),
    ("config = 'other.toml'\n", "unknown key 'config'"),
    ('max_steps = "ten"\n', "max_steps must be an integer, got 'ten'"),
    ("max_steps = 2.5\n", "max_steps must be an integer, got 2.5"),
    ("max_steps = true\n", "max_steps must be an integer, got True"),
    ("lr = false\n", "lr must be a number, got False"),
    ("max_time = [1]\n", "max_time must be a duration"),
    ("lr = 'fast'\n", "lr must be a number, got 'fast'"),
    ("compile = 1\n", "compile must be true or false, got 1"),
    ("preset = 'huge'\n", "preset must be one of toy, nanogpt-cpu, default, gpt2, got 'huge'"),
    ("max_time = 'soon'\n", "max_time must be a duration"),
    ("data = ['a', 'b']\n", "data must be a string, got ['a', 'b']"),
    ("max_steps = \n", "is not valid TOML"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, expected):
    config = write_toml(tmp_path / "bad.toml", text)
    with pytest.raises(UsageError) as caught:
        parse_args(["--config", str(config)])
    assert expected in str(caught.value) and str(config) in str(caught.value)


def test_bad_config_file_is_one_line_error_exit_2(tmp_path):
    config = write_toml(tmp_path / "bad.toml", "max_steps = 10\nwarmup = 5\n")
    result = subprocess.run([sys.executable, "-m", "engine.train", "--config", str(config), "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file {config}: unknown key 'warmup' (keys are the flags' names, " \
                                    "e.g. max_steps = 100; see --help)"
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="cannot read config file .*none.toml"):
        parse_args(["--config", str(tmp_path / "none.toml")])


def test_toml_writer_round_trips_through_tomllib():
    values = {"text": 'quote " backslash \\ newline \n tab \t é', "ratio": 1e-05, "big": 3e20, "count": 7,
              "flag": False, "unset": None, "negative": -0.5}
    parsed = tomllib.loads(config_toml({"section": values}))
    assert parsed == {k: v for k, v in values.items() if v is not None}


def test_run_writes_config_toml_that_reproduces_the_run(tmp_path, corpus, capsys):
    config = write_toml(tmp_path / "run.toml", "".join(f"{k} = {json.dumps(v)}\n" for k, v in SMALL.items())
                        + f'data = "{corpus}"\nmax_steps = 3\nlr = 0.002\n')
    first = tmp_path / "first"
    assert train_main(["--config", str(config), "--max-steps", "2", "--out", str(first)]) == 0
    printed = capsys.readouterr().out
    assert "resolved config" in printed and "max_steps = 2" in printed and "lr = 0.002" in printed
    saved = tomllib.loads((first / "config.toml").read_text())
    resolved = json.loads((first / "config.json").read_text())
    assert saved == {"preset": "toy"} | resolved["model"] | {k: v for k, v in resolved["train"].items()
                                                             if v is not None}
    # The saved file is itself a --config: the same flags give the same resolved config.
    second = tmp_path / "second"
    assert train_main(["--config", str(first / "config.toml"), "--out", str(second)]) == 0
    assert json.loads((second / "config.json").read_text()) == resolved


def test_sample_max_new_tokens_and_its_alias(tmp_path, corpus):
    from engine.sample import main as sample_main
    from engine.data import load_tokenizer

    run = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert train_main([*flags, "--data", str(corpus), "--max-steps", "1", "--out", str(run)]) == 0

    texts = []
    for flag in ("--max-new-tokens", "--tokens"):
        out = io.StringIO()
        assert sample_main(["--run", str(run), "--prompt", "To be", flag, "17", "--device", "cpu"], out=out) == 0
        texts.append(out.getvalue())
    assert texts[0] == texts[1]
    tokenizer = load_tokenizer(run / "tokenizer.json")
    assert len(tokenizer.encode(texts[0].removesuffix("\n"))) == len("To be") + 17  # characters: one id each
    for bad in ("0", "-3"):
        with pytest.raises(UsageError, match=f"--max-new-tokens must be a positive integer, got {bad}"):
            sample_main(["--run", str(run), "--max-new-tokens", bad])
