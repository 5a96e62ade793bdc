"""PEFT adapter directories: `adapter_model.safetensors` + `adapter_config.json`.

Keys are `base_model.model.<module path>.<tensor>`; rank and alpha come from the config (`r`,
`lora_alpha`/`alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`), never from the header.
"""

from __future__ import annotations

from ..adapter import Adapter
from ..errors import FormatError
from ..io.source import TensorSource
from ..kinds import KINDS
from .base import MODIFIERS, Claim, Codec, build_modules, place_on_architecture, split_dotted, suffixes_longest_first
from .peft_config import pattern_value

WRAPPER = "base_model.model."
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
ALPHA_FIELD = {"lora": "lora_alpha", "loha": "alpha", "lokr": "alpha"}
EMBEDDING_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")


class PeftCodec(Codec):
    name = "peft"
    alpha_convention = "config"

    def _kind_name(self, source: TensorSource) -> str:
        peft_type = (source.config or {}).get("peft_type")
        if peft_type not in PEFT_TYPES:
            supported = ", ".join(PEFT_TYPES)
            raise FormatError(f"{source.path}: PEFT adapter type {peft_type!r} is not supported ({supported} are)")
        return PEFT_TYPES[peft_type]

    def claim(self, source: TensorSource) -> Claim:
        claim = Claim(self)
        if source.container != "peft":
            return claim
        kind = KINDS[self._kind_name(source)]
        suffixes = suffixes_longest_first(kind.names["peft"], MODIFIERS["peft"])
        saved = tuple(source.config.get("modules_to_save") or ())
        for key in source:
            if not key.startswith(WRAPPER):
                continue
            rest = key[len(WRAPPER) :]
            split = split_dotted(rest, suffixes)
            if split is not None:
                claim.keys[key] = split
            elif rest.endswith(".base_layer.weight"):
                claim.extra[key] = "base layer saved with the adapter (PEFT save_embedding_layers)"
            elif _is_saved_module(rest.rsplit(".", 1)[0], saved):
                claim.extra[key] = "modules_to_save: a full trained copy of the module"
        return claim

    def read(self, source: TensorSource, claim: Claim) -> Adapter:
        config = source.config or {}
        kind_name = self._kind_name(source)
        modules, orphans = build_modules(source, claim.keys, ("peft",))
        embeddings = {module for key, (module, suffix) in claim.keys.items() if suffix in EMBEDDING_SUFFIXES}
        for name, module in modules.items():
            module.alpha = float(
                pattern_value(config.get("alpha_pattern"), name, config.get(ALPHA_FIELD[kind_name], 8))
            )
            module.alpha_source = "config"
            module.declared_rank = int(pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))
            module.rslora = bool(config.get("use_rslora", False))
            module.transposed = name in embeddings or bool(config.get("fan_in_fan_out", False))
        found = place_on_architecture(
            modules, "diffusers", source.metadata, hf_name_hint=config.get("base_model_name_or_path") or None
        )
        return Adapter(
            source=source,
            format="peft",
            variant=str(config.get("peft_type")),
            arch=found.arch,
            arch_reason=found.reason,
            modules=modules,
            metadata=source.metadata,
            config=config,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
            extra_keys=dict(claim.extra),
        )


def _is_saved_module(path: str, saved: tuple[str, ...]) -> bool:
    """PEFT's own rule: a module is saved when its name ends with an entry (a plain string suffix,
    so "norm" also saves every "input_layernorm")."""
    return any(path.endswith(m) for m in saved)
