"""The merged checkpoint mirrors its base: same files, keys, order, dtypes, shards and metadata.

A single-file base becomes a single file. A model directory (HF transformers, with or without
shards; a diffusers pipeline folder) becomes a directory: every weight set is rewritten under the
same relative name, and every other file (configs, tokenizers, scheduler) is copied, so the result
loads wherever the base did. `--shard-size` re-shards each weight set HF-style instead.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, MergeError
from ..io.safetensors_file import FLOAT_DTYPES, SafetensorsFile
from ..io.source import TensorSource, weights_in
from ..io.writer import TensorSpec, shard_plan
from .scaled import quantization_keys, scaled_weights

INDEX_SUFFIX = ".safetensors.index.json"
# Weights in another format or variant would be stale copies of the unmerged base in the output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")


@dataclass
class Entry:
    key: str  # key in the base source (diffusers folders prefix the component)
    file: SafetensorsFile
    name: str  # name inside the file, kept in the output


@dataclass
class OutFile:
    name: str  # relative to the weight set's directory
    entries: list[Entry]
    metadata: dict[str, str]


@dataclass
class WeightSet:
    """One state dict: a single file, or shards named by an index."""

    directory: str  # relative to the output root ("" for the root or a single-file output)
    files: list[OutFile]
    index: str | None = None  # index file name when sharded
    index_metadata: dict[str, object] = field(default_factory=dict)  # the base index's, minus total_size


@dataclass
class OutputPlan:
    root: Path | None  # the base directory; None for a single-file base
    sets: list[WeightSet]
    skipped: list[str] = field(default_factory=list)  # weight files left out of a directory output

    @property
    def single_file(self) -> bool:
        return self.root is None


def output_dtype(stored: str, wanted: str | None) -> str:
    """`--dtype` applies to floating-point tensors; integer buffers keep theirs."""
    return wanted if wanted and stored in FLOAT_DTYPES else stored


def plan_output(source: TensorSource, base: Path, shard_size: int | None, dtype: str | None = None) -> OutputPlan:
    """The output's files and entries. With `dtype`, scaled fp8 weights are written dequantized, so
    their scales and the format's marker are left out."""
    root = _root(source, base)
    dropped = quantization_keys(source, scaled_weights(source)) if dtype else set()
    by_file = _entries_by_file(source, dropped)
    if root is None:
        if shard_size is not None:
            raise MergeError(
                f"{base}: --shard-size applies to model directories; a single-file base is written as one file"
            )
        only = source.files[0]
        return OutputPlan(None, [WeightSet("", [_out_file(only, by_file[id(only)])])])
    sets = []
    by_dir: dict[Path, list[SafetensorsFile]] = {}
    for f in source.files:
        by_dir.setdefault(f.path.parent, []).append(f)
    for directory, files in by_dir.items():
        weights = weights_in(directory)
        rel = directory.relative_to(root).as_posix() if directory != root else ""
        outs = [_out_file(f, by_file[id(f)]) for f in files]
        index = weights.name if weights is not None and weights.name.endswith(INDEX_SUFFIX) else None
        index_metadata = _index_metadata(directory / index) if index else {}
        wset = WeightSet(rel, outs, index, index_metadata)
        sets.append(_reshard(wset, shard_size, dtype) if shard_size is not None else wset)
    return OutputPlan(root, sets, _skipped(root, sets))


def _root(source: TensorSource, base: Path) -> Path | None:
    if base.is_dir():
        return base
    if source.container == "sharded":
        return base.parent  # the index file was named: its directory is the model
    return None


def _entries_by_file(source: TensorSource, dropped: set[str]) -> dict[int, list[Entry]]:
    """The source's tensors (but `dropped`) grouped by the file that holds them, in one pass over the keys."""
    grouped: dict[int, list[Entry]] = {id(f): [] for f in source.files}
    for key in source:
        if key in dropped:
            continue
        ref = source.ref(key)
        grouped[id(ref.file)].append(Entry(key, ref.file, ref.name))
    return grouped


def _out_file(f: SafetensorsFile, entries: list[Entry]) -> OutFile:
    # File order: streaming reads each file front to back.
    ordered = sorted(entries, key=lambda e: f.info(e.name).begin)
    return OutFile(f.path.name, ordered, dict(f.metadata))


def _index_metadata(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable shard index ({type(exc).__name__})") from None
    meta = data.get("metadata") if isinstance(data, dict) else None
    return {k: v for k, v in (meta or {}).items() if k != "total_size"}


def _reshard(wset: WeightSet, shard_size: int, dtype: str | None) -> WeightSet:
    entries = [e for f in wset.files for e in f.entries]
    first = wset.files[0]
    stem = (wset.index or first.name).removesuffix(INDEX_SUFFIX).removesuffix(".safetensors")
    specs = [
        TensorSpec(e.name, output_dtype(e.file.info(e.name).dtype, dtype), e.file.info(e.name).shape) for e in entries
    ]
    shards = shard_plan(specs, shard_size, stem)
    if len(shards) == 1:
        return WeightSet(wset.directory, [OutFile(f"{stem}.safetensors", entries, first.metadata)])
    by_name = {e.name: e for e in entries}
    files = [OutFile(name, [by_name[s.name] for s in group], first.metadata) for name, group in shards]
    return WeightSet(wset.directory, files, f"{stem}{INDEX_SUFFIX}", wset.index_metadata)


def _skipped(root: Path, sets: list[WeightSet]) -> list[str]:
    """Weight files of the base that no weight set reads (other variants or formats)."""
    used = set()
    for wset in sets:
        for f in wset.files:
            for e in f.entries:
                used.add(e.file.path.resolve())
    skipped = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() in used or path.name.endswith(INDEX_SUFFIX):
            continue
        if path.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(path.relative_to(root).as_posix())
    return skipped


def copy_other_files(plan: OutputPlan, dest: Path) -> None:
    """Configs, tokenizers, schedulers: everything in the base directory that is not a weight file."""
    assert plan.root is not None
    for path in sorted(plan.root.rglob("*")):
        if not path.is_file() or path.name.endswith(INDEX_SUFFIX) or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        rel = path.relative_to(plan.root)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
