"""Krea 2: diffusers' `Krea2Transformer2DModel` (Krea's single-stream MMDiT, 28 blocks of width 6144,
12.9B parameters) named in the original layout of `krea-ai/krea-2` (the files Krea and ComfyUI ship:
`blocks.N.attn.wq`, `first`, `last.linear`, `txtfusion.*`).

Krea 2 is its own architecture, trained from scratch: not Flux.1-Krea (a Flux.1-dev fine-tune, whose
LoRAs read as flux1). Its width (6144, 48 heads of 128) is Flux.2-dev's, so diffusers-named LoRAs of
only the q/out projections of the first blocks fit both; k and v tell them apart (grouped-query
attention: 12 key/value heads, so `to_k`/`to_v` have 1536 rows here, 6144 in Flux.2), as do the
modules only Krea 2 has (`attn.to_gate`, the SwiGLU `ff.gate`/`ff.up`/`ff.down`, `text_fusion.*`).

What differs from diffusers' layout is names only, all data here: no fused weights (q, k and v are
separate `wq`/`wk`/`wv` in the original too), no swapped halves (each block's and the final layer's
modulation is a learned parameter table, `mod.lin` / `last.modulation.lin`, not a module), and every
RMSNorm stores its weight as `.scale` (`prenorm`, `postnorm`, `attn.qknorm.qnorm`/`knorm`,
`txtmlp.0`, `last.norm`). The text-fusion stage (two layer-wise and two refiner blocks of width 2560
and a 12 -> 1 `projector`) is part of the transformer and is named the same way under `txtfusion.`.

Trainers: kohya-style files (musubi-tuner's `networks.lora_krea2` and its ports) write `lora_unet_` +
original names with underscores (`lora_unet_blocks_0_attn_wq`); Krea's reference trainer and
ComfyUI-style files `diffusion_model.` + original names; ai-toolkit PEFT's `base_model.model.` +
original names (diffusers' Krea 2 LoRA converter reads both of the last two). The text encoder
(Qwen3-VL-4B, tapped at 12 layers) is left out: trainers adapt only the DiT.
"""

from __future__ import annotations

import re

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 120

# krea/Krea-2-Raw (diffusers' default repo for the family in single_file_utils) transformer config:
# diffusers' class defaults are that model's, and the diffusers-format ports' model cards state the same
# numbers (28 blocks at width 6144, grouped-query attention, 12 tapped Qwen3-VL-4B layers of width
# 2560). Krea-2-Turbo and Krea-2 Base have the same transformer shapes.
KREA2 = dict(
    in_channels=64,
    num_layers=28,
    attention_head_dim=128,
    num_attention_heads=48,
    num_key_value_heads=12,
    intermediate_size=16384,
    timestep_embed_dim=256,
    text_hidden_dim=2560,
    num_text_layers=12,
    text_num_attention_heads=20,
    text_num_key_value_heads=20,
    text_intermediate_size=6912,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=(32, 48, 48),
    rope_theta=1000.0,
    norm_eps=1e-5,
)

# Outside the blocks: diffusers -> original.
TOP = {
    "img_in": "first",
    "time_embed.linear_1": "tmlp.0",
    "time_embed.linear_2": "tmlp.2",
    "time_mod_proj": "tproj.1",
    "txt_in.linear_1": "txtmlp.1",
    "txt_in.linear_2": "txtmlp.3",
    "text_fusion.projector": "txtfusion.projector",
    "final_layer.linear": "last.linear",
}
# Norms outside the blocks (weight stored as `.scale`).
TOP_NORMS = {"txt_in.norm": "txtmlp.0", "final_layer.norm": "last.norm"}
# Blocks: diffusers' block list -> the original's (the same index).
BLOCK_LISTS = {
    "transformer_blocks": "blocks",
    "text_fusion.layerwise_blocks": "txtfusion.layerwise_blocks",
    "text_fusion.refiner_blocks": "txtfusion.refiner_blocks",
}
# Inside a block (main and text-fusion blocks alike): diffusers -> original.
BLOCK = {
    "attn.to_q": "attn.wq",
    "attn.to_k": "attn.wk",
    "attn.to_v": "attn.wv",
    "attn.to_gate": "attn.gate",
    "attn.to_out.0": "attn.wo",
    "ff.gate": "mlp.gate",
    "ff.up": "mlp.up",
    "ff.down": "mlp.down",
}
# The block's RMSNorms (weight stored as `.scale`).
BLOCK_NORMS = {
    "norm1": "prenorm",
    "norm2": "postnorm",
    "attn.norm_q": "attn.qknorm.qnorm",
    "attn.norm_k": "attn.qknorm.knorm",
}
BLOCK_PATH = re.compile(r"(transformer_blocks|text_fusion\.layerwise_blocks|text_fusion\.refiner_blocks)\.(\d+)\.(.+)")


def krea2_native(path: str) -> dict:
    """The original name of a diffusers Krea 2 module."""
    if path in TOP:
        return {"native": TOP[path]}
    if path in TOP_NORMS:
        return _scale_norm(TOP_NORMS[path])
    m = BLOCK_PATH.fullmatch(path)
    if m is None:
        raise KeyError(f"no original name rule for Krea 2 module {path}")
    blocks, i, rest = m.groups()
    stem = f"{BLOCK_LISTS[blocks]}.{i}"
    if rest in BLOCK_NORMS:
        return _scale_norm(f"{stem}.{BLOCK_NORMS[rest]}")
    return {"native": f"{stem}.{BLOCK[rest]}"}


def _scale_norm(native: str) -> dict:
    return {"native": native, "weight": native + ".scale"}


def krea2_target(path: str) -> str:
    """The attention and MLP Linears of the main blocks are the default targets (all a block has:
    its modulation is a parameter table); the text-fusion stage and the embedders are extra."""
    return "default" if path.startswith("transformer_blocks.") else "extra"


def components() -> list[ComponentRows]:
    from diffusers import Krea2Transformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: Krea2Transformer2DModel(**KREA2)),
            DIT_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            krea2_native,
            krea2_target,
        )
    ]


FAMILY = TableFamily(
    name="krea2",
    title="Krea 2",
    order=ORDER,
    # Krea 2 trainers write ss_base_model_version "krea2" (also "krea2_raw"; prefixes match) and
    # modelspec.architecture "krea2"/"Krea-2" (+ "/lora").
    hints={"ss_base_model_version": ["krea2", "Krea-2"], "modelspec.architecture": ["krea2", "Krea-2", "krea-2"]},
    components=components,
    kohya_network_module="networks.lora_krea2",
)
