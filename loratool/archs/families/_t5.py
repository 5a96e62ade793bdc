"""T5 encoders (Flux's text_encoder_2, and later families that condition on T5-XXL as well).

transformers' `T5EncoderModel`; single files keep its HF names, so there is no renaming rule.
"""

from __future__ import annotations

from ._build import ComponentRows, comfyui_text_encoder, component, on_meta, same_name, text_encoder_target

# Google's T5 v1.1 XXL encoder.
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)


def t5_component(
    name: str,
    short: str,
    config: dict,
    *,
    kohya_prefixes: list[str],
    file_prefixes: list[str],
    lora_prefixes: list[str],
    comfyui: str = "t5xxl",
) -> ComponentRows:
    """A T5 encoder built from `config`, named by its HF paths everywhere; the first kohya prefix is
    the one written, the others are read too (trainers disagree on the text encoders' numbers)."""
    from transformers import T5Config, T5EncoderModel

    return component(
        name,
        short,
        on_meta(lambda: T5EncoderModel(T5Config(**config))),
        [{"prefix": prefix, "paths": "name"} for prefix in kohya_prefixes],
        file_prefixes,
        lora_prefixes,
        same_name,
        text_encoder_target,
        comfyui=comfyui_text_encoder(comfyui),
    )
