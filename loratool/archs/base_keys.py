"""A model no table knows: when a base checkpoint is given, its own keys are the table.

A LoRA for a model loratool has no table for (a custom UNet, a torch model wrapped with
`lycoris.create_lycoris`) still names each module after the base's own parameter paths, in one of
the spellings trainers use: kohya's flat names (`lora_unet_` / `lora_te_` / `lycoris_` /
`lora_transformer_` + the path with '.' as '_') or dotted paths, with or without the prefixes trainers
and checkpoints add (`diffusion_model.`, `transformer.`, `base_model.model.`, `model.`). Every such
spelling of every base weight goes into one exact-lookup index; a name that two base weights spell
the same way is refused naming both, never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable

from .hf import HFArchitecture

FLAT_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_", "lycoris_")
DOTTED_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "model.")


def base_key_index(keys: Iterable[str]) -> dict[str, set[str]]:
    """LoRA module name -> the base module paths it can mean (a weight's key without `.weight`)."""
    index: dict[str, set[str]] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        path = key.removesuffix(".weight")
        inner = {path} | {path[len(p) :] for p in DOTTED_PREFIXES if p and path.startswith(p)}
        for variant in inner:
            for prefix in DOTTED_PREFIXES:
                index.setdefault(prefix + variant, set()).add(path)
            flat = variant.replace(".", "_")
            for prefix in FLAT_PREFIXES:
                index.setdefault(prefix + flat, set()).add(path)
    return index


def base_architecture() -> HFArchitecture:
    """The architecture of a LoRA resolved on its base: every module is the base path it names."""
    return HFArchitecture("base checkpoint", None, "base", title="module names found among the base's own keys")
