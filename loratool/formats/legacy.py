"""diffusers' legacy attention-processor LoRA files (diffusers < 0.20 and their trainers).

UNet attention: `<attn>.processor.to_q_lora.down.weight`; other modules `<module>.lora.down.weight`;
text encoder `<attn>.to_q_lora.down.weight` or `<proj>.lora_linear_layer.down.weight`. These files
carry no alpha: diffusers applied them at scale 1.
"""

from __future__ import annotations

from functools import cache

from ..adapter import Adapter
from ..archs.catalog import get_catalog
from ..io.source import TensorSource
from ..kinds import suffix_table
from .base import Claim, Codec, Suffixes, build_modules, place_on_architecture, split_dotted, suffixes_longest_first

# Module-name endings of the legacy layout -> the module path ending they stand for, first match wins.
LEGACY_ENDINGS: tuple[tuple[str, str], ...] = (
    (".processor.to_q_lora", ".to_q"),
    (".processor.to_k_lora", ".to_k"),
    (".processor.to_v_lora", ".to_v"),
    (".processor.to_out_lora", ".to_out.0"),
    (".self_attn.to_q_lora", ".self_attn.q_proj"),
    (".self_attn.to_k_lora", ".self_attn.k_proj"),
    (".self_attn.to_v_lora", ".self_attn.v_proj"),
    (".self_attn.to_out_lora", ".self_attn.out_proj"),
    (".to_q_lora", ".to_q"),
    (".to_k_lora", ".to_k"),
    (".to_v_lora", ".to_v"),
    (".to_out_lora", ".to_out.0"),
    (".lora_linear_layer", ""),
    (".lora", ""),
)


@cache
def legacy_suffixes() -> Suffixes:
    """The legacy processors' tensor names (XLabs' files use them too)."""
    return suffixes_longest_first(suffix_table("legacy"))


def legacy_to_path(module: str, components: frozenset[str]) -> str | None:
    for ending, replacement in LEGACY_ENDINGS:
        if module.endswith(ending):
            path = module[: -len(ending)] + replacement
            # The oldest files saved the UNet's processors without a component prefix.
            return path if path.partition(".")[0] in components else "unet." + path
    return None


class LegacyCodec(Codec):
    name = "diffusers-legacy"
    alpha_convention = "none"

    def verdict(self, key: str) -> tuple[str, str] | None:
        split = split_dotted(key, legacy_suffixes())
        return split if split is not None and legacy_to_path(split[0], get_catalog().components) is not None else None

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        modules, orphans = build_modules(source, claim.keys, ("legacy",))
        components = get_catalog().components
        found = place_on_architecture(
            modules, "diffusers", source.metadata, names=lambda m: legacy_to_path(m, components) or m, only=arch
        )
        return Adapter(
            source=source,
            format=self.name,
            variant="attention processors",
            arch=found.arch,
            arch_reason=found.reason,
            arch_tied=found.tied,
            modules=modules,
            metadata=source.metadata,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
        )
