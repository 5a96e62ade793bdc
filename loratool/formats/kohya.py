"""kohya / A1111 / ComfyUI files, and LyCORIS files in the same layout.

One safetensors file; per module `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (or the
LyCORIS tensors of other kinds), where `<name>` is a prefix plus the module path with every '.'
turned into '_'. Names are resolved by exact lookup in the architecture tables, never by
reversing the underscores.
"""

from __future__ import annotations

import json

from ..adapter import Adapter
from ..io.source import TensorSource
from ..kinds import suffix_table, without_lone_generics
from .base import MODIFIERS, Claim, Codec, build_modules, place_on_architecture

PREFIXES = ("lora_", "lycoris_")
# kohya names cannot be turned back into paths of a model with no table (an LLM), so files we write
# for one carry the map (kohya name -> {"path", "type"}) and the PEFT config fields that are not math.
HF_MODULES_KEY = "loratool.hf_modules"
PEFT_CONFIG_KEY = "loratool.peft_config"


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
        known = set(suffix_table("kohya")) | set(MODIFIERS["kohya"])
        claim = Claim(self)
        for key in source:
            module, dot, suffix = key.partition(".")
            if dot and module.startswith(PREFIXES) and suffix in known:
                claim.keys[key] = (module, suffix)
        claim.keys = without_lone_generics(claim.keys)
        return claim

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
            extra_keys=dict(claim.extra),
        )
