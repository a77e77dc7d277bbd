"""The command line's own surface: every subcommand's --help states its defaults, flags are spelled alike."""

import argparse
import subprocess
import sys

import pytest

from sslens.cli import parser


def subcommands(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, parser) for every leaf subcommand, e.g. (("tokenizer", "train"), ...)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, p
    for sub in subs:
        for name, child in sub.choices.items():
            yield from subcommands(child, prefix + (name,))


COMMANDS = dict(subcommands(parser()))


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_every_help_shows_each_default(words):
    help_text = " ".join(COMMANDS[words].format_help().split())  # unwrapped
    for action in COMMANDS[words]._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.help:
            assert f"(default: {action.default})" in help_text or "(default:" in action.help, (words, action.dest)
        if action.option_strings and action.dest != "help":
            flag = action.option_strings[0]
            assert action.help, f"sslens {' '.join(words)} {flag} has no help"
            assert "-" not in flag.removeprefix("--"), f"{flag}: flags are spelled with underscores"


def test_vocab_size_is_spelled_like_every_other_flag_and_keeps_its_old_spelling(tmp_path):
    for flag in ("--vocab_size", "--vocab-size"):
        out = tmp_path / f"{flag}.json"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sslens",
                "tokenizer",
                "train",
                "--data",
                "synth:200",
                flag,
                "300",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert "trained a 300-token" in done.stdout
