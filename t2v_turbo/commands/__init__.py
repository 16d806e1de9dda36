"""Subcommands of the `t2v-turbo` command that live in their own modules."""

import argparse


def error_text(error: Exception) -> str:
    """The message of an error for a command's `error:` line (a KeyError's str() is the repr of
    its message)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: argparse's error then names the flag ("argument --batch-size: ...")."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type for counts that may be 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value
