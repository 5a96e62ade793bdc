"""LTX-Video 0.9.x: diffusers' `LTXVideoTransformer3DModel` (Lightricks' PixArt-style video DiT: self
attention, cross attention to T5-XXL states and a GELU MLP per block) named in Lightricks' original
single-file layout.

Two variants, each its own table because width and depth differ: the 2B models (0.9.0 to 0.9.6 and
the 0.9.8 2B distilled; 28 blocks of width 2048, cross attention from 2048) and the 13B models (0.9.7
and 0.9.8 13B; 48 blocks of width 4096, cross attention from 4096). Names of blocks 0-27 fit both;
the factors' full-size shapes tell them apart. The 13B widths are LTX-2's video stream's, whose
`transformer_blocks.N.attn1`/`attn2`/`ff` have the same names and shapes: a LoRA of only those
modules fits ltx_video-13b and ltx2 alike (audio modules or metadata decide).

The original layout is diffusers' with four words changed (the reverse of diffusers'
`convert_ltx_transformer_checkpoint_to_diffusers`, as data): the patch embedding `patchify_proj`
(a Linear: the latents are patchified before it, patch size 1), the timestep embedder and its global
modulation `adaln_single` (diffusers' `time_embed`), and the q/k RMSNorms `q_norm`/`k_norm`. No fused
weights, no swapped rows: the per-block and final (shift, scale) tables are `scale_shift_table`
parameters (no module, no row) in both layouts; the block norms and `norm_out` have no weight. The
caption projection is `caption_projection.linear_1`/`linear_2` in both. Official checkpoints keep the
transformer under `model.diffusion_model.` beside the VAE (`vae.`).

Trainers: LTX-Video-Trainer and diffusion-pipe write ComfyUI's `diffusion_model.` + original names,
finetrainers, SimpleTuner and ai-toolkit `transformer.` + diffusers names; no kohya trainer supports
LTX-Video, so the kohya names are the generic `lora_unet_` + original path ComfyUI accepts, and no
metadata hint is known. The text encoder (T5-XXL) is left out: trainers keep it frozen.
"""

from __future__ import annotations

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 230

# Lightricks/LTX-Video transformer/config.json (the diffusers repo of 0.9.0; 0.9.1 to 0.9.6 and the
# 0.9.8 2B distilled ship the same transformer): 32 heads x 64 = 2048, 28 blocks, T5-XXL's 4096-wide
# states projected to 2048 for the cross attention.
LTX_VIDEO_2B = dict(
    in_channels=128,
    out_channels=128,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=32,
    attention_head_dim=64,
    cross_attention_dim=2048,
    num_layers=28,
    caption_channels=4096,
)
# Lightricks/LTX-Video-0.9.7-dev transformer/config.json (0.9.8 13B has the same shapes): 32 heads x 128
# = 4096, 48 blocks, cross attention from 4096.
LTX_VIDEO_13B = dict(LTX_VIDEO_2B, attention_head_dim=128, cross_attention_dim=4096, num_layers=48)

# diffusers' path level -> the original's: the first level of a top-level module, or any level.
TOP_LEVEL = {"proj_in": "patchify_proj", "time_embed": "adaln_single"}
ANY_LEVEL = {"norm_q": "q_norm", "norm_k": "k_norm"}


def renamed(path: str, top_level: dict[str, str], any_level: dict[str, str]) -> str:
    """`path` with its first level renamed by `top_level` and every level by `any_level`."""
    levels = path.split(".")
    levels[0] = top_level.get(levels[0], levels[0])
    return ".".join(any_level.get(level, level) for level in levels)


def ltx_native(path: str) -> dict:
    return {"native": renamed(path, TOP_LEVEL, ANY_LEVEL)}


def ltx_target(path: str) -> str:
    """Inside the blocks everything is a default target (trainers adapt attention and MLP); the
    embedders, modulation and output projection are extra."""
    return "default" if path.startswith("transformer_blocks.") else "extra"


def components(config: dict) -> list[ComponentRows]:
    from diffusers import LTXVideoTransformer3DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: LTXVideoTransformer3DModel(**config)),
            DIT_KOHYA,
            ["model.diffusion_model.", ""],
            ["diffusion_model.", "model.diffusion_model.", ""],
            ltx_native,
            ltx_target,
        )
    ]


def variant(name: str, title: str, order: int, config: dict) -> TableFamily:
    return TableFamily(name=name, title=title, order=order, hints={}, components=lambda: components(config))


VARIANTS = (
    variant("ltx_video", "LTX-Video 2B (0.9.x)", ORDER, LTX_VIDEO_2B),
    variant("ltx_video-13b", "LTX-Video 13B (0.9.7, 0.9.8)", ORDER + 2, LTX_VIDEO_13B),
)
