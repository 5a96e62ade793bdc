"""Stable Diffusion 3 and 3.5: diffusers' `SD3Transformer2DModel` (MMDiT) named in Stability AI's
single-file layout, with CLIP-L, OpenCLIP bigG and T5-XXL text encoders.

Three variants, each its own table because widths, depth and modules differ: SD3 Medium (24 blocks
of width 1536), SD3.5 Medium (the same widths, with a second image attention `attn2` in blocks 0-12
and q/k RMSNorms) and SD3.5 Large (38 blocks of width 2432, q/k RMSNorms). Names alone often fit
several; detection then goes by the factors' full-size shapes.

In the original layout each block is a `joint_blocks.N` with an image stream `x_block` and a text
stream `context_block`; q/k/v are one fused `qkv` per attention, and the modulation of the last
block's text stream and of the final layer store their (shift, scale) halves in the other order.
Single files keep every text encoder in transformers' own layout under `text_encoders.`.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta
from ._clip import CLIP_L, OPENCLIP_BIGG, clip_component
from ._t5 import T5_XXL, t5_component

ORDER = 50

COMMON = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
)
SD3_MEDIUM = dict(COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = dict(
    COMMON,
    num_layers=38,
    num_attention_heads=38,
    caption_projection_dim=2432,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)

# Outside the blocks: diffusers -> original.
TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
# Inside `transformer_blocks.N` -> `joint_blocks.N`.
BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
# Row blocks of the fused qkv weights: q, k, v.
FUSED = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
}


def native_rule(last_block: int):
    """The original name of a diffusers SD3 module in a model whose last block is `last_block`
    (whose text stream has only a (shift, scale) modulation, stored with its halves swapped)."""

    def native(path: str) -> dict:
        if path == "norm_out.linear":
            return {"native": "final_layer.adaLN_modulation.1", "rows": "swap_halves"}
        if path in TOP:
            return {"native": TOP[path]}
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
        if m is None:
            raise KeyError(f"no original name rule for SD3 module {path}")
        i, rest = int(m.group(1)), m.group(2)
        if rest in FUSED:
            name, part = FUSED[rest]
            return {"fused": f"joint_blocks.{i}.{name}", "part": part}
        if rest == "norm1_context.linear" and i == last_block:
            return {"native": f"joint_blocks.{i}.{BLOCK[rest]}", "rows": "swap_halves"}
        return {"native": f"joint_blocks.{i}.{BLOCK[rest]}"}

    return native


def sd3_target(path: str) -> str:
    """Inside the joint blocks everything is a default target (sd-scripts adapts whole blocks)."""
    return "default" if path.startswith("transformer_blocks.") else "extra"


def components(config: dict) -> list[ComponentRows]:
    from diffusers import SD3Transformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: SD3Transformer2DModel(**config)),
            DIT_KOHYA,
            ["model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            native_rule(config["num_layers"] - 1),
            sd3_target,
        ),
        clip_component(
            "text_encoder",
            "te1",
            CLIP_L,
            with_projection=True,
            openclip=False,
            kohya_prefix="lora_te1_",
            file_prefixes=["text_encoders.clip_l.transformer."],
            lora_prefixes=["text_encoders.clip_l.transformer."],
            comfyui="clip_l",
        ),
        clip_component(
            "text_encoder_2",
            "te2",
            OPENCLIP_BIGG,
            with_projection=True,
            openclip=False,
            kohya_prefix="lora_te2_",
            file_prefixes=["text_encoders.clip_g.transformer."],
            lora_prefixes=["text_encoders.clip_g.transformer."],
            comfyui="clip_g",
        ),
        t5_component(
            "text_encoder_3",
            "t5",
            T5_XXL,
            kohya_prefixes=["lora_te3_"],
            file_prefixes=["text_encoders.t5xxl.transformer."],
            lora_prefixes=["text_encoders.t5xxl.transformer."],
        ),
    ]


def variant(name: str, title: str, order: int, config: dict, architecture: list[str]) -> TableFamily:
    return TableFamily(
        name=name,
        title=title,
        order=order,
        hints={"modelspec.architecture": architecture},
        components=lambda: components(config),
        kohya_network_module="networks.lora_sd3",
    )


# sd-scripts writes modelspec.architecture "stable-diffusion-3" + "-m", "-5-large", ... (prefixes match).
VARIANTS = (
    variant("sd3", "Stable Diffusion 3 Medium", ORDER, SD3_MEDIUM, ["stable-diffusion-3-m"]),
    variant(
        "sd3.5-medium",
        "Stable Diffusion 3.5 Medium",
        ORDER + 2,
        SD35_MEDIUM,
        ["stable-diffusion-3-5-m", "stable-diffusion-3.5-m"],
    ),
    variant(
        "sd3.5-large",
        "Stable Diffusion 3.5 Large",
        ORDER + 4,
        SD35_LARGE,
        ["stable-diffusion-3-5-l", "stable-diffusion-3.5-l"],
    ),
)
