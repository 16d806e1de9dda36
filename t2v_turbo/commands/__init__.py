"""Subcommands of the `t2v-turbo` command that live in their own modules."""
