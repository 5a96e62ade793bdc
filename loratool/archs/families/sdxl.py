"""Stable Diffusion XL: a larger LDM UNet (sgm layout) with CLIP-L and OpenCLIP bigG text encoders.

kohya names SDXL's UNet modules by their sgm paths; files that put diffusers paths after the same
prefix resolve too, so the UNet lists both namings, sgm first (the one loratool writes).
"""

from __future__ import annotations

from ._build import ComponentRows, TableFamily
from ._clip import CLIP_L, OPENCLIP_BIGG, clip_component
from ._unet import unet_component

ORDER = 30

SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def components() -> list[ComponentRows]:
    return [
        unet_component(
            SDXL_UNET, [{"prefix": "lora_unet_", "paths": "native"}, {"prefix": "lora_unet_", "paths": "name"}]
        ),
        clip_component(
            "text_encoder",
            "te1",
            CLIP_L,
            with_projection=False,
            openclip=False,
            kohya_prefix="lora_te1_",
            file_prefixes=["conditioner.embedders.0.transformer."],
            lora_prefixes=["conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer."],
            comfyui="clip_l",
        ),
        clip_component(
            "text_encoder_2",
            "te2",
            OPENCLIP_BIGG,
            with_projection=True,
            openclip=True,
            kohya_prefix="lora_te2_",
            file_prefixes=["conditioner.embedders.1.model."],
            lora_prefixes=["conditioner.embedders.1.model."],
            comfyui="clip_g",
        ),
    ]


FAMILY = TableFamily(
    name="sdxl",
    title="Stable Diffusion XL",
    order=ORDER,
    hints={"ss_base_model_version": ["sdxl"], "modelspec.architecture": ["stable-diffusion-xl"]},
    components=components,
)
