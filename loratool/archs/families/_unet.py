"""The LDM UNet (SD1, SD2, SDXL): diffusers' `UNet2DConditionModel` and its names in single files.

The three families share one UNet design at different sizes, and their single files (CompVis LDM
and Stability's sgm) name its modules the same way: `input_blocks.N.M`, `middle_block.N`,
`output_blocks.N.M`, counted from the config's blocks and layers. The rules below derive those
names; `tests/test_archs.py` checks them against diffusers' own single-file converter.
"""

from __future__ import annotations

import re

from ._build import ComponentRows, component, on_meta

# Where LDM/sgm single files keep the UNet, and what LoRA files with single-file names put before it.
LDM_FILE_PREFIXES = ["model.diffusion_model."]
LDM_LORA_PREFIXES = ["diffusion_model.", "model.diffusion_model."]

# Inside a ResNet block: diffusers name -> LDM name.
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Modules outside the down/mid/up blocks.
UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def unet_native(path: str, config: dict) -> str:
    """The LDM/sgm name of a diffusers UNet module: blocks are renumbered from the config's layers
    per block (one extra slot per level for the down/upsampler); attention blocks keep their inner
    names."""
    lpb = config["layers_per_block"]
    has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    if path in UNET_TOP:
        return UNET_TOP[path]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path)
    if m:
        where, b, part, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if where == "down_blocks":
            if part == "downsamplers":
                return f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op"
            block, inner = 1 + b * (lpb + 1) + layer, 0 if part == "resnets" else 1
            return f"input_blocks.{block}.{inner}.{RESNET_PARTS.get(rest, rest) if inner == 0 else rest}"
        if part == "upsamplers":
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn[b] else 1}.conv"
        block, inner = b * (lpb + 1) + layer, 0 if part == "resnets" else 1
        return f"output_blocks.{block}.{inner}.{RESNET_PARTS.get(rest, rest) if inner == 0 else rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        part, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * layer}.{RESNET_PARTS.get(rest, rest)}"
    raise KeyError(f"no LDM name rule for UNet module {path}")


def unet_target(path: str) -> str:
    """Attention blocks are LoRA's default targets, ResNet and sampler convs LoCon's; the rest extra."""
    if ".attentions." in path:
        return "default"
    if ".resnets." in path or "samplers." in path:
        return "conv"
    return "extra"


def unet_component(config: dict, kohya: list[dict]) -> ComponentRows:
    """The `unet` component of an LDM family built from `config`; `kohya` is the family's naming."""
    from diffusers import UNet2DConditionModel

    return component(
        "unet",
        "unet",
        on_meta(lambda: UNet2DConditionModel(**config)),
        kohya,
        LDM_FILE_PREFIXES,
        LDM_LORA_PREFIXES,
        lambda p: {"native": unet_native(p, config)},
        unet_target,
    )
