"""LoRA files named after the original single-file checkpoint: ComfyUI saves and BFL's own LoRAs.

Module paths are the LDM/sgm/BFL/OpenCLIP ones (`diffusion_model.double_blocks.0.img_attn.qkv`,
`text_encoders.clip_l.transformer.text_model...`), with either kohya tensor names
(`lora_down.weight`, `alpha`) or PEFT ones (`lora_A.weight`). BFL's Flux control LoRAs (Depth,
Canny) add `*_norm.scale` tensors that replace the base's (kinds/set_weight.py).

`ComfyLayout` writes the layout ComfyUI's maintainers ask trainers to ship: the denoiser's modules
under `diffusion_model.` with their single-file names (ComfyUI's generic rule loads them for any
model it knows), each text encoder's under the prefix ComfyUI keeps it at
(`text_encoders.clip_l.transformer.` + HF path), and kohya/LyCORIS tensor names with `alpha`, so
every kind and every scale travels exactly.
"""

from __future__ import annotations

from functools import cached_property

from ..adapter import Adapter
from ..archs import BaseArchitecture, Targets
from ..archs.catalog import get_catalog
from ..io.source import TensorSource
from ..kinds import suffix_table, without_lone_generics
from .base import (
    MODIFIERS,
    Claim,
    Codec,
    Suffixes,
    build_modules,
    place_on_architecture,
    split_dotted,
    suffixes_longest_first,
)
from .kohya import KohyaLayout


class NativeCodec(Codec):
    name = "comfyui"
    alpha_convention = "tensor"
    schemes: tuple[str, ...] = ("kohya", "peft", "bfl")  # the tensor names this layout's files use

    def claim(self, source: TensorSource) -> Claim:
        claim = super().claim(source)
        claim.keys = without_lone_generics(claim.keys)
        return claim

    @cached_property
    def suffixes(self) -> Suffixes:
        return suffixes_longest_first(*(suffix_table(s) for s in self.schemes), *(MODIFIERS[s] for s in self.schemes))

    def verdict(self, key: str) -> tuple[str, str] | None:
        split = split_dotted(key, self.suffixes)
        return split if split is not None and split[0] in get_catalog().native_names else None

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        modules, orphans = build_modules(source, claim.keys, self.schemes)
        found = place_on_architecture(modules, "native", source.metadata, only=arch)
        for module in modules.values():
            module.native_rows = True
        kohya_names = set(suffix_table("kohya")) - set(suffix_table("peft"))
        tensor_alphas = any(s == "alpha" or s in kohya_names for _, s in claim.keys.values())
        prefixes = sorted({_prefix_of(name, found.arch) for name in modules})
        return Adapter(
            source=source,
            format=self.name,
            native_layout=ComfyLayout.name,
            variant=", ".join(p or "(no prefix)" for p in prefixes),
            arch=found.arch,
            arch_reason=found.reason,
            arch_tied=found.tied,
            modules=modules,
            metadata=source.metadata,
            alpha_convention="tensor" if tensor_alphas else "config",
            orphans=orphans,
        )


def _prefix_of(name: str, arch: BaseArchitecture | None) -> str:
    components = arch.components.values() if arch is not None else ()
    named = {p for c in components for p in c.lora_prefixes} | {c.comfyui.prefix for c in components if c.comfyui}
    prefixes = sorted(named, key=len, reverse=True)
    return next((p for p in prefixes if p and name.startswith(p)), "")


class ComfyLayout(KohyaLayout):
    """kohya's tensors under the module names ComfyUI reads (see the module docstring)."""

    name = "comfyui"

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        return arch.comfyui_name(targets)

    def native_rows(self, arch: BaseArchitecture, targets: Targets) -> bool:
        spec = arch.spec(targets[0])
        naming = arch.components[spec.component].comfyui if spec is not None else None
        return naming is not None and naming.paths == "native"

    def token_key(self, token: str) -> str | None:
        return None  # ComfyUI loads embeddings as their own files, not from a LoRA
