"""HunyuanVideo 1.5: diffusers' `HunyuanVideo15Transformer3DModel` (54 dual-stream blocks of width 2048,
no single-stream blocks, a 1x1x1 Conv3d patch embedding) named in Tencent's original single-file layout.

The pinned diffusers has no single-file converter and no LoRA loader for 1.5; the original names are
those of diffusers' conversion script (`scripts/convert_hunyuan_video1_5_to_diffusers.py` in the
diffusers repository, `convert_hyvideo15_transformer_to_diffusers`), which musubi-tuner's
re-implementation (`hunyuan_video_1_5_models.py`) also uses. They follow HunyuanVideo's, with three
differences: a dual-stream block keeps q, k and v apart (`img_attn_q`, `txt_attn_k`, ..., no fused
`img_attn_qkv`), and there are the ByT5 glyph-text projection (`byt5_in`), the SigLIP image projection
(`vision_in.proj`, a Sequential: LayerNorm, Linear, GELU, Linear, LayerNorm) and a condition-type
embedding (`cond_type_embedding`). The token refiner's q/k/v are still one `self_attn_qkv`, and the
final modulation stores its (shift, scale) halves the other way round.

The 480p and 720p, text-to-video and image-to-video transformers (and their step-distilled versions)
have the same modules and shapes: only metadata tells their LoRAs apart. The text encoders (Qwen2.5-VL
and ByT5) are left out: trainers adapt only the transformer.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta
from .hunyuan_video import DOUBLE, FILE_PREFIXES, LORA_PREFIXES, TEXT_IN, hunyuan_target, outside_blocks

ORDER = 220

# hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v transformer/config.json (diffusers'
# conversion script's TRANSFORMER_CONFIGS; 720p and i2v differ only in target_size and task_type).
HUNYUAN_VIDEO15 = dict(
    in_channels=65,
    out_channels=32,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=54,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=1,
    patch_size_t=1,
    qk_norm="rms_norm",
    text_embed_dim=3584,
    text_embed_2_dim=1472,
    image_embed_dim=1152,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
    target_size=640,
    task_type="t2v",
    use_meanflow=False,
)

# Inside a dual-stream block (`transformer_blocks.N` -> `double_blocks.N`): HunyuanVideo's names, with
# q, k and v of each stream apart.
DOUBLE15 = {
    **DOUBLE,
    "attn.to_q": "img_attn_q",
    "attn.to_k": "img_attn_k",
    "attn.to_v": "img_attn_v",
    "attn.add_q_proj": "txt_attn_q",
    "attn.add_k_proj": "txt_attn_k",
    "attn.add_v_proj": "txt_attn_v",
}
# Outside the blocks (the text path and the final layer as in HunyuanVideo, see `outside_blocks`).
TOP15 = {
    "x_embedder.proj": "img_in.proj",
    "image_embedder.norm_in": "vision_in.proj.0",
    "image_embedder.linear_1": "vision_in.proj.1",
    "image_embedder.linear_2": "vision_in.proj.3",
    "image_embedder.norm_out": "vision_in.proj.4",
    "context_embedder_2.norm": "byt5_in.layernorm",
    "context_embedder_2.linear_1": "byt5_in.fc1",
    "context_embedder_2.linear_2": "byt5_in.fc2",
    "context_embedder_2.linear_3": "byt5_in.fc3",
    "time_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "cond_type_embed": "cond_type_embedding",
    "proj_out": "final_layer.linear",
    **TEXT_IN,
}


def hunyuan15_native(path: str) -> dict:
    """The Tencent name of a diffusers HunyuanVideo 1.5 module (or its fused weight and row block)."""
    found = outside_blocks(path, TOP15)
    if found is not None:
        return found
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        return {"native": f"double_blocks.{m.group(1)}.{DOUBLE15[m.group(2)]}"}
    raise KeyError(f"no Tencent name rule for HunyuanVideo 1.5 module {path}")


def components() -> list[ComponentRows]:
    from diffusers import HunyuanVideo15Transformer3DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: HunyuanVideo15Transformer3DModel(**HUNYUAN_VIDEO15)),
            DIT_KOHYA,
            FILE_PREFIXES,
            LORA_PREFIXES,
            hunyuan15_native,
            hunyuan_target,
        )
    ]


FAMILY = TableFamily(
    name="hunyuan_video15",
    title="HunyuanVideo 1.5",
    order=ORDER,
    # musubi-tuner: ss_base_model_version "hunyuan_video_1_5", modelspec.architecture "hunyuan-video-1.5/lora"
    hints={"ss_base_model_version": ["hunyuan_video_1_5"], "modelspec.architecture": ["hunyuan-video-1.5"]},
    components=components,
    kohya_network_module="networks.lora_hv_1_5",
)
