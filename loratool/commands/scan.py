"""`inspect` over a library: many paths and folders, one report (or one reason it failed) per file.

People keep thousands of LoRAs, and the tools that manage them scan whole folders: one bad file
must not stop the scan, and each file's answer must come as soon as it is known, not after the
last one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, LoratoolError
from ..io.pickle_file import PICKLE_SUFFIXES
from ..io.source import DEFAULT_WEIGHT_NAMES, DIFFUSERS_INDEX, HF_CONFIG, PEFT_CONFIG, PICKLE_WEIGHT_NAMES
from ..progress import Progress
from .inspect import InspectReport, inspect


@dataclass
class Scanned:
    """One adapter's report, or why it could not be read."""

    path: str
    report: InspectReport | None = None
    error: LoratoolError | None = None


def is_library(path: str | os.PathLike) -> bool:
    """A folder of adapters rather than one adapter or model folder: no adapter or model config
    and none of the weight names such folders hold (`pytorch_lora_weights.safetensors`, ...)."""
    path = Path(path)
    if not path.is_dir():
        return False
    markers = (PEFT_CONFIG, DIFFUSERS_INDEX, HF_CONFIG, *DEFAULT_WEIGHT_NAMES, *PICKLE_WEIGHT_NAMES)
    return not any((path / name).exists() for name in markers) and not any(path.glob("*.index.json"))


def adapters_in(folder: Path, allow_pickle: bool = False) -> Iterator[Path]:
    """A library folder's adapters, found recursively in name order: `.safetensors` files (and
    pickles with `allow_pickle`) and PEFT adapter folders, whole; hidden entries skipped."""
    suffixes = (".safetensors", *(PICKLE_SUFFIXES if allow_pickle else ()))
    for here, dirs, files in os.walk(folder):
        adapters = [Path(here, f) for f in files if not f.startswith(".") and f.lower().endswith(suffixes)]
        walk_into = []
        for name in dirs:
            if name.startswith("."):
                continue
            if Path(here, name, PEFT_CONFIG).exists():
                adapters.append(Path(here, name))
            else:
                walk_into.append(name)
        dirs[:] = sorted(walk_into)
        yield from sorted(adapters)


def inspect_each(
    paths: Iterable[str | os.PathLike],
    base: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    header_only: bool = False,
    progress: Progress | None = None,
) -> Iterator[Scanned]:
    """Inspect every adapter the paths name (a library folder's, recursively), in order, yielding
    each result as it is done; a file that cannot be read yields its error and the scan goes on."""
    for given in paths:
        path = Path(given)
        found = adapters_in(path, allow_pickle) if is_library(path) else [path]
        empty = True
        for adapter in found:
            empty = False
            try:
                report = inspect(adapter, base, progress, allow_pickle, header_only)
            except LoratoolError as exc:
                yield Scanned(str(adapter), error=exc)
            else:
                yield Scanned(str(adapter), report=report)
        if empty:
            why = "no .safetensors LoRA files or PEFT adapter folders in this folder"
            yield Scanned(str(path), error=InputError(f"{path}: {why}"))
