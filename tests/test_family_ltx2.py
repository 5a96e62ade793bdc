"""LTX-2 and LTX-2.3 (issue 22), against diffusers at every step.

- Tables: both variants' original (single-file) names, fed through diffusers' own
  `convert_ltx2_transformer_to_diffusers` at full size, give back exactly the diffusers model's keys
  (video and audio streams, cross-modal attentions, the six timestep embedders); the same names as
  LoRA keys through diffusers' `_convert_non_diffusers_ltx2_lora_to_diffusers` land on the same modules.
- A LoRA saved by diffusers itself (`LTX2LoraLoaderMixin.save_lora_weights`) on a tiny LTX-2 and a tiny
  LTX-2.3 transformer (real module names, narrow widths) is read as that variant. Our ComfyUI and
  DiffSynth-Studio layouts, fed through diffusers' LTX-2 LoRA converter, are the same update; our kohya
  output too, by our own reading (diffusers has no kohya path for LTX-2). Merged into the model's
  diffusers folder it equals diffusers' `load_lora_adapter` + `fuse_lora`; merged into the original
  single file it equals that after diffusers' single-file converter.
- Real widths and module names tell LTX-2 from LTX-2.3 and from LTX-Video 13B, whose blocks have the
  names and widths of LTX-2's video stream; musubi-tuner's metadata decides where nothing else can.
"""

from __future__ import annotations

import json

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, assert_single_file_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import LTX2VideoTransformer3DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import LTX2LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers  # noqa: E402

VARIANTS = ("ltx2", "ltx2.3")
PREFIX = "model.diffusion_model."
# LTX-2's proportions at video width 32 and audio width 16: patch embeddings 32x and 16x their inputs,
# cross attention from each stream's own width, captions from 15/16 of the video width (Gemma's 3840).
TINY = {
    "ltx2": dict(
        in_channels=1,
        out_channels=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        audio_in_channels=1,
        audio_out_channels=1,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=2,
        caption_channels=30,
    )
}
TINY["ltx2.3"] = dict(
    TINY["ltx2"],
    gated_attn=True,
    cross_attn_mod=True,
    audio_gated_attn=True,
    audio_cross_attn_mod=True,
    use_prompt_embeddings=False,
)
BLOCK_TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "audio_attn1.to_q",
    "attn2.to_k",
    "audio_attn2.to_v",
    "audio_to_video_attn.to_q",
    "audio_to_video_attn.to_k",
    "video_to_audio_attn.to_v",
    "video_to_audio_attn.to_out.0",
    "ff.net.0.proj",
    "audio_ff.net.2",
]
TOP_TARGETS = [
    "proj_in",
    "audio_proj_in",
    "proj_out",
    "audio_proj_out",
    "time_embed.linear",
    "audio_time_embed.emb.timestep_embedder.linear_1",
    "av_cross_attn_video_scale_shift.linear",
    "av_cross_attn_audio_v2a_gate.linear",
]
OWN_TARGETS = {  # modules only one variant has
    "ltx2": ["caption_projection.linear_1", "audio_caption_projection.linear_2"],
    "ltx2.3": [
        "transformer_blocks.0.attn1.to_gate_logits",
        "transformer_blocks.1.audio_to_video_attn.to_gate_logits",
        "prompt_adaln.linear",
        "audio_prompt_adaln.emb.timestep_embedder.linear_2",
    ],
}
# diffusers' single-file converter has no rename for LTX-2.3's prompt modulation (its LoRA converter has).
MISSING_SINGLE_FILE_RENAMES = {
    "audio_prompt_adaln_single.": "audio_prompt_adaln.",
    "prompt_adaln_single.": "prompt_adaln.",
}


def _config_of(variant: str) -> dict:
    from loratool.archs.families import ltx2

    return {"ltx2": ltx2.LTX2, "ltx2.3": ltx2.LTX2_3}[variant]


def _block_parameters(blocks: int, prompt_tables: bool) -> list[str]:
    """The original names of the modulation tables: parameters, not modules (no rows)."""
    names = ["scale_shift_table", "audio_scale_shift_table"]
    per_block = ["scale_shift_table", "audio_scale_shift_table", "scale_shift_table_a2v_ca_video"]
    per_block += ["scale_shift_table_a2v_ca_audio"] + (
        ["prompt_scale_shift_table", "audio_prompt_scale_shift_table"] if prompt_tables else []
    )
    return names + [f"transformer_blocks.{i}.{p}" for i in range(blocks) for p in per_block]


def _single_file_to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' single-file converter, with the renames it lacks for LTX-2.3 (left as they are, its
    `prompt_adaln_single.*` keys would match no module)."""
    converted = convert_ltx2_transformer_to_diffusers(dict(checkpoint))
    out = {}
    for key, value in converted.items():
        for old, new in MISSING_SINGLE_FILE_RENAMES.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        out[key] = value
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_names_match_diffusers_converters(variant: str) -> None:
    arch = get_architecture(variant)
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    assert not arch.fused and not [s for s in specs if s.rows or s.weight]
    assert sum(1 for s in specs if s.path.endswith(".audio_to_video_attn.to_q")) == 48
    checkpoint, expected, lora, lora_expected = {}, {}, {}, {}
    for marker, spec in enumerate(specs, 1):
        rows = spec.shape[0]
        if spec.type == "norm":
            checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = _rows_marker(marker, rows)[:, 0]
            continue
        weight = _rows_marker(marker, rows)
        checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = weight
        checkpoint[PREFIX + spec.native + ".bias"] = weight[:, 0].clone()
        lora[f"diffusion_model.{spec.native}.lora_A.weight"] = weight[:1]
        lora_expected[f"transformer.{spec.path}.lora_A.weight"] = weight[:1]
    config = _config_of(variant)
    for name in _block_parameters(config["num_layers"], variant == "ltx2.3"):
        checkpoint[PREFIX + name] = torch.zeros(2, 1)

    plain = convert_ltx2_transformer_to_diffusers(dict(checkpoint))
    left = {k.split(".")[0] for k in plain if k.split(".")[0].endswith("prompt_adaln_single")}
    assert left == ({"prompt_adaln_single", "audio_prompt_adaln_single"} if variant == "ltx2.3" else set())
    converted = _single_file_to_diffusers(checkpoint)
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**json.loads(json.dumps(config)))
    assert set(converted) == set(model.state_dict())  # every weight, bias and parameter, nothing else

    from_lora = _convert_non_diffusers_ltx2_lora_to_diffusers(dict(lora))
    assert set(from_lora) == set(lora_expected)
    assert not [k for k, v in lora_expected.items() if not torch.equal(from_lora[k], v)]


# -- LoRAs diffusers saved, on a tiny LTX-2 and a tiny LTX-2.3 transformer ----------------------------------------
@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file; a diffusers-saved LoRA; and
    diffusers' fused weights with it."""
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(**TINY[variant])
    single = root / "ltx2_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture(variant), {"transformer": model})
    renamed_tables = {  # diffusers -> original, the rest keep their names
        "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
        "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
    }
    for name, value in model.named_parameters():
        if name.endswith("scale_shift_table"):  # parameters, not modules: no table row
            head, _, last = name.rpartition(".")
            checkpoint[PREFIX + head + ("." if head else "") + renamed_tables.get(last, last)] = value.detach().clone()
    save_file(checkpoint, str(single))
    layers = TINY[variant]["num_layers"]
    targets = [f"transformer_blocks.{i}.{t}" for i in range(layers) for t in BLOCK_TARGETS]
    targets += TOP_TARGETS + OWN_TARGETS[variant]
    dit = tiny_dit(root, model, "LTX2Pipeline", LTX2LoraLoaderMixin, targets)
    return dict(
        variant=variant,
        folder=dit.folder,
        single=single,
        lora=dit.lora,
        before=dit.before,
        fused=dit.fused,
        targets=targets,
    )


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> its scaled update B @ A of a LoRA state dict in PEFT (`lora_A`/`lora_B`, scale 1) or
    kohya (`lora_down`/`lora_up`, scale alpha / rank) tensor names."""
    out = {}
    for key, down in state.items():
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")):
            if key.endswith(a):
                module = key.removesuffix(a)
                alpha = state.get(module + ".alpha")
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
                out[module.removeprefix("transformer.")] = (state[module + b].double() @ down.double()) * scale
    return out


def _assert_same(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    assert set(theirs) == {k.removeprefix("transformer.") for k in ours}
    for module, value in theirs.items():
        torch.testing.assert_close(value, ours["transformer." + module].double(), rtol=1e-5, atol=1e-7)


def test_diffusers_lora_is_read_as_its_variant(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == tiny["variant"]
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_comfyui_output_through_diffusers_ltx2_converter_is_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])
    out = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", out)
    tensors = load_file(str(out))
    for name in (
        "audio_patchify_proj",
        "av_ca_v2a_gate_adaln_single.linear",
        "transformer_blocks.1.audio_to_video_attn.to_k",
    ):
        assert f"diffusion_model.{name}.lora_down.weight" in tensors
    assert loratool.inspect(out).architecture == tiny["variant"]
    # Our ComfyUI files carry kohya tensors (`lora_down`/`lora_up`, `.alpha`); diffusers' converter renames
    # the modules and keeps the tensor names, so the update is up @ down * alpha / rank.
    _assert_same(updates(_convert_non_diffusers_ltx2_lora_to_diffusers(dict(tensors))), ours)


def test_diffsynth_names_through_diffusers_ltx2_converter_are_our_diffusers_file(tiny, tmp_path) -> None:
    """DiffSynth-Studio: bare original names, PEFT's adapter name in the key, no alpha (scale 1): our
    ComfyUI output with each module's scale folded into its down factor."""
    from deltas import deltas

    ours = deltas(tiny["lora"])
    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    tensors = load_file(str(comfy))
    diffsynth = {}
    for key, value in tensors.items():
        module, _, suffix = key.removeprefix("diffusion_model.").rpartition(".lora_")
        if suffix == "down.weight":
            scale = float(tensors[f"diffusion_model.{module}.alpha"]) / value.shape[0]
            diffsynth[f"{module}.lora_A.default.weight"] = value * scale
        elif suffix == "up.weight":
            diffsynth[f"{module}.lora_B.default.weight"] = value
    path = tmp_path / "diffsynth.safetensors"
    save_file(diffsynth, str(path))
    report = loratool.inspect(path)
    assert report.format == "diffsynth" and report.architecture == tiny["variant"]
    # diffusers reads LTX-2 LoRAs only under `diffusion_model.` and without PEFT's adapter name.
    prefixed = {"diffusion_model." + k.replace(".default.", "."): v for k, v in diffsynth.items()}
    theirs = updates(_convert_non_diffusers_ltx2_lora_to_diffusers(prefixed))
    _assert_same(theirs, ours)
    _assert_same({k.removeprefix("transformer."): v.double() for k, v in deltas(path).items()}, ours)


def test_kohya_output_is_the_same_update(tiny, tmp_path) -> None:
    """diffusers reads no kohya names for LTX-2 (`LTX2LoraLoaderMixin.lora_state_dict` returns `lora_unet_`
    keys as they are, which then load nowhere): the check is our own reading, both ways."""
    from deltas import deltas

    want = deltas(tiny["lora"])
    out = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", out)
    tensors = load_file(str(out))
    assert "lora_unet_transformer_blocks_0_audio_to_video_attn_to_q.lora_down.weight" in tensors
    assert "lora_unet_av_ca_video_scale_shift_adaln_single_linear.alpha" in tensors
    assert set(LTX2LoraLoaderMixin.lora_state_dict(dict(tensors))) == set(tensors)
    back = tmp_path / "back.safetensors"
    loratool.convert(out, "diffusers", back)
    for path in (out, back):
        assert loratool.inspect(path).architecture == tiny["variant"]
        got = deltas(path)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(tiny["single"], tiny["lora"], tiny["fused"], _single_file_to_diffusers, tmp_path)


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names."""
    from deltas import deltas

    out = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", out)
    arch = get_architecture(tiny["variant"])
    native = {arch.kohya_name(m): m for m in (f"transformer.{t}" for t in tiny["targets"])}
    renamed = {}
    for key, value in load_file(str(out)).items():
        module, _, suffix = key.partition(".")
        path = native[module].removeprefix("transformer.")
        renamed[f"{prefix}{path.replace('.', '_')}.{suffix}"] = value
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == tiny["variant"]
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


# -- real widths --------------------------------------------------------------------------------------------------
def _zeros_lora(tmp_path, name: str, shapes: dict[str, tuple[int, int]], metadata: dict[str, str] | None = None):
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(4, in_features)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(out_features, 4)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("want", "shapes"),
    [
        # the audio stream and the cross-modal attentions: LTX-2's names only (2.3's too: table order)
        (
            "ltx2",
            {
                "transformer_blocks.0.audio_attn1.to_q": (2048, 2048),
                "transformer_blocks.5.audio_to_video_attn.to_q": (2048, 4096),
            },
        ),
        # a caption projection from Gemma's 3840: LTX-2's, not LTX-Video 13B's (from T5's 4096)
        ("ltx2", {"caption_projection.linear_1": (4096, 3840), "transformer_blocks.0.attn1.to_q": (4096, 4096)}),
        # per-head gates and prompt modulation: LTX-2.3's own modules
        ("ltx2.3", {"transformer_blocks.0.attn1.to_gate_logits": (32, 4096), "prompt_adaln.linear": (8192, 4096)}),
    ],
)
def test_real_widths_and_names_pick_the_variant(tmp_path, want: str, shapes: dict) -> None:
    assert loratool.inspect(_zeros_lora(tmp_path, want, shapes)).architecture == want


def test_musubi_metadata_names_ltx2_where_ltx_video_13b_has_the_same_modules(tmp_path) -> None:
    """LTX-2's video self attention has LTX-Video 13B's names and widths: without metadata table order
    gives it to LTX-Video 13B; musubi-tuner's ss_base_model_version `ltx2_v1` names LTX-2."""
    shared = {f"transformer_blocks.{i}.attn1.to_q": (4096, 4096) for i in range(2)}
    assert loratool.inspect(_zeros_lora(tmp_path, "bare", shared)).architecture == "ltx_video-13b"
    musubi = _zeros_lora(tmp_path, "musubi", shared, {"ss_base_model_version": "ltx2_v1"})
    assert loratool.inspect(musubi).architecture == "ltx2"
