"""Which base tensors each LoRA module updates, decided from headers before any data is read.

A module becomes one `Patch` per base tensor it touches: a whole weight, a row block of a fused
weight (OpenCLIP `in_proj_weight`, Flux `qkv`/`linear1`), or rows of its update spread over several
weights (a fused kohya module merged into a diffusers folder). Every shape is checked against the
base's own header here, so a merge that would fail part-way fails before it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from ..adapter import Adapter, AdapterModule, refuse_unusable
from ..archs import BaseArchitecture
from ..archs.locate import Location, hf_keys, locate
from ..errors import MergeError
from ..formats import read_adapter
from ..formats.peft import saved_parameter
from ..io.source import TensorSource
from ..kinds.base import ANY
from ..ops.fuse import halves_differ
from .scaled import refuse_other_quantization


@dataclass(frozen=True)
class Patch:
    lora: int  # position of the LoRA on the command line
    module: AdapterModule | None  # None for role "replace"
    key: str  # base tensor updated
    rows: tuple[int, int] | None  # row block of the base tensor (in the update's orientation)
    up_rows: tuple[int, int] | None  # rows of the module's update that land there (None: all)
    transposed: bool  # base stores the weight (in, out)
    swap_halves: bool  # the update's rows and the base's are in different orders (ops.fuse.halves_differ)
    role: str = "weight"  # weight | bias (lora_B.bias) | replace (a full weight saved with the adapter)
    replacement: str | None = None  # adapter key of the full weight, for role "replace"
    widen: tuple[int, ...] | None = None  # the base weight's new shape: zero columns added (Flux img_in)

    @property
    def name(self) -> str:
        return self.module.name if self.module is not None else str(self.replacement)


@dataclass
class LoraMatch:
    path: str
    adapter: Adapter
    strength: float
    patches: list[Patch] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)  # module names as the file writes them
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def open_lora(
    path: str | os.PathLike, lora: int, strength: float, base: TensorSource, allow_pickle: bool = False
) -> LoraMatch:
    """Read a LoRA and match it to `base`; names several architectures share are settled by the base."""
    adapter, detection = read_adapter(path, allow_pickle=allow_pickle)
    try:
        refuse_unusable(adapter, detection.unexplained, MergeError, "merging would ignore them", False)
        if adapter.arch is None:
            adapter.place_on_base(base, MergeError)
        best = match(adapter, lora, strength, base)
        for other in adapter.arch_tied:
            if adapter.arch is None or other == adapter.arch.name:
                continue
            alt, _ = read_adapter(path, other, allow_pickle)
            try:
                candidate = match(alt, lora, strength, base)
            except MergeError:  # the other reading does not fit this base at all: keep the first
                alt.close()
                continue
            if len(candidate.matched) > len(best.matched):
                best.adapter.close()
                best = candidate
            else:
                alt.close()
    except BaseException:
        adapter.close()
        raise
    return best


def match(adapter: Adapter, lora: int, strength: float, base: TensorSource) -> LoraMatch:
    for key in adapter.tokens:
        raise MergeError(
            f"{key}: a textual-inversion token embedding; a merged checkpoint has no place for it "
            "(convert --to kohya keeps it as bundle_emb)"
        )
    found = LoraMatch(str(adapter.source.path), adapter, strength)
    # Saved full weights stand in for the base's before any update is added to them.
    found.patches.extend(_replacement(adapter, key, lora, base) for key in adapter.extra_keys)
    arch = adapter.arch
    for module in adapter.modules.values():
        if strength < 0 and not module.kind.negative_strength:
            raise MergeError(
                f"{module.name}: {module.kind.label} rotates the weight; a negative strength ({strength:g}) "
                "neither undoes the rotation nor rotates back"
            )
        locations = None
        if arch is not None and module.targets:
            locations = locate(arch, module.targets, base, lambda key: base.info(key).shape)
        if locations is None:
            found.unmatched.append(module.name)
            continue
        patches = _patches(arch, module, locations, lora, base)
        found.patches.extend(patches)
        found.matched.append(module.name)
        for p in patches:
            if p.widen is not None:
                found.notes.append(
                    f"{p.key}: widened from {list(base.info(p.key).shape)} to {list(p.widen)} with zero columns for "
                    f"the channels {module.name} adds (a control or fill LoRA), as ComfyUI does"
                )
    return found


def _patches(
    arch: BaseArchitecture, module: AdapterModule, locations: list[Location], lora: int, base: TensorSource
) -> list[Patch]:
    update = module.kind.weight_shape(module.shapes)  # (out, in[, kh, kw]) of the whole module
    patches = []
    start = 0
    for target, location in zip(module.targets, locations, strict=True):
        transposed = module.transposed or location.transposed
        stored = base.info(location.key).shape
        refuse_other_quantization(location.key, base)
        if transposed and len(stored) != 2:
            raise MergeError(
                f"{module.name}: expects a 2-D weight stored (in, out), but {location.key} is {list(stored)}"
            )
        if not location.fits_rows(stored[0]):
            raise MergeError(
                f"{module.name}: {location.key} is {list(stored)} in the base, but its row blocks for "
                f"{stored[1]} input features add up to {location.fused_rows} rows"
            )
        oriented = (stored[1], stored[0]) if transposed else stored
        rows = location.rows[1] - location.rows[0] if location.rows else oriented[0]
        if len(module.targets) > 1 and module.kind.whole_weight:
            raise MergeError(
                f"{module.name}: {module.kind.label} transforms its whole weight at once, and the base stores "
                f"{', '.join(module.targets)} as separate weights"
            )
        if len(module.targets) > 1 and module.dora_columns:
            raise MergeError(
                f"{module.name}: its DoRA magnitude normalizes input columns across {', '.join(module.targets)}, "
                "which the base stores as separate weights"
            )
        want = (rows, *oriented[1:])
        got = (rows, *update[1:])
        if len(got) == 2 and len(want) > 2 and ANY not in got:  # LoHa/LoKr without Tucker fold the kernel into `in`
            want = (want[0], math.prod(want[1:]))
        widen = None
        if len(module.targets) == 1 and arch.widens(target) and len(want) == len(got) == 2 and got[1] > want[1]:
            widen = (want[0], got[1]) if not transposed and got[0] == want[0] else None
            if widen is not None and base.container == "diffusers":
                raise MergeError(
                    f"{module.name}: widens {location.key} from {want[1]} to {got[1]} input channels, which a "
                    "diffusers folder's config.json would also have to say (in_channels); merge into the single file"
                )
        if widen is None and not _fits(want, got):
            where = location.key + (f" rows {location.rows[0]}:{location.rows[1]}" if location.rows else "")
            raise MergeError(
                f"{module.name}: its update is {list(_squeezed((update[0], *update[1:])))} but {where} "
                f"is {list(_squeezed(want))} in the base"
            )
        up_rows = None if len(module.targets) == 1 else (start, start + rows)
        swap = halves_differ(arch.swaps_rows(target), module.native_rows, location.native_rows)
        patch = Patch(lora, module, location.key, location.rows, up_rows, transposed, swap, widen=widen)
        if module.kind.name not in ("full", "norm") or "diff" in module.keys:  # not a bias difference alone
            patches.append(patch)
        if "bias" in module.keys:
            patches.append(_bias_patch(patch, base))
        start += rows
    if update[0] != ANY and start != update[0]:
        raise MergeError(f"{module.name}: its update has {update[0]} rows but the base weights it maps to have {start}")
    return patches


def _fits(want: tuple[int, ...], got: tuple[int, ...]) -> bool:
    """Whether an update of shape `got` fits a base weight of shape `want`; `ANY` matches anything."""
    if ANY in got:
        return all(g == ANY or (i < len(want) and want[i] == g) for i, g in enumerate(got))
    return _squeezed(want) == _squeezed(got)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1 conv and a linear layer hold the same matrix (SD1 proj_in, SD2 LoRAs saved as convs)."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _bias_patch(patch: Patch, base: TensorSource) -> Patch:
    key = patch.key
    stem = key[: -len("weight")] if key.endswith("weight") else None
    bias = stem + "bias" if stem is not None else None
    if bias is None or bias not in base:
        raise MergeError(f"{patch.name}: has lora_B.bias but the base has no bias for {key}")
    return replace(patch, key=bias, transposed=False, role="bias", widen=None)


def _replacement(adapter: Adapter, key: str, lora: int, base: TensorSource) -> Patch:
    """PEFT saves modules_to_save (and resized embeddings) as full weights; merge_and_unload puts them in."""
    what = adapter.extra_keys[key]
    path = saved_parameter(key)
    target = next((k for k in hf_keys(*path.rsplit(".", 1)) if k in base), None)
    if target is None:
        raise MergeError(f"{key}: {what}, but the base has no {path}")
    if base.info(target).shape != adapter.source.info(key).shape:
        raise MergeError(
            f"{key}: {what} of shape {list(adapter.source.info(key).shape)}, "
            f"but {target} is {list(base.info(target).shape)} in the base"
        )
    return Patch(lora, None, target, None, None, False, False, "replace", key)
