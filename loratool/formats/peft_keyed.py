"""What the two layouts with PEFT's tensor names share (diffusers files, PEFT dirs): which kinds
they hold, their tensors, and the LoraConfig under which PEFT rebuilds every module exactly."""

from __future__ import annotations

import re
from collections import Counter

import numpy

from ..adapter import AdapterModule, Piece
from ..archs import BaseArchitecture
from ..kinds import KINDS, dora
from .layout import MATH_FIELDS, Entry, Layout, factor_pieces, reshaped


class PeftKeyed(Layout):
    """diffusers files and PEFT dirs: PEFT's tensor names, alphas in a LoraConfig."""

    scheme = "peft"
    kinds: tuple[str, ...] = ("lora",)  # adapter kinds this layout has tensor names for

    def why_not(self, unit: AdapterModule) -> str | None:
        if unit.kind.name not in self.kinds:
            held = ", ".join(KINDS[k].label for k in self.kinds)
            advice = "use --to kohya" if "kohya" in unit.kind.names else "no layout loratool writes holds it; merge it"
            return f"{unit.kind.label} has no form in {self.name} output, which holds {held} only ({advice})"
        if "mid" in unit.pieces:
            return "PEFT has no Tucker core (lora_mid); use --to kohya"
        if unit.bias_unscaled:
            return (
                "its diff_b is a bias difference applied at strength alone, and PEFT scales a LoRA's bias "
                "(lora_B.bias) by alpha/r; use --to kohya or --to comfyui, or merge it"
            )
        if dora.ROLE in unit.pieces:
            return dora.why_not("peft", unit.kind, unit.dora_columns, unit.embedding)
        return None

    def entries(self, name: str, unit: AdapterModule, arch: BaseArchitecture | None) -> list[Entry]:
        if unit.kind.name != "lora":  # PEFT's LoHa/LoKr tensors have LyCORIS's names and shapes
            return [Entry(f"{name}.{s}", p) for s, p in factor_pieces(unit.kind, unit.pieces, "peft", False).items()]
        pieces = {**unit.pieces, **_fit_to_module(unit, arch)}
        factors = factor_pieces(unit.kind, pieces, "peft", unit.embedding)
        out = [Entry(f"{name}.{suffix}", p) for suffix, p in factors.items()]
        magnitude = pieces.get(dora.ROLE)
        if magnitude is not None and unit.embedding:  # only PEFT itself holds these: its shape as saved
            out.append(Entry(f"{name}.{dora.NAMES['peft']}", magnitude))
        elif magnitude is not None:
            shape = dora.stored_shape("peft", pieces["up"].shape[0], len(pieces["down"].shape))
            out.append(Entry(f"{name}.{dora.NAMES['peft']}", reshaped(magnitude, shape)))
        return out


def _fit_to_module(unit: AdapterModule, arch: BaseArchitecture | None) -> dict[str, Piece]:
    """PEFT builds layers from the model: a Linear takes 2-D factors, a Conv2d 4-D ones. Some SD2
    LoRAs carry 1x1-conv factors for linear projections; the bytes are the same, only the shape moves."""
    spec = arch.spec(unit.targets[0]) if arch is not None and len(unit.targets) == 1 else None
    if spec is None or "mid" in unit.pieces:
        return {}
    down, up = unit.pieces["down"], unit.pieces["up"]
    if spec.type == "linear" and len(down.shape) == 4 and down.shape[2:] == (1, 1):
        return {"down": reshaped(down, down.shape[:2]), "up": reshaped(up, up.shape[:2])}
    if spec.type == "conv" and len(down.shape) == 2:
        ones = (1,) * (len(spec.shape) - 2)
        return {"down": reshaped(down, (*down.shape, *ones)), "up": reshaped(up, (*up.shape, *ones))}
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


def config_alpha(value: float, unit: AdapterModule) -> int | float:
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


def lora_config(units: list[tuple[str, AdapterModule]], levels: tuple[str, ...], base: dict | None) -> dict:
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
        use_dora=any(dora.ROLE in u.pieces for _, u in units),
        lora_bias=any("bias" in u.pieces for _, u in units),
    )
    if not config.get("target_modules"):
        config["target_modules"] = sorted({short_path(p, levels) for p, _ in units})
    return config
