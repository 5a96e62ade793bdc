"""One exception family for everything the tool refuses to do.

Library code raises these; the CLI turns each into a single line on stderr and the exit code the
class carries, so a user never sees a traceback for a problem with their input.
"""

from __future__ import annotations

EXIT_FINDINGS = 1
EXIT_UNUSABLE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (`| head`), as for any tool killed by SIGPIPE


class LoratoolError(Exception):
    """Base class: a problem we can explain in one line."""

    exit_code = EXIT_UNUSABLE

    def __init__(self, message: str) -> None:
        # Keep the message on one line whatever the caller interpolated into it.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class InputError(LoratoolError):
    """An input file or directory is missing, unreadable or not what it claims to be."""


class FormatError(InputError):
    """The file is readable but no layout we know explains it."""


class OutputError(LoratoolError):
    """The output path is unusable: exists without --force, is an input, or cannot be written."""


class ConversionError(LoratoolError):
    """The target layout cannot express part of the adapter; converting would lose it."""


class MergeError(LoratoolError):
    """A LoRA cannot be merged into this base: it does not fit, or the result would be broken."""


class ExtractError(LoratoolError):
    """A LoRA cannot be extracted as asked: the checkpoints differ in more than values, or the
    options ask for a rank that cannot be had."""


class ResizeError(LoratoolError):
    """A LoRA cannot be resized as asked: it holds what resize cannot cut (LoHa, DoRA), or the
    options ask for a rank that cannot be had."""


class MissingDependencyError(LoratoolError):
    """An option needs an optional package that is not installed (e.g. --plot needs matplotlib)."""


class FindingsError(LoratoolError):
    """Verification found error-level problems (for example `inspect --strict`)."""

    exit_code = EXIT_FINDINGS
