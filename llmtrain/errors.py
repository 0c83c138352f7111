"""The one base of every error a user sees, and the exit status each kind ends a command with.

Every command (`llmtrain <command>`, `launch/*.py`) turns an `LlmtrainError` into one `error:` line
on stderr (printed once, by the launcher's rank 0) and exits with the error's `exit_code`, without
a traceback. Anything else is a bug and keeps its traceback. Exit statuses:

    0  done (for training: final/ is complete)
    2  the user's input: a recipe, an override, a file it names, the launch environment (ConfigError,
       DataError and their subclasses)
    3  preempted: checkpointed at a step boundary after SIGTERM/SIGUSR1 (train.signals.Preempted)
    4  too many consecutive non-finite steps (train.loop.NonFiniteError)
    5  storage: a checkpoint, universal copy or final/ could not be written (StorageError)

The builtin second base of ConfigError, DataError and StorageError (ValueError, RuntimeError) is
what they subclassed before this module existed, kept so that code catching those still does.
"""
from __future__ import annotations


class LlmtrainError(Exception):
    """A one-line error for the user; `exit_code` is the command's exit status."""

    exit_code = 2


class ConfigError(LlmtrainError, ValueError):
    """A user mistake in a recipe, an override or a file it names: printed as one line."""


class DataError(LlmtrainError, RuntimeError):
    """Unusable data: a missing source, too many bad rows, a prepared directory that does not fit."""


class StorageError(LlmtrainError, RuntimeError):
    """A checkpoint, universal copy or final/ could not be written (disk full, I/O error): one line, exit 5."""

    exit_code = 5
