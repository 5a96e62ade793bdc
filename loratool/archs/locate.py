"""Where a canonical module's weight lives in a base checkpoint, in whatever layout the base uses.

A diffusers folder names it `<component>.<path>.weight`; a single file by its LDM/sgm/BFL/OpenCLIP
key under the component's prefix, possibly as a row block of a fused weight; an HF model by its
own path. Row blocks are computed from the base weight's shape, never from constants.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass

from .hf import HFArchitecture
from .table import Architecture, Targets, level_variants


@dataclass(frozen=True)
class Location:
    key: str  # key in the base source
    rows: tuple[int, int] | None = None  # row block of a fused weight
    transposed: bool = False  # stored (in, out)
    # A single-file key of a module whose rows are ordered differently there (Flux's final modulation);
    # where the orders agree it does not matter and stays False. See ops.fuse.reorder_rows.
    native_rows: bool = False
    fused_rows: int | None = None  # rows the fused weight must have for its row blocks to add up

    def fits_rows(self, stored_rows: int) -> bool:
        """Whether a fused weight's row blocks, sized from its width, cover exactly its rows."""
        return self.fused_rows is None or self.fused_rows == stored_rows


def _locate_one(
    arch: Architecture, target: str, keys: Container[str], shape_of: Callable[[str], tuple[int, ...]]
) -> Location | None:
    spec = arch.modules[target]
    comp = arch.components[spec.component]
    for variant in level_variants(spec.path, comp.optional_levels):
        key = f"{comp.name}.{variant}.weight"
        if key in keys:
            return Location(key)
    for prefix in comp.file_prefixes:
        if spec.native_weight is not None:
            key = prefix + spec.native_weight
            if key in keys:
                return Location(key, None, spec.transposed, native_rows=spec.rows == "swap_halves")
        elif spec.fused is not None:
            group = arch.fused[spec.fused]
            key = prefix + group.weight
            if key in keys:
                out_features, in_features = shape_of(key)[:2]
                sizes = group.row_sizes(in_features, out_features)
                start = sum(sizes[: spec.part])
                return Location(key, (start, start + sizes[spec.part]), fused_rows=sum(sizes))
    return None


def hf_keys(path: str, leaf: str = "weight") -> list[str]:
    """Keys an HF checkpoint may store a module's parameter under: an adapter made on a CausalLM
    names `model.layers...`; a bare base model saves `layers...`."""
    other = path[len("model.") :] if path.startswith("model.") else "model." + path
    return [f"{path}.{leaf}", f"{other}.{leaf}"]


def locate(
    arch: Architecture | HFArchitecture,
    targets: Targets,
    keys: Container[str],
    shape_of: Callable[[str], tuple[int, ...]],
) -> list[Location] | None:
    """One location per target, or None when the base lacks any of them."""
    found: list[Location] = []
    for target in targets:
        if isinstance(arch, HFArchitecture):
            location = next((Location(k) for k in hf_keys(target) if k in keys), None)
        else:
            location = _locate_one(arch, target, keys, shape_of)
        if location is None:
            return None
        found.append(location)
    return found
