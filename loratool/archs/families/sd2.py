"""Stable Diffusion 2.x: SD1's UNet with wider cross-attention and linear projections, and
OpenCLIP's ViT-H text encoder stored in OpenCLIP's layout.

SD1 and SD2 UNets share every module name; the hints and the full-size shapes recorded here are
what tells them apart.
"""

from __future__ import annotations

from ._build import ComponentRows, TableFamily
from ._clip import clip_component
from ._unet import unet_component
from .sd1 import SD1_UNET

ORDER = 20

SD2_UNET = dict(SD1_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
# OpenCLIP ViT-H/14's text tower with 23 of its 24 layers, as diffusers' SD2 text encoder has it
# (SD2 conditions on the penultimate layer).
OPENCLIP_H = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)


def components() -> list[ComponentRows]:
    return [
        unet_component(SD2_UNET, [{"prefix": "lora_unet_", "paths": "name"}]),
        clip_component(
            "text_encoder",
            "te",
            OPENCLIP_H,
            with_projection=False,
            openclip=True,
            kohya_prefix="lora_te_",
            file_prefixes=["cond_stage_model.model."],
            lora_prefixes=["cond_stage_model.model."],
            comfyui="clip_h",
        ),
    ]


FAMILY = TableFamily(
    name="sd2",
    title="Stable Diffusion 2.x",
    order=ORDER,
    hints={
        "ss_base_model_version": ["sd_v2", "sd_2."],
        "modelspec.architecture": ["stable-diffusion-v2"],
        "ss_v2": ["True"],
    },
    components=components,
)
