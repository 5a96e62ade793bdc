"""Wan 2.1 / 2.2: diffusers' `WanTransformer3DModel` (and `WanVACETransformer3DModel`) named in the
original Wan-AI single-file layout, which ComfyUI, musubi-tuner, diffusion-pipe and DiffSynth-Studio
LoRAs use.

Seven variants, each its own table because widths, depth, input channels or modules differ:

- Wan 2.1 T2V 1.3B (30 blocks of width 1536) and T2V 14B (40 blocks of width 5120). Wan 2.2 T2V A14B
  is two checkpoints (high-noise and low-noise experts) with exactly the modules and shapes of 2.1 T2V
  14B, so its LoRAs (which ship in pairs) read as `wan2.1-t2v-14b`; only metadata tells them apart.
- Wan 2.1 I2V 14B (480P, 720P; FLF2V 14B too, whose extra `img_emb.emb_pos` is a parameter, not a
  module): 36 input channels, an image cross-attention in every block (diffusers
  `attn2.add_k_proj`/`add_v_proj`/`norm_added_k` = original `cross_attn.k_img`/`v_img`/`norm_k_img`)
  and the CLIP image projection `img_emb.proj` (LayerNorm, Linear, GELU, Linear, LayerNorm).
- Wan 2.2 I2V A14B: 36 input channels but no image cross-attention and no `img_emb`: it differs from
  T2V 14B only in `patch_embedding`'s input width, so a LoRA without that module fits both equally.
- Wan 2.2 TI2V 5B: 30 blocks of width 3072, 48 latent channels in and out.
- Wan 2.1 VACE 1.3B and 14B: the T2V model plus `vace_blocks` (15 of 1.3B's 30 blocks, 8 of 14B's
  40, each a full block with an output projection `after_proj`, the first with an input projection
  `before_proj`) and `vace_patch_embedding` (96 channels). Wan 2.2 VACE-Fun A14B has the shapes of
  2.1 VACE 14B. A LoRA on the main blocks only fits T2V and VACE alike (and the 14B I2V models).

Original names differ from diffusers' in words only (no fused weights, no swapped rows), the rules
being the reverse of diffusers' `convert_wan_transformer_to_diffusers`, as data: `attn1`/`attn2` are
`self_attn`/`cross_attn` with `q`, `k`, `v`, `o`; the feed-forward is `ffn.0`/`ffn.2`; the
affine LayerNorm before the cross-attention is diffusers' `norm2` but the original `norm3` (the
original's `norm2`, before the feed-forward, has no weight); the embedders are `time_embedding.0/2`,
`time_projection.1`, `text_embedding.0/2`; the output layer is `head.head`. The modulations
(`modulation`, `head.modulation`) are parameters, not modules: no rows.

musubi-tuner writes `lora_unet_` + the original path flattened (networks.lora_wan adapts every Linear
in the blocks), ss_base_model_version "wan" and modelspec.architecture "wan2.1/lora" for every
variant, Wan 2.2 included. VideoX-Fun (Wan-Fun) writes `lora_unet__` (two underscores) + the same;
ComfyUI reads both. The text encoder (UMT5-XXL) and the I2V image encoder (CLIP ViT-H) are left out:
trainers do not adapt them.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 200

# Published configs: the transformer/config.json of Wan-AI's `-Diffusers` repos, as diffusers'
# scripts/convert_wan_to_diffusers.py (`get_transformer_config`) writes them. Everything not given here
# (patch_size (1, 2, 2), attention_head_dim 128, freq_dim 256, text_dim 4096, cross_attn_norm, eps 1e-6,
# qk_norm "rms_norm_across_heads") is the same in every variant.
COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
WAN21_T2V_1_3B = dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30)  # Wan2.1-T2V-1.3B
WAN21_T2V_14B = dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # Wan2.1-T2V-14B, 2.2 T2V-A14B
# Wan2.1-I2V-14B-480P / -720P (FLF2V-14B-720P adds pos_embed_seq_len, a parameter)
WAN21_I2V_14B = dict(WAN21_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN22_I2V_A14B = dict(WAN21_T2V_14B, in_channels=36)  # Wan2.2-I2V-A14B, both experts
WAN22_TI2V_5B = dict(
    COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48
)  # Wan2.2-TI2V-5B
# Wan2.1-VACE-1.3B and -14B (Wan2.2-VACE-Fun-A14B has the 14B config)
WAN21_VACE_1_3B = dict(WAN21_T2V_1_3B, vace_layers=list(range(0, 30, 2)), vace_in_channels=96)
WAN21_VACE_14B = dict(WAN21_T2V_14B, vace_layers=list(range(0, 40, 5)), vace_in_channels=96)

# Outside the blocks: diffusers -> original.
TOP = {
    "patch_embedding": "patch_embedding",
    "vace_patch_embedding": "vace_patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
# Inside `blocks.N` and `vace_blocks.N` (same index, same level in both layouts): the attention
# sub-module, then the layer in it.
ATTENTIONS = {"attn1": "self_attn", "attn2": "cross_attn"}
ATTENTION = {
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
    "norm_q": "norm_q",
    "norm_k": "norm_k",
    "add_k_proj": "k_img",
    "add_v_proj": "v_img",
    "norm_added_k": "norm_k_img",
}
BLOCK = {
    "norm2": "norm3",  # the cross-attention's affine LayerNorm: the original calls it norm3
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "proj_in": "before_proj",  # VACE blocks
    "proj_out": "after_proj",
}


def wan_native(path: str) -> dict:
    """The original Wan name of a diffusers Wan (or Wan VACE) transformer module."""
    if path in TOP:
        return {"native": TOP[path]}
    m = re.fullmatch(r"((?:vace_)?blocks\.\d+)\.(.+)", path)
    if m is None:
        raise KeyError(f"no original name rule for Wan module {path}")
    stem, rest = m.group(1), m.group(2)
    if rest in BLOCK:
        return {"native": f"{stem}.{BLOCK[rest]}"}
    attn, _, layer = rest.partition(".")
    return {"native": f"{stem}.{ATTENTIONS[attn]}.{ATTENTION[layer]}"}


def wan_target(path: str) -> str:
    """musubi-tuner adapts every Linear of the attentions and feed-forwards in the blocks (its
    networks.lora_wan excludes embeddings, norms and the head); the rest is extra."""
    return "default" if re.match(r"(vace_)?blocks\.\d+\.(attn1|attn2|ffn)\.", path) else "extra"


# kohya-style namings: sd-scripts/musubi-tuner, OneTrainer and SimpleTuner (DIT_KOHYA), then
# VideoX-Fun's `lora_unet__` + the original path flattened, which ComfyUI also reads for Wan.
WAN_KOHYA = [*DIT_KOHYA, {"prefix": "lora_unet__", "paths": "native"}]


def components(config: dict) -> list[ComponentRows]:
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    cls = WanVACETransformer3DModel if "vace_layers" in config else WanTransformer3DModel
    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: cls(**config)),
            WAN_KOHYA,
            # Wan-AI's and ComfyUI's files keep bare keys; diffusers' loader also strips model.diffusion_model.
            ["", "model.diffusion_model."],
            # ComfyUI, diffusion-pipe: diffusion_model.; DiffSynth-Studio: bare names
            ["diffusion_model.", "model.diffusion_model.", ""],
            wan_native,
            wan_target,
        )
    ]


def variant(name: str, title: str, order: int, config: dict) -> TableFamily:
    return TableFamily(
        name=name,
        title=title,
        order=order,
        # musubi-tuner: ss_base_model_version "wan", modelspec.architecture "wan2.1/lora" for every Wan
        hints={"ss_base_model_version": ["wan"], "modelspec.architecture": ["wan2.1", "wan2.2"]},
        components=lambda: components(config),
        kohya_network_module="networks.lora_wan",  # musubi-tuner
    )


# Tables that share every name a LoRA uses tie on names (and on shapes, when the widths are the same);
# the order puts each plain model before the ones that add modules to it: T2V before VACE, and the
# 2.2 I2V model (36 input channels, nothing else) before 2.1 I2V (which adds the image cross-attention
# that trainers adapt with the rest of the blocks, so a 2.1 I2V LoRA usually names it).
VARIANTS = (
    variant("wan2.1-t2v-1.3b", "Wan 2.1 T2V 1.3B", ORDER, WAN21_T2V_1_3B),
    variant("wan2.1-vace-1.3b", "Wan 2.1 VACE 1.3B", ORDER + 1, WAN21_VACE_1_3B),
    variant("wan2.1-t2v-14b", "Wan 2.1 T2V 14B / Wan 2.2 T2V A14B", ORDER + 2, WAN21_T2V_14B),
    variant("wan2.1-vace-14b", "Wan 2.1 VACE 14B", ORDER + 3, WAN21_VACE_14B),
    variant("wan2.2-i2v-a14b", "Wan 2.2 I2V A14B", ORDER + 4, WAN22_I2V_A14B),
    variant("wan2.1-i2v-14b", "Wan 2.1 I2V 14B", ORDER + 6, WAN21_I2V_14B),
    variant("wan2.2-ti2v-5b", "Wan 2.2 TI2V 5B", ORDER + 8, WAN22_TI2V_5B),
)
