"""DiffSynth-Studio's LoRAs: PEFT's tensors with the adapter's name still in the key
(`blocks.0.self_attn.q.lora_A.default.weight`), under the model's original module names, usually
with no prefix. No alpha: DiffSynth applies them at scale 1 (alpha = rank). Read like ComfyUI's
layout, which is also what convert writes them back as by default.
"""

from __future__ import annotations

from .native import NativeCodec


class DiffSynthCodec(NativeCodec):
    name = "diffsynth"
    alpha_convention = "none"
    schemes = ("diffsynth",)
