"""Z-Image (Turbo and Base): diffusers' `ZImageTransformer2DModel`, a single-stream DiT of 30 blocks of
width 3840 after two noise-refiner and two context-refiner blocks, named in Tongyi-MAI's original
layout (the files ComfyUI ships).

Z-Image-Turbo and Z-Image (Base) publish the same transformer config, so one table serves both; only
metadata tells their LoRAs apart. The original layout differs from diffusers' in a few names, all data
here: q/k/v are one fused `attention.qkv` per block (equal thirds: n_kv_heads == n_heads, and
diffusers' `Attention` builds k/v as wide as q anyway), the output projection is `attention.out`, the
q/k RMSNorms are `attention.q_norm`/`k_norm`, and the embedder and final layer of the one patch size
are `x_embedder` and `final_layer.*`, not diffusers' `all_x_embedder.2-1` and `all_final_layer.2-1.*`.
No modulation halves are swapped (the final layer's modulation is a scale only, as in diffusers).

musubi-tuner (kohya's trainer for Z-Image) writes `lora_unet_` + diffusers' paths with underscores
(`lora_unet_layers_0_attention_to_q`: its own model is named like diffusers'); its ComfyUI converter
rewrites them to `lora_unet_` + original paths (`..._attention_qkv`, `..._attention_out`). Both
read; kohya output is musubi's. The names overlap Lumina 2's original layout (`layers.N.attention.qkv`,
`feed_forward.w1`): full-size widths (3840 here, 2304 there) tell them apart. Bare original names
(no prefix) are read too, as for Lumina 2. The text encoder (Qwen3-4B) is left
out: trainers do not adapt it.
"""

from __future__ import annotations

import re

from ._build import ComponentRows, TableFamily, component, on_meta

ORDER = 80

# Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image `transformer/config.json` (the values, as copied
# verbatim in several public ports' tests and configs; they equal diffusers' defaults for the class).
Z_IMAGE = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=(32, 48, 48),
    axes_lens=(1536, 512, 512),
)

# Outside the blocks: the levels diffusers adds for its per-patch-size dicts (one patch size, "2-1").
TOP_LEVEL = re.compile(r"all_(x_embedder|final_layer)\.2-1")
# Inside a block (`layers.N`, `noise_refiner.N`, `context_refiner.N`, named alike): diffusers -> original.
BLOCK = {
    "attention.to_out.0": "attention.out",
    "attention.norm_q": "attention.q_norm",
    "attention.norm_k": "attention.k_norm",
}
# Row blocks of the fused `attention.qkv`: q, k, v.
FUSED = {"attention.to_q": 0, "attention.to_k": 1, "attention.to_v": 2}
BLOCK_PATH = re.compile(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)")


def z_image_native(path: str) -> dict:
    """The original name of a diffusers Z-Image module (or its fused qkv and row block)."""
    m = BLOCK_PATH.fullmatch(path)
    if m:
        block, rest = m.groups()
        if rest in FUSED:
            return {"fused": f"{block}.attention.qkv", "part": FUSED[rest]}
        return {"native": f"{block}.{BLOCK.get(rest, rest)}"}
    m = TOP_LEVEL.match(path)
    if m:
        return {"native": m.group(1) + path[m.end() :]}
    return {"native": path}  # t_embedder.mlp.N, cap_embedder.N: the same names


def z_image_target(path: str) -> str:
    """musubi-tuner's default: the attention and MLP Linears of the main blocks (its network excludes
    `_modulation` and `_refiner` modules); the rest is extra."""
    return "default" if path.startswith("layers.") and "adaLN_modulation" not in path else "extra"


# kohya-style namings: musubi-tuner's `lora_unet_` + diffusers paths first (what kohya writes), then
# `lora_unet_` + original paths (musubi's ComfyUI converter, ComfyUI's generic rule), OneTrainer's
# `lora_transformer_` and SimpleTuner's LyCORIS `lycoris_` + diffusers paths.
Z_IMAGE_KOHYA = [
    {"prefix": "lora_unet_", "paths": "name"},
    {"prefix": "lora_unet_", "paths": "native"},
    {"prefix": "lora_transformer_", "paths": "name"},
    {"prefix": "lycoris_", "paths": "name"},
]


def components() -> list[ComponentRows]:
    from diffusers import ZImageTransformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: ZImageTransformer2DModel(**Z_IMAGE)),
            Z_IMAGE_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            z_image_native,
            z_image_target,
        )
    ]


FAMILY = TableFamily(
    name="z_image",
    title="Z-Image",
    order=ORDER,
    # musubi-tuner: ss_base_model_version "z_image", modelspec.architecture "Z-Image" (+ "/lora")
    hints={"ss_base_model_version": ["z_image"], "modelspec.architecture": ["Z-Image"]},
    components=components,
    kohya_network_module="networks.lora_zimage",
)
