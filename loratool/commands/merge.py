"""merge: bake LoRAs into a base checkpoint, streamed one tensor at a time.

The walk: open the base (headers only) -> read every LoRA and match its modules to base tensors
(headers only; every shape checked against the base) -> refuse modules that match nothing -> for
each base tensor in file order, copy its bytes unchanged, or load it, apply its updates in fp32 on
the device, check the result and cast it once -> rename the finished file or directory into place.
The next updated tensor is read while the current one is computed, so the disk and the device
work at the same time; memory holds a few tensors whatever the model size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MergeError, OutputError
from ..io.atomic import atomic_directory
from ..io.destination import check_destination, same_or_inside
from ..io.source import TensorSource, open_source
from ..merging.match import LoraMatch, open_lora
from ..merging.output import OutputPlan, copy_other_files, plan_output
from ..merging.scaled import scaled_weights
from ..merging.walk import MergeWalk
from ..ops.device import resolve_device
from ..progress import Progress
from ..strengths import lora_weights

DTYPE_CHOICES = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}


@dataclass
class LoraSummary:
    path: str
    strength: float
    format: str
    architecture: str | None
    modules: int
    matched: int
    unmatched: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class MergeReport:
    base: str
    dest: str
    device: str
    dtype: str
    loras: list[LoraSummary]
    tensors_updated: int  # base tensors the LoRAs changed
    tensors_copied: int  # written from the base's bytes unchanged
    tensors_cast: int  # untouched but converted to --dtype
    bytes_written: int
    files_written: int
    skipped: list[str] = field(default_factory=list)  # weight files of the base left out of the output

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["loras"] = [dict(s.__dict__) for s in self.loras]
        return data


def merge(
    base: str | os.PathLike,
    loras: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    allow_unmatched: bool = False,
    shard_size: int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Write `base` with each LoRA merged in at its weight (default 1.0; negative subtracts).

    The output mirrors the base (a file or a model directory, same keys, order, dtypes and shards);
    `dtype` is keep, fp32, fp16 or bf16; `shard_size` (bytes) re-shards a directory base. Raises
    `MergeError` (naming the module) for a LoRA module the base lacks, unless `allow_unmatched`,
    and for a result that is not finite or does not fit the output dtype; nothing is written then.
    """
    base_path, dest_path = Path(base), Path(dest)
    strengths = lora_weights(loras, weights, MergeError, "merge")
    if dtype not in DTYPE_CHOICES:
        raise MergeError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_CHOICES)}")
    torch_device = resolve_device(device)
    with open_source(base_path, allow_pickle) as source, ExitStack() as stack:
        if source.scratch and base_path.is_dir():
            raise MergeError(
                f"{base}: a model directory with pickle weights cannot be mirrored; "
                "save it with safetensors (save_pretrained(..., safe_serialization=True)) and merge that"
            )
        plan = plan_output(source, base_path, shard_size, DTYPE_CHOICES[dtype])
        _check_dest(base_path, [Path(p) for p in loras], dest_path, plan, force)
        matches = []
        for i, (path, strength) in enumerate(zip(loras, strengths, strict=True)):
            found = open_lora(path, i, strength, source, allow_pickle)
            stack.callback(found.adapter.close)
            matches.append(found)
        _check_unmatched(matches, source, allow_unmatched)
        scaled = {w: (s, source.load(s)) for w, s in scaled_weights(source).items()}
        walk = MergeWalk(plan, matches, torch_device, DTYPE_CHOICES[dtype], progress, scaled)
        if plan.single_file:
            walk.write_file(plan.sets[0].files[0], dest_path)
        else:
            with atomic_directory(dest_path, force) as tmp:
                copy_other_files(plan, tmp)
                for wset in plan.sets:
                    walk.write_set(wset, tmp)
    return MergeReport(
        base=str(base_path),
        dest=str(dest_path),
        device=str(torch_device),
        dtype=dtype,
        loras=[_summary(m) for m in matches],
        tensors_updated=walk.updated,
        tensors_copied=walk.copied,
        tensors_cast=walk.cast,
        bytes_written=walk.tally.bytes_done,
        files_written=walk.files,
        skipped=plan.skipped,
    )


def _check_dest(base: Path, loras: list[Path], dest: Path, plan: OutputPlan, force: bool) -> None:
    inputs = [base, *loras]
    check_destination(inputs, dest, force, directory=not plan.single_file)
    for src in [*(p for p in inputs if p.is_dir()), *([plan.root] if plan.root else [])]:
        if same_or_inside(dest, src):
            raise OutputError(f"{dest}: lies inside the input {src}; choose another output path")


def _check_unmatched(matches: list[LoraMatch], base: TensorSource, allow_unmatched: bool) -> None:
    for m in matches:
        if not m.matched and not m.patches:
            why = m.adapter.arch_reason if m.adapter.arch is None else f"a {m.adapter.arch.name} LoRA"
            raise MergeError(
                f"{m.path}: none of its {len(m.unmatched)} modules is in the base {base.path} ({why}); wrong base?"
            )
        if m.unmatched and not allow_unmatched:
            more = f" and {len(m.unmatched) - 1} more" if len(m.unmatched) > 1 else ""
            raise MergeError(
                f"{m.path}: module {m.unmatched[0]}{more} matches nothing in the base; "
                "pass --allow-unmatched to merge the rest"
            )


def _summary(m: LoraMatch) -> LoraSummary:
    arch = m.adapter.arch
    return LoraSummary(
        path=m.path,
        strength=m.strength,
        format=m.adapter.format,
        architecture=getattr(arch, "name", None),
        modules=len(m.adapter.modules),
        matched=len(m.matched),
        unmatched=list(m.unmatched),
        notes=list(m.notes),
    )
