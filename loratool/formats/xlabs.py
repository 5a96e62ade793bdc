"""XLabs' Flux LoRAs: attention-processor LoRAs on Flux's double (and single) blocks.

`double_blocks.N.processor.qkv_lora1.down.weight` etc.; lora1 is the image stream, lora2 the text
stream. A single block's `qkv_lora` covers the q, k, v rows of `linear1` (not its MLP rows). No
alphas: XLabs applies these at scale 1.
"""

from __future__ import annotations

import re

from ..adapter import Adapter
from ..archs import get_architecture
from ..errors import FormatError
from ..io.source import TensorSource
from .base import Claim, Codec, build_modules, split_dotted
from .legacy import legacy_suffixes

PATTERN = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)$")
# (block type, processor LoRA) -> (BFL module path, how many of its row blocks it covers; None = all)
PROCESSOR_TARGETS: dict[tuple[str, str], tuple[str, int | None]] = {
    ("double", "qkv_lora1"): ("double_blocks.{i}.img_attn.qkv", None),
    ("double", "qkv_lora2"): ("double_blocks.{i}.txt_attn.qkv", None),
    ("double", "proj_lora1"): ("double_blocks.{i}.img_attn.proj", None),
    ("double", "proj_lora2"): ("double_blocks.{i}.txt_attn.proj", None),
    ("single", "qkv_lora"): ("single_blocks.{i}.linear1", 3),
    ("single", "proj_lora"): ("single_blocks.{i}.linear2", None),
}


def native_path(module: str) -> tuple[str, int | None] | None:
    m = PATTERN.match(module)
    if m is None or (m.group(1), m.group(3)) not in PROCESSOR_TARGETS:
        return None
    path, parts = PROCESSOR_TARGETS[(m.group(1), m.group(3))]
    return path.format(i=m.group(2)), parts


class XLabsCodec(Codec):
    name = "xlabs"
    alpha_convention = "none"

    def verdict(self, key: str) -> tuple[str, str] | None:
        split = split_dotted(key, legacy_suffixes())
        return split if split is not None and native_path(split[0]) is not None else None

    def read(self, source: TensorSource, claim: Claim, arch: str | None = None) -> Adapter:
        modules, orphans = build_modules(source, claim.keys, ("legacy",))
        if arch not in (None, "flux1"):
            raise FormatError(f"{source.path}: XLabs processor LoRAs exist only for Flux, not {arch}")
        flux = get_architecture("flux1")
        index = flux.native_index
        for name, module in modules.items():
            path, parts = native_path(name)
            targets = index.get(path, ())
            module.targets = targets[:parts] if parts else targets
            module.component = "transformer" if targets else None
        return Adapter(
            source=source,
            format=self.name,
            variant="processor LoRAs",
            arch=flux,
            arch_reason="XLabs processor names exist only for Flux",
            modules=modules,
            metadata=source.metadata,
            alpha_convention=self.alpha_convention,
            orphans=orphans,
        )
