"""Flux.1: diffusers' `FluxTransformer2DModel` named in Black Forest Labs' single-file layout, with
CLIP-L and T5-XXL text encoders.

BFL's layout differs from diffusers' in more than names, and the differences are data here: q/k/v
(and, in single blocks, the MLP input) are fused into one weight per block, the q/k RMSNorms store
their weight as `scale`, and the final modulation's two row halves are swapped.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta
from ._clip import CLIP_L, clip_component
from ._t5 import T5_XXL, t5_component

ORDER = 40

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# Inside a double-stream block (`transformer_blocks.N` -> `double_blocks.N`): diffusers -> BFL.
FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
# Row blocks of the fused image and text qkv weights.
FLUX_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
# Inside a single-stream block (`single_transformer_blocks.N` -> `single_blocks.N`).
FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
# q/k RMSNorms: BFL keeps them in a QKNorm module and calls their weight `scale`.
FLUX_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
FLUX_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# Row blocks of a single block's fused `linear1`: q, k, v, then the MLP input.
FLUX_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
# Modules outside the blocks.
FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def flux_native(path: str) -> dict:
    """The BFL name of a diffusers Flux transformer module (or its fused weight and row block)."""
    if path == "norm_out.linear":  # BFL orders the modulation (shift, scale); diffusers (scale, shift)
        return {"native": "final_layer.adaLN_modulation.1", "rows": "swap_halves"}
    if path in FLUX_TOP:
        return {"native": FLUX_TOP[path]}
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        if rest in FLUX_DOUBLE_FUSED:
            name, part = FLUX_DOUBLE_FUSED[rest]
            return {"fused": f"double_blocks.{i}.{name}", "part": part}
        if rest in FLUX_DOUBLE_NORMS:
            return bfl_norm(f"double_blocks.{i}.{FLUX_DOUBLE_NORMS[rest]}")
        return {"native": f"double_blocks.{i}.{FLUX_DOUBLE[rest]}"}
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        if rest in FLUX_SINGLE_FUSED:
            return {"fused": f"single_blocks.{i}.linear1", "part": FLUX_SINGLE_FUSED[rest]}
        if rest in FLUX_SINGLE_NORMS:
            return bfl_norm(f"single_blocks.{i}.{FLUX_SINGLE_NORMS[rest]}")
        return {"native": f"single_blocks.{i}.{FLUX_SINGLE[rest]}"}
    raise KeyError(f"no BFL name rule for Flux module {path}")


def bfl_norm(native: str) -> dict:
    """A BFL q/k RMSNorm, whose weight is stored as `scale`."""
    return {"native": native, "weight": native + ".scale"}


def flux_target(path: str) -> str:
    """Everything inside the double and single blocks is a default target; embedders are extra."""
    return "default" if path.startswith(("transformer_blocks.", "single_transformer_blocks.")) else "extra"


def components() -> list[ComponentRows]:
    from diffusers import FluxTransformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: FluxTransformer2DModel(**FLUX_DEV)),
            DIT_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            flux_native,
            flux_target,
        ),
        clip_component(
            "text_encoder",
            "te1",
            CLIP_L,
            with_projection=False,
            openclip=False,
            kohya_prefix="lora_te1_",
            file_prefixes=["", "text_encoders.clip_l.transformer."],
            lora_prefixes=["text_encoders.clip_l.transformer."],
            comfyui="clip_l",
        ),
        t5_component(
            "text_encoder_2",
            "t5",
            T5_XXL,
            # sd-scripts writes T5 as lora_te3_; OneTrainer as lora_te2_ (its CLIP-L is lora_te1_ in both)
            kohya_prefixes=["lora_te3_", "lora_te2_"],
            file_prefixes=["", "text_encoders.t5xxl.transformer."],
            lora_prefixes=["text_encoders.t5xxl.transformer."],
        ),
    ]


FAMILY = TableFamily(
    name="flux1",
    title="Flux.1",
    order=ORDER,
    hints={"ss_base_model_version": ["flux1"], "modelspec.architecture": ["flux-1"]},
    components=components,
    kohya_network_module="networks.lora_flux",
    # img_in: BFL's Depth/Canny LoRAs take 128 channels (64 latent + 64 control image), Fill models and
    # LoRAs 384 (64 latent + 64 masked image + 256 mask)
    widens={"transformer.x_embedder": {128: "FLUX.1 Depth/Canny (control)", 384: "FLUX.1 Fill"}},
)
