"""Subcommands of the `t2v-turbo` command that live in their own modules."""


def error_text(error: Exception) -> str:
    """The message of an error for a command's `error:` line (a KeyError's str() is the repr of
    its message)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
