"""Which model a base checkpoint is, and which of its weights a LoRA would adapt.

merge learns the architecture from the LoRA; extract has only checkpoints. Every table is tried:
the one whose modules the checkpoint holds most of wins, ties (an SD1 and an SD2 UNet share every
name) going to the table whose module types fit the stored tensors (SD1's proj_in is a 1x1 conv,
SD2's a linear), then to the checkpoint's metadata. A directory with a transformers config.json, or
a file no table explains, is an HF model whose module paths are its own keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from ..io.source import TensorSource
from . import architectures, hint_matches
from .base_keys import base_architecture
from .fit import Shape, table_fit
from .hf import COMMON_LEAVES, EMBEDDING_LEAVES, HFArchitecture, detect_hf
from .locate import Location, locate
from .table import MODULE_NDIMS, Architecture

# The module types a LoRA factors (B @ A) and the weight dimensions each may have (a conv's 3 to 5);
# norm rows of the tables (1-D weights) are left out.
TYPE_NDIMS = {kind: ndims for kind, ndims in MODULE_NDIMS.items() if kind != "norm"}


@dataclass(frozen=True)
class Weight:
    """A module of the checkpoint a LoRA could adapt: its type and where its weight is stored."""

    name: str  # canonical module (table name, or the HF module path)
    type: str  # linear | conv | embedding
    target: str  # default | conv | extra, as the table marks it
    location: Location


def checkpoint_architecture(source: TensorSource) -> Architecture | HFArchitecture:
    """The architecture of a base checkpoint; raises InputError when nothing fits."""
    if source.config and isinstance(source.config.get("model_type"), str):
        return _hf(source)
    best: list[tuple[int, int, int, int, bool, Architecture]] = []
    for arch in architectures().values():
        found = _table_weights(arch, source)
        # Checkpoint weights explained first: a fused weight counts once, not once per row block
        # (Flux.1's table finds four modules in a FLUX.2 `linear1`); then weights at the table's
        # full-size shape (FLUX.2 [dev] and [klein] share names, not widths).
        keys = len({w.location.key for w in found})
        exact = sum(
            1
            for w in found
            if w.location.rows is None and tuple(source.info(w.location.key).shape) == tuple(arch.modules[w.name].shape)
        )
        typed = sum(1 for w in found if len(source.info(w.location.key).shape) in TYPE_NDIMS[w.type])
        best.append((keys, exact, len(found), typed, hint_matches(arch, source.metadata), arch))
    best.sort(key=lambda b: (-b[0], -b[1], -b[2], -b[3], not b[4]))
    if best[0][0] > 0:
        return best[0][5]
    return _hf(source)


def _hf(source: TensorSource) -> HFArchitecture:
    """A transformers family, else the checkpoint's own keys as the table (a model no table knows:
    its Linear and conv weights by path)."""
    paths = [k.removesuffix(".weight") for k in source if k.endswith(".weight") and len(source.info(k).shape) == 2]
    arch = detect_hf(paths, source.config)
    if arch is not None:
        return arch
    if not any(k.endswith(".weight") and 2 <= len(source.info(k).shape) <= 5 for k in source):
        raise InputError(f"{source.path}: no weights a LoRA could adapt (no 2-D to 5-D `.weight` tensors)")
    return base_architecture()


def checkpoint_misfits(arch: Architecture | HFArchitecture, source: TensorSource) -> dict[str, tuple[Shape, Shape]]:
    """The table's modules whose weights the checkpoint stores at other widths (module -> (stored,
    table's)): none for a reduced test model, whose widths are not compared (see fit.py), nor for
    a model known by its paths only."""
    if not isinstance(arch, Architecture):
        return {}
    stored: dict[str, Shape] = {}
    for weight in _table_weights(arch, source):
        location = weight.location
        shape = tuple(source.info(location.key).shape)
        if location.rows is not None:
            shape = (location.rows[1] - location.rows[0], *shape[1:])
        stored[weight.name] = shape[::-1] if location.transposed else shape
    return table_fit([(name, shape, arch.modules[name].shape) for name, shape in stored.items()]).misfits


def checkpoint_weights(arch: Architecture | HFArchitecture, source: TensorSource) -> list[Weight]:
    """Every module of `arch` the checkpoint stores, in the checkpoint's key order."""
    found = _table_weights(arch, source) if isinstance(arch, Architecture) else _hf_weights(arch, source)
    order = {key: i for i, key in enumerate(source)}
    return sorted(found, key=lambda w: (order[w.location.key], w.location.rows or (0, 0)))


def _table_weights(arch: Architecture, source: TensorSource) -> list[Weight]:
    out = []
    for spec in arch.modules.values():
        if spec.type not in TYPE_NDIMS:  # norms: nothing to factor, and not counted to pick the table
            continue
        located = locate(arch, (spec.name,), source, lambda key: source.info(key).shape)
        if located is not None:
            out.append(Weight(spec.name, spec.type, spec.target, located[0]))
    return out


def _hf_weights(arch: HFArchitecture, source: TensorSource) -> list[Weight]:
    family = arch.family
    patterns = [re.compile(p) for p in family.patterns] if family is not None else []
    out = []
    own_keys = arch.source == "base"  # no family: the checkpoint's own layers, convs too
    for key in source:
        ndim = len(source.info(key).shape) if key.endswith(".weight") else 0
        if own_keys and 3 <= ndim <= 5:
            out.append(Weight(key.removesuffix(".weight"), "conv", "conv", Location(key)))
            continue
        if ndim != 2:
            continue
        path = key.removesuffix(".weight")
        leaf = path.rsplit(".", 1)[-1]
        if leaf in EMBEDDING_LEAVES:
            out.append(Weight(path, "embedding", "extra", Location(key)))
            continue
        if patterns:
            adapted = any(p.search(path) for p in patterns)
        else:  # a model type without a family: every projection but the heads
            adapted = leaf not in COMMON_LEAVES and "norm" not in leaf
        transposed = adapted and family is not None and family.stored_transposed
        out.append(Weight(path, "linear", "default" if adapted else "extra", Location(key, transposed=transposed)))
    return out
