"""HiDream-I1: diffusers' `HiDreamImageTransformer2DModel` (a sparse DiT of 16 dual-stream and 32
single-stream blocks, width 2560, with mixture-of-experts feed-forwards), whose original single-file
names are its diffusers names.

HiDream-ai published the model in diffusers' layout (its own `hi_diffusers` package), so ComfyUI's
checkpoints use the same module paths: diffusers' single-file loader only strips
`model.diffusion_model.` (`convert_hidream_transformer_to_diffusers`) and its LoRA loader only swaps
`diffusion_model.` for `transformer.` (`_convert_non_diffusers_hidream_lora_to_diffusers`). No fused
weights, no swapped rows; the q/k RMSNorms are the only norms with a learned weight.

What is special is the feed-forward: each image-stream `ff_i` is a mixture of experts with shared
experts (`shared_experts.w1/w2/w3`), routed experts (`experts.N.w1/w2/w3`) and a router `ff_i.gate`.
The router's weight is a bare parameter (`MoEGate.weight`, used through `F.linear`), not an
nn.Linear, so no LoRA trainer can adapt it and it is no row; trainers that adapt whole blocks
(diffusion-pipe, ai-toolkit) adapt every expert's Linears, OneTrainer's "attn-mlp" preset
`attn1` and `ff_i`.

HiDream-I1 Full, Dev and Fast share this architecture, and so does HiDream-E1 (editing: it feeds the
reference latents as extra tokens, not extra channels; same config), so their LoRAs all read as
HiDream; only metadata tells them apart. The four text encoders (CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B)
are left out: ai-toolkit, SimpleTuner and diffusion-pipe adapt only the transformer, diffusers'
`HiDreamImageLoraLoaderMixin` loads only the transformer, and OneTrainer adapts them only on request.
No kohya trainer (sd-scripts, musubi-tuner) supports HiDream-I1 (musubi-tuner's HiDream-O1 is a
different model), so kohya files keep sd-scripts' generic `networks.lora`.
"""

from __future__ import annotations

from ._build import DIT_KOHYA, ComponentRows, TableFamily, component, on_meta

ORDER = 100

# transformer/config.json of HiDream-I1 (Full, Dev and Fast) and HiDream-E1-Full, as published on the
# Hugging Face Hub (read from the mirrors deAPI-ai/hidreami1dev and Runware/hidream-e1-full):
# 16 + 32 blocks, 20 heads of 128, 4 routed experts (2 active), T5 and Llama features of width 4096,
# pooled CLIP-L + CLIP-G embedding of width 2048, 2x2 patches of 16 latent channels; llama_layers
# lists which Llama hidden state each block reads (one caption projection per block, plus T5's).
HIDREAM_I1 = dict(
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=16,
    num_single_layers=32,
    attention_head_dim=128,
    num_attention_heads=20,
    caption_channels=[4096, 4096],
    text_emb_dim=2048,
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=(64, 32, 32),
    max_resolution=(128, 128),
    llama_layers=list(range(32)) + [31] * 16,
)


def hidream_target(path: str) -> str:
    """Inside the dual- and single-stream blocks everything is a default target (diffusion-pipe and
    ai-toolkit adapt whole blocks, experts included); embedders, caption projections and the final
    layer are extra."""
    return "default" if path.startswith(("double_stream_blocks.", "single_stream_blocks.")) else "extra"


def components() -> list[ComponentRows]:
    from diffusers import HiDreamImageTransformer2DModel

    return [
        component(
            "transformer",
            "transformer",
            on_meta(lambda: HiDreamImageTransformer2DModel(**HIDREAM_I1)),
            DIT_KOHYA,
            ["", "model.diffusion_model."],
            ["diffusion_model.", "model.diffusion_model.", ""],
            lambda path: {"native": path},
            hidream_target,
        )
    ]


FAMILY = TableFamily(
    name="hidream",
    title="HiDream-I1",
    order=ORDER,
    # ai-toolkit writes ss_base_model_version "hidream_i1" (for E1 too); not "hidream", which would
    # also match HiDream-O1 (musubi-tuner's "hidream_o1_image"), a different model.
    hints={"ss_base_model_version": ["hidream_i1"]},
    components=components,
)
