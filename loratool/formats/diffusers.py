"""diffusers' PEFT-style LoRA files: `<component>.<module path>.lora_A.weight` / `.lora_B.weight`.

diffusers' own SD training scripts also save one component's modules with no prefix at all
(`down_blocks.0.attentions.0...to_k.lora_A.weight`, which `unet.load_lora_adapter(prefix=None)`
loads); such a key is read as the one component whose module paths contain it.

Alphas travel in the header key `lora_adapter_metadata` (a LoraConfig dict, its keys prefixed with
the component when a pipeline saved several). Without it, `<module>.alpha` tensors are used if the
file has them (as diffusers does), else alpha = rank.

`DiffusersCodec` reads the layout; `DiffusersLayout` writes it, with a LoraConfig per component
(for an LLM, PEFT's own keys and one LoraConfig in the same header key).
"""

from __future__ import annotations

import json
from functools import cache

from ..adapter import Adapter, AdapterModule
from ..archs import BaseArchitecture, Targets
from ..archs.catalog import get_catalog
from ..io.source import TensorSource
from ..kinds import suffix_table
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
from .layout import DIFFUSERS_CONFIG_KEY, WRAPPER, Origin, carried_metadata
from .peft_config import checked_config, pattern_value
from .peft_keyed import PeftKeyed, lora_config

EMBEDDING_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")


@cache
def _suffixes() -> Suffixes:
    return suffixes_longest_first(suffix_table("peft"), MODIFIERS["peft"])


# ai-toolkit's files (Z-Image; older Flux ones) and ComfyUI's Z-Image loader: the denoiser's diffusers
# paths under ComfyUI's `diffusion_model.` instead of the component's name.
DENOISER_PREFIX = "diffusion_model."


def bare_path(name: str, bare: dict[str, str]) -> str | None:
    """The component-less diffusers path `name` stands for, bare or under `diffusion_model.`."""
    for path in (name, name.removeprefix(DENOISER_PREFIX)):
        if path in bare:
            return path
    return None


def component_configs(metadata: dict[str, str]) -> dict[str, dict] | None:
    """Per-component LoraConfig dicts from `lora_adapter_metadata`; key "" when not prefixed."""
    raw = metadata.get(DIFFUSERS_CONFIG_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    components = get_catalog().components
    configs: dict[str, dict] = {}
    for key, value in data.items():
        head, dot, field = key.partition(".")
        if dot and head in components:
            configs.setdefault(head, {})[field] = value
        else:
            configs.setdefault("", {})[key] = value
    return {name: checked_config(config, f"{DIFFUSERS_CONFIG_KEY} in the header") for name, config in configs.items()}


class DiffusersCodec(Codec):
    name = "diffusers"
    alpha_convention = "config"

    def verdict(self, key: str) -> tuple[str, str] | None:
        split = split_dotted(key, _suffixes())
        if split is None:
            return None
        named = key.partition(".")[0] in get_catalog().components and split[0] not in get_catalog().native_only_names
        return split if named or bare_path(split[0], get_catalog().unprefixed_paths) else None

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        metadata = source.metadata
        modules, orphans = build_modules(source, claim.keys, ("peft",))
        configs = component_configs(metadata)
        embeddings = {module for module, suffix in claim.keys.values() if suffix in EMBEDDING_SUFFIXES}
        components, bare = get_catalog().components, get_catalog().unprefixed_paths
        paths = {name: bare_path(name, bare) for name in modules}
        prefixed = {
            name: name
            if name.partition(".")[0] in components or paths[name] is None
            else f"{bare[paths[name]]}.{paths[name]}"
            for name in modules
        }
        for name, module in modules.items():
            component, _, path = prefixed[name].partition(".")
            config = (configs or {}).get(component, (configs or {}).get(""))
            if config is not None:
                module.alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8)))
                module.alpha_source = "metadata"
                module.rslora = bool(config.get("use_rslora", False))
                module.declared_rank = int(pattern_value(config.get("rank_pattern"), path, config.get("r", 8)))
            module.transposed = module.embedding = name in embeddings
        found = place_on_architecture(modules, "diffusers", metadata, prefixed.__getitem__, only=arch)
        stored_alphas = any(m.alpha_source == "tensor" for m in modules.values())
        return Adapter(
            source=source,
            format="diffusers",
            native_layout="diffusers",
            variant=", ".join(
                [
                    "lora_adapter_metadata" if configs else (".alpha tensors" if stored_alphas else "no alphas"),
                    *(["no component prefix"] if any(prefixed[n] != n for n in modules) else []),
                ]
            ),
            arch=found.arch,
            arch_reason=found.reason,
            arch_tied=found.tied,
            modules=modules,
            metadata=metadata,
            config=configs,
            alpha_convention="tensor" if stored_alphas and not configs else self.alpha_convention,
            orphans=orphans,
        )


class DiffusersLayout(PeftKeyed):
    name = "diffusers"

    def unit_name(self, arch: BaseArchitecture, targets: Targets) -> str | None:
        if len(targets) != 1:
            return None
        # A model of components names modules `component.path`; one whole model is wrapped as PEFT does.
        return targets[0] if arch.components else WRAPPER + targets[0]

    def carries_full_weights(self, arch: BaseArchitecture | None) -> bool:
        return arch is not None and not arch.components  # a single model's file keeps PEFT's own keys

    def metadata(
        self, units: dict[str, AdapterModule], adapter: Origin, arch: BaseArchitecture | None
    ) -> dict[str, str]:
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
        metadata[DIFFUSERS_CONFIG_KEY] = json.dumps(config, sort_keys=True)
        return metadata
