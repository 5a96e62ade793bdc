"""LTX-2: diffusers' `LTX2VideoTransformer3DModel` (Lightricks' audio-video DiT: a video stream of
width 4096 and an audio stream of width 2048 in each of 48 blocks, joined by audio-to-video and
video-to-audio cross attention) named in Lightricks' original single-file layout (ltx-core).

Every module the class builds is a row: per block the video and audio self attention (`attn1`,
`audio_attn1`), prompt cross attention (`attn2`, `audio_attn2`), the two cross-modal attentions
(`audio_to_video_attn`: video queries, audio keys and values; `video_to_audio_attn`) and both MLPs;
outside the blocks both patch embeddings, caption projections, output projections and the six
timestep embedders with their modulation Linears.

Two variants, each its own table because their modules differ (the widths do not): LTX-2 (19B) and
LTX-2.3 (22B; LTX-2.5's transformer has the same modules: its video MLP only drops its bias). 2.3
adds a per-head output gate to every attention (`to_gate_logits`) and timestep modulation of the
prompt cross attention (`prompt_adaln_single`, `audio_prompt_adaln_single`), and drops the caption
projections (its text connector projects per modality). LoRAs of the shared modules fit both and
read as LTX-2 unless metadata or 2.3's own modules say otherwise. LTX-2's video blocks have
LTX-Video 13B's names and shapes (see ltx_video).

The original layout differs from diffusers' in words only (the reverse of diffusers'
`convert_ltx2_transformer_to_diffusers` and `_convert_non_diffusers_ltx2_lora_to_diffusers`, as data):
`patchify_proj`, `adaln_single` (diffusers' `time_embed`), `av_ca_*_adaln_single` for the cross-modal
modulations, `prompt_adaln_single` (2.3), `q_norm`/`k_norm`. No fused weights, no swapped rows: the
(shift, scale, gate) tables are parameters (`scale_shift_table`, `scale_shift_table_a2v_ca_video`,
...), not modules. diffusers' single-file converter lacks 2.3's `prompt_adaln_single` rename; its LoRA
converter has it. Official checkpoints keep the transformer under `model.diffusion_model.` beside
the VAEs, the vocoder and the text connectors.

Trainers: Lightricks' ltx-trainer and diffusion-pipe write ComfyUI's `diffusion_model.` + original
names (PEFT `lora_A`/`lora_B`); musubi-tuner's LTX-2 port (`networks.lora_ltx2`, ss_base_model_version
`ltx2_v1`) `lora_unet_` + original names with underscores; DiffSynth-Studio bare original names;
ai-toolkit, SimpleTuner and finetrainers `transformer.` + diffusers names. Left out: the text
encoder (Gemma 3, frozen) and the text connectors (diffusers' `LTX2TextConnectors`: the
`text_embedding_projection` and the video/audio embedding connectors, a separate model in diffusers).
"""

from __future__ import annotations

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta
from .ltx_video import ANY_LEVEL, renamed

ORDER = 240

# Lightricks/LTX-2 transformer/config.json (LTX-2 19B dev and distilled): video 32 heads x 128 = 4096,
# audio 32 heads x 64 = 2048, 48 blocks, Gemma 3's 3840-wide states into the caption projections.
LTX2 = dict(
    in_channels=128,
    out_channels=128,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=32,
    attention_head_dim=128,
    cross_attention_dim=4096,
    audio_in_channels=128,
    audio_out_channels=128,
    audio_patch_size=1,
    audio_patch_size_t=1,
    audio_num_attention_heads=32,
    audio_attention_head_dim=64,
    audio_cross_attention_dim=2048,
    num_layers=48,
    caption_channels=3840,
)
# diffusers' scripts/convert_ltx2_to_diffusers.py, version "2.3" (Lightricks/LTX-2.3; "2.5" differs only
# in ff_bias=False and a keyframe embedding parameter): gated attention and prompt modulation in both
# streams, no caption projections in the transformer.
LTX2_3 = dict(
    LTX2,
    gated_attn=True,
    cross_attn_mod=True,
    audio_gated_attn=True,
    audio_cross_attn_mod=True,
    use_prompt_embeddings=False,
)

# The first level of a top-level module: diffusers -> original.
TOP_LEVEL = {
    "proj_in": "patchify_proj",
    "audio_proj_in": "audio_patchify_proj",
    "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
    "prompt_adaln": "prompt_adaln_single",
    "audio_prompt_adaln": "audio_prompt_adaln_single",
}


def ltx2_native(path: str) -> dict:
    return {"native": renamed(path, TOP_LEVEL, ANY_LEVEL)}


def ltx2_target(path: str) -> str:
    """Inside the blocks everything is a default target (ltx-trainer adapts the attentions of both
    streams, musubi-tuner whole blocks); embedders, modulation and output projections are extra."""
    return "default" if path.startswith("transformer_blocks.") else "extra"


def components(config: dict) -> list[ComponentRows]:
    from diffusers import LTX2VideoTransformer3DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: LTX2VideoTransformer3DModel(**config)),
            DIT_KOHYA,
            ["model.diffusion_model.", ""],
            ["diffusion_model.", "model.diffusion_model.", ""],
            ltx2_native,
            ltx2_target,
        )
    ]


def variant(name: str, title: str, order: int, config: dict, hints: dict[str, list[str]]) -> TableFamily:
    return TableFamily(
        name=name,
        title=title,
        order=order,
        hints=hints,
        components=lambda: components(config),
        kohya_network_module="networks.lora_ltx2",
    )


# musubi-tuner's LTX-2 port writes ss_base_model_version "ltx2_v1" (its ARCHITECTURE_LTX2_FULL) for both
# versions: the hint goes to LTX-2 only, so it cannot split a tie between the two.
VARIANTS = (
    variant("ltx2", "LTX-2", ORDER, LTX2, {"ss_base_model_version": ["ltx2"]}),
    variant("ltx2.3", "LTX-2.3 / LTX-2.5", ORDER + 2, LTX2_3, {}),
)
