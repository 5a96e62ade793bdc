"""Stable Diffusion 1.x: an LDM UNet and OpenAI's CLIP-L text encoder.

This module holds only what is particular to SD1: the UNet's published config, the prefixes its
single files, kohya and ComfyUI use, and the metadata that names it. How the LDM UNet and CLIP are
named is shared with the other families (`_unet.py`, `_clip.py`).
"""

from __future__ import annotations

from ._build import ComponentRows, TableFamily
from ._clip import CLIP_L, clip_component
from ._unet import unet_component

ORDER = 10

SD1_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def components() -> list[ComponentRows]:
    return [
        unet_component(SD1_UNET, [{"prefix": "lora_unet_", "paths": "name"}]),
        clip_component(
            "text_encoder",
            "te",
            CLIP_L,
            with_projection=False,
            openclip=False,
            kohya_prefix="lora_te_",
            file_prefixes=["cond_stage_model.transformer."],
            lora_prefixes=["cond_stage_model.transformer.", "text_encoders.clip_l.transformer."],
            comfyui="clip_l",
        ),
    ]


FAMILY = TableFamily(
    name="sd1",
    title="Stable Diffusion 1.x",
    order=ORDER,
    hints={"ss_base_model_version": ["sd_v1", "sd_1."], "modelspec.architecture": ["stable-diffusion-v1"]},
    components=components,
)
