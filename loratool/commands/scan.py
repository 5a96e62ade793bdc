"""`inspect` over a library: many paths and folders, one report (or one reason it failed) per file.

People keep thousands of LoRAs, and the tools that manage them scan whole folders: one bad file
must not stop the scan, and each file's answer must come as soon as it is known, not after the
last one.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import InputError, LoratoolError
from ..io.pickle_file import PICKLE_SUFFIXES
from ..io.source import DEFAULT_WEIGHT_NAMES, DIFFUSERS_INDEX, HF_CONFIG, PEFT_CONFIG, PICKLE_WEIGHT_NAMES
from ..progress import Progress
from .inspect import InspectReport, inspect


@dataclass
class Scanned:
    """One adapter's report, or why it could not be read. A scan given `render` carries the rendered
    `text` and the report's count of error-level findings instead of the report."""

    path: str
    report: InspectReport | None = None
    error: LoratoolError | None = None
    text: str | None = None
    error_findings: int = 0


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
    workers: int | None = None,
    render: Callable[[InspectReport], str] | None = None,
) -> Iterator[Scanned]:
    """Inspect every adapter the paths name (a library folder's, recursively), in order, yielding
    each result as it is done; a file that cannot be read yields its error and the scan goes on.

    A header-only scan of many files runs in `workers` processes (default: one per CPU core), the
    results still in order; it runs here when torch is already loaded (a fork would inherit its
    thread pools) or the files are few. `render` (a module-level function, so a worker can run it)
    turns each report into the text to print where it was made: a report costs more to send
    between processes than to render."""
    job = partial(
        _scan_one, base=base, allow_pickle=allow_pickle, header_only=header_only, progress=progress, render=render
    )
    items = _work(paths, allow_pickle)
    if not header_only or workers == 1 or "torch" in sys.modules:
        yield from map(job, items)
        return
    items = list(items)
    count = min(workers or os.cpu_count() or 1, len(items) // FILES_PER_WORKER)
    if count <= 1:
        yield from map(job, items)
        return
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("fork"))
    try:
        yield from pool.map(partial(job, progress=None), items, chunksize=CHUNK)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a reader that stopped early (`| head`) waits for nothing


FILES_PER_WORKER = 64  # fewer files than this per process: starting one costs more than it saves
CHUNK = 32  # files a worker takes at a time: results come back in batches, in order


def _work(paths: Iterable[str | os.PathLike], allow_pickle: bool) -> Iterator[Path | Scanned]:
    """The adapters to inspect, in order, and in their place the folders that hold none."""
    for given in paths:
        path = Path(given)
        found = list(adapters_in(path, allow_pickle)) if is_library(path) else [path]
        if not found:
            why = "no .safetensors LoRA files or PEFT adapter folders in this folder"
            yield Scanned(str(path), error=InputError(f"{path}: {why}"))
        yield from found


def _scan_one(
    item: Path | Scanned,
    base: str | os.PathLike | None,
    allow_pickle: bool,
    header_only: bool,
    progress: Progress | None,
    render: Callable[[InspectReport], str] | None,
) -> Scanned:
    if isinstance(item, Scanned):
        return item
    try:
        report = inspect(item, base, progress, allow_pickle, header_only)
    except LoratoolError as exc:
        return Scanned(str(item), error=exc)
    if render is not None:
        return Scanned(str(item), text=render(report), error_findings=report.count("error"))
    return Scanned(str(item), report=report)
