"""LTX-Video 0.9.x (issue 22), against diffusers at every step.

- Tables: both variants' original (single-file) names, fed through diffusers' own
  `convert_ltx_transformer_checkpoint_to_diffusers` at full size, give back exactly the diffusers
  model's keys, every row where it belongs (no fused weights, no swapped halves in this family).
- A LoRA saved by diffusers itself (`LTXVideoLoraLoaderMixin.save_lora_weights`) on a tiny
  LTX-Video transformer (real module names, narrow widths in the 2B model's proportions) is read as
  LTX-Video 2B. Our ComfyUI output, fed through diffusers' LTX-Video LoRA converter, is the same
  update; our kohya output too, by our own reading (diffusers has no kohya path for LTX-Video).
  Merged into the model's diffusers folder it equals diffusers' `load_lora_adapter` + `fuse_lora`;
  merged into the original single file it equals that after diffusers' single-file converter.
- Real widths pick the variant, and tell LTX-Video from the families with the same module names
  (Anima's Cosmos blocks at 2048, LTX-2's video stream at 4096).
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
from diffusers import LTXVideoTransformer3DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltxv_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import LTXVideoLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers  # noqa: E402

VARIANTS = {"ltx_video": 28, "ltx_video-13b": 48}  # blocks
PREFIX = "model.diffusion_model."
# The 2B model's proportions at width 32: patch embedding 16x its input, cross attention from the
# model's own width, caption projection from twice it (T5-XXL's 4096 into 2048).
TINY = dict(
    in_channels=2,
    out_channels=2,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    num_layers=2,
    caption_channels=64,
)
BLOCK_TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
]
TOP_TARGETS = [
    "proj_in",
    "proj_out",
    "time_embed.linear",
    "time_embed.emb.timestep_embedder.linear_1",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
]


def _config_of(variant: str) -> dict:
    from loratool.archs.families import ltx_video

    return {"ltx_video": ltx_video.LTX_VIDEO_2B, "ltx_video-13b": ltx_video.LTX_VIDEO_13B}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_names_match_diffusers_converter(variant: str) -> None:
    arch = get_architecture(variant)
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    assert not arch.fused and not [s for s in specs if s.rows or s.weight]
    assert sum(1 for s in specs if s.path.endswith(".attn1.to_q")) == VARIANTS[variant]
    checkpoint, expected = {}, {}
    for marker, spec in enumerate(specs, 1):
        rows = spec.shape[0]
        if spec.type == "norm":
            checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = _rows_marker(marker, rows)[:, 0]
            continue
        weight = _rows_marker(marker, rows)
        checkpoint[PREFIX + spec.native_weight] = expected[spec.path + ".weight"] = weight
        checkpoint[PREFIX + spec.native + ".bias"] = weight[:, 0].clone()
    # The (shift, scale) tables are parameters, not modules (no row): the same name in both layouts.
    checkpoint[PREFIX + "scale_shift_table"] = torch.zeros(2, 1)
    for i in range(VARIANTS[variant]):
        checkpoint[PREFIX + f"transformer_blocks.{i}.scale_shift_table"] = torch.zeros(6, 1)
    checkpoint["vae.decoder.conv_in.conv.weight"] = torch.zeros(1)  # the converter leaves the VAE out

    converted = convert_ltx_transformer_checkpoint_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**json.loads(json.dumps(_config_of(variant))))
    assert set(converted) == set(model.state_dict())  # every weight, bias and parameter, nothing else


# -- a LoRA diffusers saved, on a tiny LTX-Video transformer ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file; a diffusers-saved LoRA; and
    diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("ltx_video")
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(**TINY)
    single = root / "ltxv_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture("ltx_video"), {"transformer": model})
    for name, value in model.named_parameters():
        if name.endswith("scale_shift_table"):  # parameters, not modules: no table row
            checkpoint[PREFIX + name] = value.detach().clone()
    save_file(checkpoint, str(single))
    targets = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in BLOCK_TARGETS] + TOP_TARGETS
    dit = tiny_dit(root, model, "LTXPipeline", LTXVideoLoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


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


def test_diffusers_lora_is_read_as_ltx_video_2b(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "ltx_video"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_comfyui_output_through_diffusers_ltx_converter_is_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])
    out = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", out)
    tensors = load_file(str(out))
    for name in ("patchify_proj", "adaln_single.linear", "transformer_blocks.1.attn2.to_k"):
        assert f"diffusion_model.{name}.lora_down.weight" in tensors
    assert loratool.inspect(out).architecture == "ltx_video"
    converted = _convert_non_diffusers_ltxv_lora_to_diffusers(dict(tensors))
    # Quirk: diffusers' LTX-Video LoRA converter only swaps `diffusion_model.` for `transformer.`; the
    # original names outside the blocks (patchify_proj, adaln_single) stay, so it loads only block
    # modules. Its single-file converter's renames complete it (they act on key names alone).
    stripped = {k.removeprefix("transformer."): v for k, v in converted.items()}
    assert {k.split(".")[0] for k in stripped} - {"transformer_blocks", "proj_out", "caption_projection"} == {
        "patchify_proj",
        "adaln_single",
    }
    theirs = updates(convert_ltx_transformer_checkpoint_to_diffusers(stripped))  # kohya tensors: alpha / r
    assert set(theirs) == {k.removeprefix("transformer.") for k in ours}
    for module, value in theirs.items():
        torch.testing.assert_close(value, ours["transformer." + module].double(), rtol=1e-5, atol=1e-7)


def test_kohya_output_is_the_same_update(tiny, tmp_path) -> None:
    """diffusers reads no kohya names for LTX-Video (`LTXVideoLoraLoaderMixin.lora_state_dict` returns
    `lora_unet_` keys as they are, which then load nowhere): the check is our own reading, both ways."""
    from deltas import deltas

    want = deltas(tiny["lora"])
    out = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", out)
    tensors = load_file(str(out))
    assert "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_adaln_single_emb_timestep_embedder_linear_1.alpha" in tensors
    assert set(LTXVideoLoraLoaderMixin.lora_state_dict(dict(tensors))) == set(tensors)
    back = tmp_path / "back.safetensors"
    loratool.convert(out, "diffusers", back)
    for path in (out, back):
        assert loratool.inspect(path).architecture == "ltx_video"
        got = deltas(path)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(
        tiny["single"], tiny["lora"], tiny["fused"], convert_ltx_transformer_checkpoint_to_diffusers, tmp_path
    )


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names."""
    from deltas import deltas

    out = tmp_path / "onetrainer.safetensors"
    loratool.convert(tiny["lora"], "kohya", out)
    arch = get_architecture("ltx_video")
    native = {arch.kohya_name(m): m for m in (f"transformer.{t}" for t in tiny["targets"])}
    renamed = {}
    for key, value in load_file(str(out)).items():
        module, _, suffix = key.partition(".")
        path = native[module].removeprefix("transformer.")
        renamed[f"{prefix}{path.replace('.', '_')}.{suffix}"] = value
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "ltx_video"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


# -- real widths --------------------------------------------------------------------------------------------------
def _zeros_lora(tmp_path, name: str, shapes: dict[str, tuple[int, int]]):
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(4, in_features)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(out_features, 4)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def test_real_widths_pick_the_variant_and_the_family(tmp_path) -> None:
    """Blocks 0-27 are in both tables (and Anima's Cosmos blocks, LTX-2's video stream have the same
    names): the cross attention's key projection from 2048 is the 2B model's (Anima's is from 1024);
    the 13B model's caption projection from 4096 is its own (LTX-2's is from Gemma's 3840)."""
    two_b = {f"transformer_blocks.{i}.attn2.to_k": (2048, 2048) for i in range(2)}
    assert loratool.inspect(_zeros_lora(tmp_path, "2b", two_b)).architecture == "ltx_video"
    thirteen_b = {"transformer_blocks.40.attn2.to_k": (4096, 4096), "caption_projection.linear_1": (4096, 4096)}
    assert loratool.inspect(_zeros_lora(tmp_path, "13b", thirteen_b)).architecture == "ltx_video-13b"


def test_names_and_widths_ltx2_shares_read_as_ltx_video_13b(tmp_path) -> None:
    """A tie the names and shapes cannot break: LTX-2's video self attention is LTX-Video 13B's, name for
    name and width for width; table order gives it to LTX-Video 13B."""
    shared = {f"transformer_blocks.{i}.attn1.to_q": (4096, 4096) for i in range(2)}
    report = loratool.inspect(_zeros_lora(tmp_path, "shared", shared))
    assert report.architecture == "ltx_video-13b"
    assert "ltx2" in report.architecture_reason
