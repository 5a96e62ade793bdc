"""Which modules extract turns into LoRA modules, and where each one's weight lives in both checkpoints.

The output layout decides the unit of extraction: a layout that names Flux's fused `qkv` as one
module (kohya) gets one SVD of the fused weight; one that names `to_q`, `to_k`, `to_v` (diffusers)
gets one SVD per row block. The two checkpoints are located independently, so a diffusers folder
can be compared with a single file of the same model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..archs import BaseArchitecture, Targets
from ..archs.checkpoint import Weight, checkpoint_weights
from ..archs.locate import Location, locate
from ..errors import ExtractError
from ..formats import Layout
from ..io.source import TensorSource
from ..kinds.base import has_kernel


@dataclass(frozen=True)
class Selection:
    """Which modules to extract and at what rank (the cap, with a dynamic rule)."""

    rank: int
    conv_rank: int | None  # kxk convs (and the table's LoCon-only modules) only when given
    include: re.Pattern | None
    exclude: re.Pattern | None

    def wants(self, weight: Weight, kxk: bool) -> bool:
        """The default set (the table's LoRA targets, LoCon ones with --conv-rank), or with --include
        any module it matches; kxk convs only ever with --conv-rank; --exclude removes."""
        if self.exclude is not None and self.exclude.search(weight.name):
            return False
        if (kxk or weight.target == "conv") and self.conv_rank is None:
            return False
        if self.include is not None:
            return bool(self.include.search(weight.name))
        if weight.type == "embedding":  # only when asked for: their LoRA exists only in PEFT's layout
            return False
        return weight.target in ("default", "conv")


@dataclass(frozen=True)
class Job:
    """One output module: its canonical targets (row blocks in order) and their locations."""

    name: str  # the module's name in the output layout
    targets: Targets
    component: str | None
    type: str  # linear | conv | embedding
    base: tuple[Location, ...]
    tuned: tuple[Location, ...]
    rank: int  # the rank asked for (the cap, with --dynamic)
    dtype: str  # the tuned weight's stored dtype
    native_rows: bool  # the output layout names the module by its single-file path (its row order)
    swaps_rows: bool  # the module's single-file row order differs from the canonical one


def plan_jobs(
    arch: BaseArchitecture,
    base: TensorSource,
    tuned: TensorSource,
    layout: Layout,
    selection: Selection,
) -> list[Job]:
    """Jobs in the base checkpoint's key order, so both files are read front to back."""
    weights = [w for w in checkpoint_weights(arch, base) if selection.wants(w, _kxk(w, base))]
    if not weights:
        raise ExtractError(
            f"{base.path}: no module of {arch.name} matches the selection (see --include/--exclude; "
            "kxk convs need --conv-rank)"
        )
    selected = {w.name for w in weights}
    jobs: dict[str, Job] = {}
    for weight in weights:
        targets = _unit_targets(arch, layout, weight.name)
        name = layout.unit_name(arch, targets)
        if name is None or name in jobs:
            continue
        left_out = [t for t in targets if t not in selected]
        if left_out:
            raise ExtractError(
                f"{name}: {layout.name} writes {', '.join(targets)} as one fused module, so {left_out[0]} cannot "
                "be left out; select all of them, or use --to diffusers to extract them one by one"
            )
        if weight.type == "embedding" and layout.scheme != "peft":
            raise ExtractError(
                f"{weight.name}: an embedding's LoRA (lora_embedding_A/B) exists only in PEFT's layout; use --to peft"
            )
        base_at = _located(arch, base, targets, "BASE")
        tuned_at = _located(arch, tuned, targets, "TUNED")
        native_rows = layout.native_rows(arch, targets)
        if not arch.lists_modules:  # GPT-2's Conv1D storage is the family's fact, not a table's
            base_at = [replace(loc, transposed=weight.location.transposed) for loc in base_at]
            tuned_at = [replace(loc, transposed=weight.location.transposed) for loc in tuned_at]
        jobs[name] = Job(
            name=name,
            targets=targets,
            component=arch.component_of(targets[0]),
            type=weight.type,
            base=tuple(base_at),
            tuned=tuple(tuned_at),
            rank=_rank_for(weight, base, selection),
            dtype=tuned.info(tuned_at[0].key).dtype,
            native_rows=native_rows,
            swaps_rows=len(targets) == 1 and arch.swaps_rows(targets[0]),
        )
    return list(jobs.values())


def _unit_targets(arch: BaseArchitecture, layout: Layout, name: str) -> Targets:
    """The module alone when the layout names it, else its whole fused group."""
    if layout.unit_name(arch, (name,)) is not None:
        return (name,)
    group = arch.fused_group_of(name)
    if group is None or layout.unit_name(arch, group.parts) is None:
        raise ExtractError(f"{name}: the {layout.name} layout has no name for it")
    return group.parts


def _located(arch: BaseArchitecture, source: TensorSource, targets: Targets, which: str) -> list[Location]:
    found = locate(arch, targets, source, lambda key: source.info(key).shape)
    if found is None:
        missing = [t for t in targets if locate(arch, (t,), source, lambda key: source.info(key).shape) is None]
        raise ExtractError(f"{which} {source.path} has no weight for {missing[0]}; are both checkpoints of one model?")
    for location in found:
        for scale in _scale_keys(location.key):
            if scale in source:
                raise ExtractError(
                    f"{which} {location.key} is a scaled fp8 weight ({scale}); extracting from scaled fp8 "
                    "checkpoints is not supported (use the bf16/fp16 checkpoint)"
                )
        stored = source.info(location.key).shape
        if not location.fits_rows(stored[0]):
            raise ExtractError(
                f"{which} {location.key} is {list(stored)}, but its row blocks for {stored[1]} input features "
                f"add up to {location.fused_rows} rows"
            )
    return found


def _scale_keys(key: str) -> list[str]:
    """Where quantized checkpoints keep a weight's scale: ComfyUI's scaled fp8 (`scale_weight`) and
    HF's fp8 (`weight_scale`, `weight_scale_inv`)."""
    stem = key.removesuffix("weight")
    return [stem + "scale_weight", stem + "weight_scale", stem + "weight_scale_inv"]


def _kxk(weight: Weight, base: TensorSource) -> bool:
    shape = base.info(weight.location.key).shape
    return weight.type == "conv" and has_kernel(tuple(shape))


def _rank_for(weight: Weight, base: TensorSource, selection: Selection) -> int:
    kxk = _kxk(weight, base)
    return selection.conv_rank if kxk and selection.conv_rank is not None else selection.rank
