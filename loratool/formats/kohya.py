"""kohya / A1111 / ComfyUI files, and LyCORIS files in the same layout.

One safetensors file; per module `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (or the
LyCORIS tensors of other kinds), where `<name>` is a prefix plus the module path with every '.'
turned into '_'. Names are resolved by exact lookup in the architecture tables, never by
reversing the underscores.
"""

from __future__ import annotations

from ..adapter import Adapter
from ..io.source import TensorSource
from ..kinds import suffix_table
from .base import MODIFIERS, Claim, Codec, build_modules, place_on_architecture

PREFIXES = ("lora_", "lycoris_")


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
        return claim

    def read(self, source: TensorSource, claim: Claim) -> Adapter:
        modules, orphans = build_modules(source, claim.keys, ("kohya",))
        metadata = source.metadata
        found = place_on_architecture(modules, "kohya", metadata)
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
            modules=modules,
            metadata=metadata,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
            extra_keys=dict(claim.extra),
        )
