"""The layouts convert writes: how each names a unit's tensors, where it keeps alpha, and what it
cannot hold.

- kohya: one file, `<prefix><module_with_underscores>.lora_down.weight` etc., alpha as a tensor
  (LyCORIS names for LoHa/LoKr, `dora_scale` for DoRA).
- diffusers: one file, `<component>.<module path>.lora_A.weight` etc., alphas in the header's
  `lora_adapter_metadata` (a LoraConfig per component). For an LLM, PEFT's own keys in one file.
- peft: a directory with `adapter_model.safetensors` and `adapter_config.json`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy
import torch

from ..archs import BaseArchitecture, Targets, kohya_flat
from ..errors import ConversionError
from ..formats.diffusers import METADATA_KEY
from ..formats.kohya import HF_MODULES_KEY, PEFT_CONFIG_KEY
from ..formats.peft import COMPONENT_KEY, WRAPPER
from ..io.safetensors_file import DTYPES
from ..kinds import KINDS, Kind
from ..output.units import Piece, Unit
from .peft_lycoris import LOKR_FIELDS, LYCORIS_FIELDS, PEFT_TYPES, lycoris_structure

# kohya has no naming for models without a table; sd-scripts and ComfyUI name a transformers text
# model's modules (Lumina's Gemma, for one) `lora_te_` + path with underscores, so LLM files do too.
DORA_SUFFIX = {"kohya": "dora_scale", "peft": "lora_magnitude_vector"}
EMBEDDING_NAMES = {"down": "lora_embedding_A", "up": "lora_embedding_B"}
# The PEFT config fields convert owns: recomputed from the modules, whatever the source config said.
MATH_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")


class Origin(Protocol):
    """What a layout carries over from where the units came from: an Adapter, or the facts
    extract records about the checkpoints it read."""

    format: str  # the source layout ("peft", "kohya", ...), or "extracted"
    metadata: dict[str, str]
    config: dict | None  # PEFT adapter_config.json fields to keep


@dataclass(frozen=True)
class Entry:
    """One output tensor: its key and where its bytes come from."""

    key: str
    piece: Piece


class Layout(ABC):
    name: str
    scheme: str  # tensor naming scheme of the kinds: kohya | peft
    single_component = False
    is_directory = False  # written as a directory (weights and the file `config` returns), not as one file

    @abstractmethod
    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        """The module name this layout gives `targets`, or None when it has no name for them."""

    def native_rows(self, arch: BaseArchitecture, targets: Targets) -> bool:
        """Whether this layout's name for `targets` means single-file row order."""
        return False

    @abstractmethod
    def why_not(self, unit: Unit) -> str | None:
        """Why this layout cannot hold `unit` (None when it can)."""

    @abstractmethod
    def entries(self, name: str, unit: Unit, arch: BaseArchitecture | None) -> list[Entry]:
        """The unit's tensors under their keys in this layout."""

    def metadata(self, units: dict[str, Unit], adapter: Origin, arch: BaseArchitecture | None) -> dict[str, str]:
        return carried_metadata(adapter.metadata, units)

    def carries_full_weights(self, arch: BaseArchitecture | None) -> bool:
        """Whether PEFT's saved full weights (modules_to_save, embedding layers) keep their keys here."""
        return False

    def prepare(self, unit: Unit, load: Callable[[Piece], torch.Tensor]) -> Unit:
        """The unit as this layout stores it, when its rules need the numbers moved (same update)."""
        return unit

    def check_together(self, units: dict[str, Unit], arch: BaseArchitecture | None) -> None:
        """Refuse (ConversionError naming a module) what the units cannot be as one output."""
        return None


def carried_metadata(metadata: dict[str, str], units: dict[str, Unit]) -> dict[str, str]:
    """The source's own metadata (training record, modelspec), without keys a layout owns, and
    kohya's network dim/alpha fields, when present, recomputed from the modules as written."""
    owned = (METADATA_KEY, HF_MODULES_KEY, PEFT_CONFIG_KEY, COMPONENT_KEY)
    kept = {k: v for k, v in metadata.items() if k not in owned}
    if "ss_network_dim" in kept:
        kept["ss_network_dim"] = _one_or_dynamic([u.rank for u in units.values()])
    if "ss_network_alpha" in kept:
        kept["ss_network_alpha"] = _one_or_dynamic([u.alpha_for(False) for u in units.values()])
    return kept


def factor_pieces(kind: Kind, pieces: dict[str, Piece], scheme: str, embedding_names: bool) -> dict[str, Piece]:
    names = {role: suffix for suffix, role in kind.names[scheme].items() if not suffix.startswith("lora_embedding")}
    if embedding_names:
        names.update(EMBEDDING_NAMES)
    return {names[role]: piece for role, piece in pieces.items() if role in names}


def _reshaped(piece: Piece, shape: tuple[int, ...]) -> Piece:
    if piece.key is not None:
        return Piece(piece.dtype, shape, piece.key)
    return Piece(piece.dtype, shape, None, lambda: piece.compute().reshape(shape))


def exact_in(value: float, dtype: str) -> bool:
    return float(torch.tensor(value, dtype=torch.float64).to(DTYPES[dtype]).double()) == value


def alpha_piece(unit: Unit, alpha: float) -> Piece:
    """The alpha tensor: the source's own bytes when unchanged, else in the factors' dtype when
    that holds the value exactly, else in F32 (a bf16 0.1 would read back as 0.10009765625)."""
    if unit.alpha_key is not None and not unit.rslora and unit.alpha == alpha:
        return Piece(unit.alpha_dtype or "F32", (), unit.alpha_key)
    factor_dtype = next(iter(unit.pieces.values())).dtype
    dtype = factor_dtype if exact_in(alpha, factor_dtype) else "F32"
    return Piece(dtype, (), None, lambda: torch.tensor(alpha, dtype=DTYPES[dtype]))


class KohyaLayout(Layout):
    name = "kohya"
    scheme = "kohya"

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        if len(targets) == 1:
            try:
                return arch.kohya_name(targets[0])
            except KeyError:
                return None
        group = arch.fused_group(targets)
        if group is None:
            return None
        naming = arch.components[group.component].kohya[0]
        return naming.prefix + kohya_flat(group.native) if naming.paths == "native" else None

    def native_rows(self, arch: BaseArchitecture, targets: Targets) -> bool:
        component = arch.component_of(targets[0])
        return component is not None and arch.components[component].kohya[0].paths == "native"

    def why_not(self, unit: Unit) -> str | None:
        if "bias" in unit.pieces and "bias" not in unit.kind.names["kohya"].values():
            return "kohya files have no place for a LoRA bias (lora_B.bias)"
        if unit.kind.rank(unit.shapes) is None and unit.scale != 1.0 and "w1" not in unit.pieces:
            return f"its scale {unit.scale:g} needs a rank, and LyCORIS applies {unit.kind.label} at scale 1"
        if unit.embedding and "dora" in unit.pieces:
            return "DoRA on an embedding has no kohya/LyCORIS form"
        return None

    def prepare(self, unit: Unit, load: Callable[[Piece], torch.Tensor]) -> Unit:
        """Two whole LoKr factors: PEFT scales them by alpha / r, LyCORIS applies them at scale 1,
        so the scale moves into w1 (the same product, rounded once in w1's dtype)."""
        if unit.kind.rank(unit.shapes) is not None or unit.scale == 1.0 or "w1" not in unit.pieces:
            return unit
        w1, scale = unit.pieces["w1"], unit.scale
        dtype = DTYPES[w1.dtype]
        scaled = Piece.made(w1, w1.shape, lambda: (load(w1).double() * scale).to(dtype))
        note = f"{unit.origin}: scale {scale:g} of its two whole LoKr factors moved into lokr_w1 (LyCORIS applies 1)"
        return replace(
            unit,
            pieces={**unit.pieces, "w1": scaled},
            alpha=None,
            declared_rank=None,
            alpha_key=None,
            notes=[*unit.notes, note],
        )

    def entries(self, name: str, unit: Unit, arch: BaseArchitecture | None) -> list[Entry]:
        factors = factor_pieces(unit.kind, unit.pieces, "kohya", False)
        out = [Entry(f"{name}.{suffix}", p) for suffix, p in factors.items()]
        if unit.kind.rank(unit.shapes) is not None:
            out.append(Entry(f"{name}.alpha", alpha_piece(unit, unit.alpha_for(False))))
        elif unit.kind.stores_alpha:  # applied at scale 1 whatever it says, but LyCORIS reads one
            out.append(Entry(f"{name}.alpha", alpha_piece(unit, unit.alpha if unit.alpha is not None else 1.0)))
        dora = unit.pieces.get("dora")
        if dora is not None:
            if not unit.dora_columns and "down" in unit.pieces:  # PEFT's (out,) or (1, out, 1, 1)
                # LyCORIS keeps the per-row magnitude as (out, 1[, 1, 1])
                dora = _reshaped(dora, (unit.pieces["up"].shape[0], *[1] * (len(unit.pieces["down"].shape) - 1)))
            out.append(Entry(f"{name}.{DORA_SUFFIX['kohya']}", dora))
        return out

    def metadata(self, units: dict[str, Unit], adapter: Origin, arch: BaseArchitecture | None) -> dict[str, str]:
        metadata = carried_metadata(adapter.metadata, units)
        if arch is not None and not arch.lists_modules:  # kohya names do not spell paths out: record them
            modules = {}
            for name, unit in units.items():
                kind = "embedding" if unit.embedding else ("conv" if len(unit.pieces["down"].shape) >= 3 else "linear")
                modules[name] = {"path": unit.targets[0], "type": kind}
            metadata[HF_MODULES_KEY] = json.dumps(modules, sort_keys=True)
            config = {k: v for k, v in (adapter.config or {}).items() if k not in MATH_FIELDS}
            config["fan_in_fan_out"] = any(u.transposed and not u.embedding for u in units.values())
            metadata[PEFT_CONFIG_KEY] = json.dumps(config, sort_keys=True)
        return metadata


def _one_or_dynamic(values: list[float | int | None]) -> str:
    distinct = {v for v in values if v is not None}
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct.pop()
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class PeftKeyed(Layout):
    """diffusers files and PEFT dirs: PEFT's tensor names, alphas in a LoraConfig."""

    scheme = "peft"
    kinds: tuple[str, ...] = ("lora",)  # adapter kinds this layout has tensor names for

    def why_not(self, unit: Unit) -> str | None:
        if unit.kind.name not in self.kinds:
            held = ", ".join(KINDS[k].label for k in self.kinds)
            return f"{unit.kind.label} has no form in {self.name} output, which holds {held} only (use --to kohya)"
        if "mid" in unit.pieces:
            return "PEFT has no Tucker core (lora_mid); use --to kohya"
        if "dora" in unit.pieces and unit.kind.name != "lora":
            return f"PEFT's {unit.kind.label} has no DoRA; use --to kohya"
        if "dora" in unit.pieces and unit.dora_columns:
            return "its DoRA magnitude is per input column; PEFT's is per output row"
        return None

    def entries(self, name: str, unit: Unit, arch: BaseArchitecture | None) -> list[Entry]:
        if unit.kind.name != "lora":  # PEFT's LoHa/LoKr tensors have LyCORIS's names and shapes
            return [Entry(f"{name}.{s}", p) for s, p in factor_pieces(unit.kind, unit.pieces, "peft", False).items()]
        pieces = {**unit.pieces, **_fit_to_module(unit, arch)}
        factors = factor_pieces(unit.kind, pieces, "peft", unit.embedding)
        out = [Entry(f"{name}.{suffix}", p) for suffix, p in factors.items()]
        dora = pieces.get("dora")
        if dora is not None and unit.embedding:  # only PEFT itself holds these: its shape as saved
            out.append(Entry(f"{name}.{DORA_SUFFIX['peft']}", dora))
        elif dora is not None:
            rows = pieces["up"].shape[0]
            ndim = len(pieces["down"].shape)
            shape = (1, rows, *(1,) * (ndim - 2)) if ndim >= 3 else (rows,)
            out.append(Entry(f"{name}.{DORA_SUFFIX['peft']}", _reshaped(dora, shape)))
        return out


def _fit_to_module(unit: Unit, arch: BaseArchitecture | None) -> dict[str, Piece]:
    """PEFT builds layers from the model: a Linear takes 2-D factors, a Conv2d 4-D ones. Some SD2
    LoRAs carry 1x1-conv factors for linear projections; the bytes are the same, only the shape moves."""
    spec = arch.spec(unit.targets[0]) if arch is not None and len(unit.targets) == 1 else None
    if spec is None or "mid" in unit.pieces:
        return {}
    down, up = unit.pieces["down"], unit.pieces["up"]
    if spec.type == "linear" and len(down.shape) == 4 and down.shape[2:] == (1, 1):
        return {"down": _reshaped(down, down.shape[:2]), "up": _reshaped(up, up.shape[:2])}
    if spec.type == "conv" and len(down.shape) == 2:
        ones = (1,) * (len(spec.shape) - 2)
        return {"down": _reshaped(down, (*down.shape, *ones)), "up": _reshaped(up, (*up.shape, *ones))}
    return {}


def pattern_for(path: str, optional_levels: tuple[str, ...] = ()) -> str:
    """A PEFT rank/alpha pattern matching exactly one module: `^`-anchored, with the levels some
    library versions drop (CLIP's `text_model.`) optional."""
    for level in optional_levels:
        if path.startswith(level):
            return f"^(?:{re.escape(level)})?{re.escape(path[len(level) :])}"
    return "^" + re.escape(path)


def short_path(path: str, optional_levels: tuple[str, ...] = ()) -> str:
    """The path without levels some library versions drop, for `target_modules` (suffix match)."""
    for level in optional_levels:
        if path.startswith(level):
            return path[len(level) :]
    return path


def config_alpha(value: float, unit: Unit) -> int | float:
    """An alpha as a config number: integers as such; the alpha of an F32 tensor, unchanged, as its
    shortest float32 decimal (0.1 rather than 0.10000000149011612: what the trainer wrote); any
    other value (a config's own number, a computed one) exactly, so its scale does not move."""
    if float(value).is_integer():
        return int(value)
    if unit.alpha_dtype == "F32" and value == unit.alpha:
        return float(str(numpy.float32(value)))
    return float(value)


def rank_alpha_fields(
    ranks: dict[str, int], numbers: dict[str, int | float], levels: tuple[str, ...], alpha_field: str
) -> dict:
    """`r` and alpha (under `alpha_field`) as the most common values, and a `^`-anchored full-path
    pattern for every module that differs, from per-path ranks and alphas (as `config_alpha` writes them)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(numbers.values()).most_common(1)[0][0]
    return {
        "r": r,
        alpha_field: alpha,
        "rank_pattern": {pattern_for(p, levels): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {pattern_for(p, levels): v for p, v in numbers.items() if v != alpha},
    }


def lora_config(units: list[tuple[str, Unit]], levels: tuple[str, ...], base: dict | None) -> dict:
    """A LoraConfig dict under which PEFT rebuilds every unit with its own rank and scale.

    `units` pairs each unit with its module path inside the model PEFT wraps.
    """
    rslora = all(u.rslora for _, u in units)
    config = {k: v for k, v in (base or {}).items() if k not in MATH_FIELDS}
    config.update(
        rank_alpha_fields(
            {path: u.rank for path, u in units},
            {path: config_alpha(u.alpha_for(rslora), u) for path, u in units},
            levels,
            "lora_alpha",
        ),
        use_rslora=rslora,
        use_dora=any("dora" in u.pieces for _, u in units),
        lora_bias=any("bias" in u.pieces for _, u in units),
    )
    if not config.get("target_modules"):
        config["target_modules"] = sorted({short_path(p, levels) for p, _ in units})
    return config


class DiffusersLayout(PeftKeyed):
    name = "diffusers"

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        if len(targets) != 1:
            return None
        # A model of components names modules `component.path`; one whole model is wrapped as PEFT does.
        return targets[0] if arch.components else WRAPPER + targets[0]

    def carries_full_weights(self, arch: BaseArchitecture | None) -> bool:
        return arch is not None and not arch.components  # a single model's file keeps PEFT's own keys

    def metadata(self, units: dict[str, Unit], adapter: Origin, arch: BaseArchitecture | None) -> dict[str, str]:
        metadata = carried_metadata(adapter.metadata, units)
        metadata.setdefault("format", "pt")
        if not arch.components:
            pairs = [(name[len(WRAPPER) :], u) for name, u in units.items()]
            config = lora_config(pairs, (), adapter.config)
            config.setdefault("peft_type", "LORA")
        else:
            config = {}
            for component in dict.fromkeys(u.component for u in units.values()):
                comp = arch.components[component]
                pairs = [(n[len(component) + 1 :], u) for n, u in units.items() if u.component == component]
                for key, value in lora_config(pairs, comp.optional_levels, None).items():
                    config[f"{component}.{key}"] = value
        metadata[METADATA_KEY] = json.dumps(config, sort_keys=True)
        return metadata


class PeftLayout(PeftKeyed):
    name = "peft"
    single_component = True
    is_directory = True
    kinds = ("lora", "loha", "lokr")

    def check_together(self, units: dict[str, Unit], arch: BaseArchitecture | None) -> None:
        kinds = {u.kind.name: u for u in units.values()}
        if len(kinds) > 1:
            first, second = list(kinds.values())[:2]
            raise ConversionError(
                f"{second.origin}: {second.kind.label}, while {first.origin} is {first.kind.label}; a PEFT "
                "adapter holds one adapter type (use --to kohya for a mixed file)"
            )
        if units and next(iter(units.values())).kind.name != "lora":
            self._lycoris_fields(units, arch)

    def _lycoris_fields(self, units: dict[str, Unit], arch: BaseArchitecture | None) -> dict:
        levels = self._levels(units, arch)
        pairs = [(name[len(WRAPPER) :], u) for name, u in units.items()]
        specs = {path: arch.spec(u.targets[0]) for path, u in pairs} if arch is not None else {}
        kernels = {path: tuple(spec.shape[2:]) for path, spec in specs.items() if spec is not None}
        fields, ranks = lycoris_structure(pairs[0][1].kind.name, pairs, kernels)
        # The source's own alpha where PEFT keeps its rank; alpha = scale * r where the rank is chosen
        # here (two whole LoKr factors have none).
        alphas = {
            p: config_alpha(u.alpha_for(False) if ranks[p] == u.rank else u.scale * ranks[p], u) for p, u in pairs
        }
        fields.update(rank_alpha_fields(ranks, alphas, levels, "alpha"))
        fields["target_modules"] = sorted({short_path(p, levels) for p, _ in pairs})
        return fields

    @staticmethod
    def _levels(units: dict[str, Unit], arch: BaseArchitecture | None) -> tuple[str, ...]:
        return arch.optional_levels(next(iter(units.values())).component) if arch is not None else ()

    def carries_full_weights(self, arch: BaseArchitecture | None) -> bool:
        return True

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        return WRAPPER + arch.module_path(targets[0]) if len(targets) == 1 else None

    def metadata(self, units: dict[str, Unit], adapter: Origin, arch: BaseArchitecture | None) -> dict[str, str]:
        metadata = {**carried_metadata(adapter.metadata, units), "format": "pt"}  # what PEFT writes
        if arch is not None and arch.components:  # which of the model's components the adapter wraps
            metadata[COMPONENT_KEY] = next(iter(units.values())).component
        return metadata

    def config(self, units: dict[str, Unit], adapter: Origin, arch: BaseArchitecture | None) -> dict:
        levels = self._levels(units, arch)
        pairs = [(name[len(WRAPPER) :], u) for name, u in units.items()]
        # A PEFT source's own config (or the one an LLM kohya file carries); a diffusers file's
        # per-component configs are not a PEFT dir's.
        single_model = arch is not None and not arch.components
        base = adapter.config if adapter.format == "peft" or single_model else None
        kind = pairs[0][1].kind.name
        peft_type = PEFT_TYPES.get(kind, "LORA")
        if (base or {}).get("peft_type", "LORA") != peft_type:
            base = None  # another adapter type's fields would not be this config's
        if kind == "lora":
            config = lora_config(pairs, levels, base)
            config.setdefault("bias", "none")
            config.setdefault("fan_in_fan_out", any(u.transposed and not u.embedding for u in units.values()))
        else:
            config = {k: v for k, v in (base or {}).items() if k not in (*LYCORIS_FIELDS, *LOKR_FIELDS)}
            fields = self._lycoris_fields(units, arch)
            if config.get("target_modules"):
                fields.pop("target_modules")
            config.update(fields)
        config["peft_type"] = peft_type
        config.setdefault("task_type", None)
        config.setdefault("base_model_name_or_path", None)
        config.setdefault("inference_mode", True)
        return config


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (KohyaLayout(), DiffusersLayout(), PeftLayout())}
