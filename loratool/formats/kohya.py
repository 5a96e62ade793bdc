"""kohya / A1111 / ComfyUI files, and LyCORIS files in the same layout.

One safetensors file; per module `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (or the
LyCORIS tensors of other kinds), where `<name>` is a prefix plus the module path with every '.'
turned into '_'. Names are resolved by exact lookup in the architecture tables, never by
reversing the underscores.

`KohyaCodec` reads the layout, `KohyaLayout` writes it: alpha as a tensor beside the factors,
LyCORIS names for LoHa/LoKr, `dora_scale` for DoRA, and for an LLM the module paths and PEFT config
in the header so the file converts back exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from functools import cache

from ..adapter import TOKEN_WHAT, Adapter, AdapterModule, Piece
from ..archs import BaseArchitecture, Targets, kohya_flat
from ..io.safetensors_file import DTYPES
from ..io.source import TensorSource
from ..kinds import KINDS, dora, peft_ia3, suffix_table, without_lone_generics
from ..lazy_torch import torch
from .base import MODIFIERS, Claim, Codec, build_modules, place_on_architecture
from .layout import (
    HF_MODULES_KEY,
    MATH_FIELDS,
    PEFT_CONFIG_KEY,
    Entry,
    Layout,
    Origin,
    alpha_piece,
    carried_metadata,
    factor_pieces,
    reshaped,
)

PREFIXES = ("lora_", "lycoris_")
# Textual-inversion embeddings bundled with the LoRA, as sd-scripts and A1111 keep them.
BUNDLED = re.compile(r"^bundle_emb\.(.+)\.string_to_param\.\*$")
# kohya names cannot be turned back into paths of a model with no table (an LLM), so files we write
# for one carry the map (kohya name -> {"path", "type"}) and the PEFT config fields that are not math.


@cache
def _known_suffixes() -> frozenset[str]:
    return frozenset(suffix_table("kohya")) | frozenset(MODIFIERS["kohya"])


def _json_dict(metadata: dict[str, str], key: str) -> dict | None:
    try:
        value = json.loads(metadata.get(key, ""))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def hf_modules(metadata: dict[str, str]) -> dict[str, dict]:
    found = _json_dict(metadata, HF_MODULES_KEY) or {}
    return {k: v for k, v in found.items() if isinstance(v, dict) and isinstance(v.get("path"), str)}


def peft_config(metadata: dict[str, str]) -> dict | None:
    return _json_dict(metadata, PEFT_CONFIG_KEY)


class KohyaCodec(Codec):
    name = "kohya"
    alpha_convention = "tensor"

    def claim(self, source: TensorSource) -> Claim:
        claim = super().claim(source)
        claim.keys = without_lone_generics(claim.keys)
        return claim

    def verdict(self, key: str) -> tuple[str, str] | str | None:
        module, dot, suffix = key.partition(".")
        if dot and module.startswith(PREFIXES) and suffix in _known_suffixes():
            return module, suffix
        return TOKEN_WHAT if BUNDLED.match(key) else None

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        modules, orphans = build_modules(source, claim.keys, ("kohya",))
        metadata = source.metadata
        found = place_on_architecture(modules, "kohya", metadata, only=arch)
        hf = hf_modules(metadata)
        config = None
        if found.arch is not None:
            for name, module in modules.items():
                module.native_rows = name in found.arch.kohya_native_names
        elif hf:
            config = peft_config(metadata)
            found = place_on_architecture(
                modules,
                "diffusers",
                metadata,
                names=lambda m: hf[m]["path"] if m in hf else m,
                hf_name_hint=(config or {}).get("base_model_name_or_path") or None,
            )
            for name, module in modules.items():
                module.embedding = hf.get(name, {}).get("type") == "embedding"
                module.transposed = module.embedding or bool((config or {}).get("fan_in_fan_out", False))
        lycoris = (
            any(m.kind.name != "lora" or "mid" in m.keys or m.dora_key for m in modules.values())
            or any(name.startswith("lycoris_") for name in modules)
            or metadata.get("ss_network_module", "").startswith("lycoris")
        )
        prefixes = sorted({"_".join(name.split("_", 2)[:2]) for name in modules if name.count("_") >= 2})
        return Adapter(
            source=source,
            format="lycoris" if lycoris else "kohya",
            variant=", ".join(prefixes),
            arch=found.arch,
            arch_reason=found.reason,
            arch_tied=found.tied,
            modules=modules,
            metadata=metadata,
            config=config,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
            extra_keys={k: v for k, v in claim.extra.items() if v != TOKEN_WHAT},
            tokens={k: BUNDLED.match(k)[1] for k, v in claim.extra.items() if v == TOKEN_WHAT},
        )


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

    def token_key(self, token: str) -> str | None:
        return f"bundle_emb.{token}.string_to_param.*"

    def native_rows(self, arch: BaseArchitecture, targets: Targets) -> bool:
        component = arch.component_of(targets[0])
        return component is not None and arch.components[component].kohya[0].paths == "native"

    def why_not(self, unit: AdapterModule) -> str | None:
        if "kohya" not in unit.kind.names:
            return f"{unit.kind.label} has no kohya/LyCORIS form (no layout loratool writes holds it; merge it)"
        if "bias" in unit.pieces and "bias" not in unit.kind.names["kohya"].values() and not unit.bias_unscaled:
            return "kohya files have no place for a LoRA bias (lora_B.bias)"
        if unit.kind.rank(unit.shapes) is None and unit.scale != 1.0 and "w1" not in unit.pieces:
            return f"its scale {unit.scale:g} needs a rank, and LyCORIS applies {unit.kind.label} at scale 1"
        if dora.ROLE in unit.pieces:
            return dora.why_not("kohya", unit.kind, unit.dora_columns, unit.embedding)
        return None

    def adopt(self, unit: AdapterModule, load: Callable[[Piece], torch.Tensor]) -> AdapterModule:
        """PEFT's IA3 as LyCORIS's: w = l - 1 on the same axis, with its `on_input` flag."""
        if unit.kind.name != "ia3-peft":
            return unit
        vector = unit.pieces["vector"]
        axis = "out" if vector.shape[-1] == 1 else "in"
        flag = Piece("I64", (), None, lambda: torch.tensor(int(axis == "in")))
        pieces = {
            axis: Piece.made(vector, (max(vector.shape),), lambda: peft_ia3.as_lycoris(load(vector))[1]),
            "on_input": flag,
        }
        note = f"{unit.name}: PEFT's IA3 written as LyCORIS's (weight = ia3_l - 1)"
        return replace(unit, kind=KINDS["ia3"], pieces=pieces, notes=[*unit.notes, note])

    def prepare(self, unit: AdapterModule, load: Callable[[Piece], torch.Tensor]) -> AdapterModule:
        """Two whole LoKr factors: PEFT scales them by alpha / r, LyCORIS applies them at scale 1,
        so the scale moves into w1 (the same product, rounded once in w1's dtype)."""
        if unit.kind.rank(unit.shapes) is not None or unit.scale == 1.0 or "w1" not in unit.pieces:
            return unit
        w1, scale = unit.pieces["w1"], unit.scale
        dtype = DTYPES[w1.dtype]
        scaled = Piece.made(w1, w1.shape, lambda: (load(w1).double() * scale).to(dtype))
        note = f"{unit.name}: scale {scale:g} of its two whole LoKr factors moved into lokr_w1 (LyCORIS applies 1)"
        return replace(
            unit,
            pieces={**unit.pieces, "w1": scaled},
            alpha=None,
            declared_rank=None,
            alpha_key=None,
            notes=[*unit.notes, note],
        )

    def entries(self, name: str, unit: AdapterModule, arch: BaseArchitecture | None) -> list[Entry]:
        factors = factor_pieces(unit.kind, unit.pieces, "kohya", False)
        out = [Entry(f"{name}.{suffix}", p) for suffix, p in factors.items()]
        if unit.bias_unscaled:  # a bias difference beside the factors, as lightx2v writes it
            out.append(Entry(f"{name}.diff_b", unit.pieces["bias"]))
        if unit.kind.rank(unit.shapes) is not None:
            out.append(Entry(f"{name}.alpha", alpha_piece(unit, unit.alpha_for(False))))
        elif unit.kind.stores_alpha:  # applied at scale 1 whatever it says, but LyCORIS reads one
            out.append(Entry(f"{name}.alpha", alpha_piece(unit, unit.alpha if unit.alpha is not None else 1.0)))
        magnitude = unit.pieces.get(dora.ROLE)
        if magnitude is not None:
            if not unit.dora_columns and "down" in unit.pieces:  # from PEFT's (out,) or (1, out, 1, 1)
                rows, ndim = unit.pieces["up"].shape[0], len(unit.pieces["down"].shape)
                magnitude = reshaped(magnitude, dora.stored_shape("kohya", rows, ndim))
            out.append(Entry(f"{name}.{dora.NAMES['kohya']}", magnitude))
        return out

    def metadata(
        self, units: dict[str, AdapterModule], adapter: Origin, arch: BaseArchitecture | None
    ) -> dict[str, str]:
        metadata = carried_metadata(adapter.metadata, units)
        if arch is not None and not arch.lists_modules:  # kohya names do not spell paths out: record them
            modules = {}
            for name, unit in units.items():
                conv = len(unit.kind.weight_shape(unit.shapes)) >= 3
                kind = "embedding" if unit.embedding else ("conv" if conv else "linear")
                modules[name] = {"path": unit.targets[0], "type": kind}
            metadata[HF_MODULES_KEY] = json.dumps(modules, sort_keys=True)
            config = {k: v for k, v in (adapter.config or {}).items() if k not in MATH_FIELDS}
            config["fan_in_fan_out"] = any(u.transposed and not u.embedding for u in units.values())
            metadata[PEFT_CONFIG_KEY] = json.dumps(config, sort_keys=True)
        return metadata
