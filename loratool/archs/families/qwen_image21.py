"""Qwen-Image 2.1: diffusers' `QwenImage21Transformer2DModel`, a single-stream DiT of 32 blocks of width
4096 (32 heads of 128) with one shared modulation projection, named in the layout ComfyUI ships
(Comfy-Org/Qwen-Image-2.1).

That layout is diffusers' own but for one fused weight per block: the SwiGLU gate and up projections
are a single `img_mlp.gate_up`, gate rows first (diffusers' `img_mlp.gate_layer`, then
`img_mlp.proj`), two equal halves of `mlp_ratio` x the input width each. diffusers' single-file
loader splits it with `chunk(2)` and keeps every other name. Nothing else is renamed or swapped:
the final norm's modulation is a scale only, and the zero-centred RMSNorm of the text projection
(`txt_in.text_norm`, applied as `weight + 1`) stores the same tensor in both layouts.

It is not Qwen-Image (the `qwen_image` family): a different, narrower model whose names overlap only
in the attention projections of blocks 0-31 and a few top-level modules (`img_in`, `proj_out`,
`norm_out.linear`, the timestep MLP); its MLP is `img_mlp.net.*`, 2.1's is `img_mlp.{gate_layer,proj,out}`,
and its width is 3072 against 2.1's 4096, so names or full-size shapes tell them apart.

musubi-tuner (`networks.lora_qwen_image_21`) trains the Linears of every block, in its own copy of
the model, named like diffusers' (it splits ComfyUI's `gate_up` on load), so its kohya names are
`lora_unet_` + diffusers paths (`lora_unet_transformer_blocks_0_img_mlp_gate_layer`); ComfyUI's generic
rule reads `lora_unet_` + the single-file paths too (`..._img_mlp_gate_up`, fused). ai-toolkit writes
`diffusion_model.` + diffusers paths and ss_base_model_version "qwen_image_2.1". The text encoder
(Qwen3-VL 8B) is left out: trainers do not adapt it.
"""

from __future__ import annotations

import re

from ._build import ComponentRows, TableFamily, component, on_meta

ORDER = 62

# Qwen/Qwen-Image-2.1 `transformer/config.json`: these values, as copied in public ports' configs and
# tests (several agree); they equal diffusers' defaults for the class. README: "32 Single-Stream DiT
# layers", 7B parameters, a Qwen3-VL 8B text encoder (hidden 4096), a 64-channel VAE.
QWEN_IMAGE_21 = dict(
    patch_size=1,
    in_channels=64,
    out_channels=64,
    num_layers=32,
    attention_head_dim=128,
    num_attention_heads=32,
    context_in_dim=4096,
    mlp_ratio=3,
    axes_dims_rope=(16, 56, 56),
    eps=1e-6,
    causal_condition=True,
)

# Row blocks of ComfyUI's fused SwiGLU input `img_mlp.gate_up`: the gate, then the up projection.
GATE_UP = {"img_mlp.gate_layer": 0, "img_mlp.proj": 1}
BLOCK_PATH = re.compile(r"(transformer_blocks\.\d+)\.(.+)")


def gate_up_sizes(mlp_ratio: int) -> list[str]:
    """Each half of `gate_up` has `mlp_ratio` x the block's width in rows."""
    return [f"in*{mlp_ratio}/1"] * len(GATE_UP)


def qwen21_native(path: str) -> dict:
    """The single-file name of a diffusers Qwen-Image 2.1 module: its own path, or its row block of the
    fused `gate_up`."""
    m = BLOCK_PATH.fullmatch(path)
    if m and m.group(2) in GATE_UP:
        sizes = gate_up_sizes(QWEN_IMAGE_21["mlp_ratio"])
        return {"fused": f"{m.group(1)}.img_mlp.gate_up", "part": GATE_UP[m.group(2)], "sizes": sizes}
    return {"native": path}


def qwen21_target(path: str) -> str:
    """musubi-tuner adapts every Linear of the transformer blocks; the embedders, the shared modulation
    and the output layers are extra."""
    return "default" if path.startswith("transformer_blocks.") else "extra"


# kohya-style namings: musubi-tuner's `lora_unet_` + diffusers paths first (what kohya writes), then
# `lora_unet_` + single-file paths (ComfyUI's generic rule, fused `gate_up`), OneTrainer's
# `lora_transformer_` and SimpleTuner's LyCORIS `lycoris_` + diffusers paths.
QWEN_IMAGE_21_KOHYA = [
    {"prefix": "lora_unet_", "paths": "name"},
    {"prefix": "lora_unet_", "paths": "native"},
    {"prefix": "lora_transformer_", "paths": "name"},
    {"prefix": "lycoris_", "paths": "name"},
]


def components() -> list[ComponentRows]:
    from diffusers import QwenImage21Transformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: QwenImage21Transformer2DModel(**QWEN_IMAGE_21)),
            QWEN_IMAGE_21_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            qwen21_native,
            qwen21_target,
        )
    ]


FAMILY = TableFamily(
    name="qwen_image21",
    title="Qwen-Image 2.1",
    order=ORDER,
    # ai-toolkit writes ss_base_model_version "qwen_image_2.1". "qwen_image_21" is the name musubi-tuner
    # gives the family (its scripts, network module and trainer arch); the value of its
    # ARCHITECTURE_QWEN_IMAGE_21_FULL was not seen.
    hints={"ss_base_model_version": ["qwen_image_2.1", "qwen_image_21"]},
    components=components,
    kohya_network_module="networks.lora_qwen_image_21",
)
