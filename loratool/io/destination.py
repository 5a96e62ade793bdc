"""Where a command may write: never over one of its inputs, never over anything without --force."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputError


def check_destination(inputs: Iterable[Path], dest: Path, force: bool, directory: bool) -> None:
    """Refuse before any work: DEST is (or holds, or sits inside) an input, exists without
    `force`, is the wrong kind of thing, or has no parent directory."""
    inputs = list(inputs)
    if dest.exists() or dest.is_symlink():
        for src in inputs:
            if same_or_inside(dest, src) or same_or_inside(src, dest):
                raise OutputError(f"{dest}: is an input (or holds one); choose another output path")
        if not force:
            raise OutputError(f"{dest}: exists (use --force to replace it)")
        if dest.is_dir() != directory:
            want = "a directory" if directory else "a file"
            raise OutputError(f"{dest}: exists and is not {want}")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest.parent}: output directory does not exist")


def same_or_inside(a: Path, b: Path) -> bool:
    """Whether `a` is `b` or lies inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents
