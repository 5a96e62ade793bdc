"""CLIP text encoders (SD1, SD2, SDXL, Flux): transformers' CLIP models and their single-file names.

CLIP-L (OpenAI's ViT-L/14 text tower) keeps its HF names in single files; the OpenCLIP towers
(SD2's ViT-H, SDXL's bigG) are stored in OpenCLIP's layout, with q/k/v fused into one `in_proj`.
Both are one component builder here, so every family that uses CLIP names it the same way.
"""

from __future__ import annotations

import re

from ._build import ComponentRows, comfyui_text_encoder, component, on_meta, same_name, text_encoder_target

# OpenAI CLIP ViT-L/14's text tower: SD1's encoder, SDXL's first and Flux's CLIP.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)

# OpenCLIP ViT-bigG/14's text tower, as transformers configures it: SDXL's second encoder, SD3's CLIP-G.
OPENCLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)

# Inside an encoder layer: HF name -> OpenCLIP name (q/k/v are handled as the fused in_proj).
OPENCLIP_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}


def openclip_native(path: str) -> dict:
    """OpenCLIP names; q/k/v are row slices of one fused `in_proj_weight`."""
    if path == "text_model.embeddings.token_embedding":
        return {"native": "token_embedding"}
    if path == "text_model.final_layer_norm":
        return {"native": "ln_final"}
    if path == "text_projection":  # OpenCLIP stores the projection as a bare (in, out) parameter
        return {"native": "text_projection", "weight": "text_projection", "transposed": True}
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
    if m:
        i, rest = m.group(1), m.group(2)
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", rest)
        if qkv:
            return {"fused": f"transformer.resblocks.{i}.attn.in_proj", "part": "qkv".index(qkv.group(1))}
        return {"native": f"transformer.resblocks.{i}.{OPENCLIP_PARTS[rest]}"}
    return {}  # position embedding: a bare parameter in OpenCLIP, not a module


def clip_component(
    name: str,
    short: str,
    config: dict,
    *,
    with_projection: bool,
    openclip: bool,
    kohya_prefix: str,
    file_prefixes: list[str],
    lora_prefixes: list[str],
    comfyui: str,
) -> ComponentRows:
    """A CLIP text encoder built from `config` (with the text projection when the family's pipeline
    loads `CLIPTextModelWithProjection`), named in OpenCLIP's layout when `openclip`; `comfyui` is
    ComfyUI's name for it (clip_l, clip_g, clip_h).

    Modules are always named with `text_model.`, as single files and kohya do. transformers 5 dropped
    that level from CLIPTextModel (not from CLIPTextModelWithProjection), so for CLIP-L files written
    by either generation resolve: the level is optional there.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return component(
        name,
        short,
        on_meta(lambda: cls(CLIPTextConfig(**config))),
        [{"prefix": kohya_prefix, "paths": "name"}],
        file_prefixes,
        lora_prefixes,
        openclip_native if openclip else same_name,
        text_encoder_target,
        add_level="text_model.",
        optional_levels=() if with_projection else ("text_model.",),
        comfyui=comfyui_text_encoder(comfyui),
    )
