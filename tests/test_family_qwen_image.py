"""Qwen-Image (issue 21), against diffusers at every step.

A LoRA saved by diffusers itself (`QwenImageLoraLoaderMixin.save_lora_weights`) on a tiny
Qwen-Image transformer (real module names, narrow widths) is read as Qwen-Image. Our kohya
(musubi-tuner's `lora_unet_` names), ComfyUI (`diffusion_model.`) and DiffSynth-Studio (bare names,
`lora_A.default.weight`) outputs, fed through diffusers' own Qwen LoRA converter, give back our
diffusers output's update tensor for tensor. Merged into the model's diffusers folder it equals
diffusers' `load_lora_adapter` + `fuse_lora`; merged into the original single file (diffusers' names,
which diffusers' single-file loader maps with the identity) it equals the same.
"""

from __future__ import annotations

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file

import loratool

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageTransformer2DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin  # noqa: E402

TINY = dict(
    patch_size=2,
    in_channels=8,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(2, 2, 4),
)
BLOCK_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mod.1",
    "txt_mod.1",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
]
TOP_TARGETS = ["img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY)
    single = root / "qwen_tiny.safetensors"  # ComfyUI's split files: diffusers' names, no prefix
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(single))
    targets = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in BLOCK_TARGETS] + TOP_TARGETS
    dit = tiny_dit(root, model, "QwenImagePipeline", QwenImageLoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def updates(state: dict[str, torch.Tensor], scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """module -> B @ A (times its scale) of a diffusers-named LoRA state dict (`transformer.` keys)."""
    out = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = state[module + ".lora_B.weight"]
            out[module.removeprefix("transformer.")] = (up.double() @ down.double()) * (scales or {}).get(module, 1.0)
    return out


def test_diffusers_lora_is_read_as_qwen_image(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "qwen_image"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_trainer_layouts_through_diffusers_qwen_converter_are_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])  # the scaled updates, by canonical module
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        prefix = {
            "kohya": "lora_unet_transformer_blocks_0_attn_to_q.",
            "comfyui": "diffusion_model.transformer_blocks.0.",
        }
        assert any(k.startswith(prefix[to]) for k in tensors), sorted(tensors)[:4]
        assert loratool.inspect(out).architecture == "qwen_image"
        theirs = updates(_convert_non_diffusers_qwen_lora_to_diffusers(dict(tensors)))  # alpha / r baked in
        assert set(theirs) == {k.removeprefix("transformer.") for k in ours}
        for module, value in theirs.items():
            torch.testing.assert_close(value, ours["transformer." + module].double(), rtol=1e-5, atol=1e-7)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_single_file_equals_fuse_lora(tiny, tmp_path) -> None:
    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    for lora in (tiny["lora"], comfy):
        out = tmp_path / f"merged_{lora.stem}.safetensors"
        loratool.merge(tiny["single"], [lora], out, device="cpu")
        got = load_file(str(out))
        for key, value in tiny["fused"].items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_diffsynth_lora_is_read_and_converted_as_diffusers_reads_it(tiny, tmp_path) -> None:
    """DiffSynth-Studio: bare names, PEFT's adapter name in the key, no alpha (scale 1): the same
    LoRA with each module's scale folded into A."""
    from deltas import deltas

    ours = deltas(tiny["lora"])
    scales = {m.name.removeprefix("transformer."): m.scale for m in loratool.inspect(tiny["lora"]).modules}
    diffsynth = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.removeprefix("transformer.").rpartition(".lora_")
        side = factor.split(".")[0]  # A or B
        diffsynth[f"{module}.lora_{side}.default.weight"] = value * scales[module] if side == "A" else value
    path = tmp_path / "diffsynth.safetensors"
    save_file(diffsynth, str(path))
    report = loratool.inspect(path)
    assert report.format == "diffsynth" and report.architecture == "qwen_image"
    assert {m.scale for m in report.modules} == {1.0}
    theirs = updates(_convert_non_diffusers_qwen_lora_to_diffusers(dict(diffsynth)))
    back = tmp_path / "back.safetensors"
    loratool.convert(path, "diffusers", back)
    for got in (deltas(path), deltas(back)):
        assert set(got) == {"transformer." + m for m in theirs}
        for module, value in theirs.items():
            torch.testing.assert_close(got["transformer." + module].double(), value, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(value, ours["transformer." + module].double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names."""
    from deltas import deltas

    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    renamed = {prefix + k.removeprefix("lora_unet_"): v for k, v in load_file(str(kohya)).items()}
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "qwen_image"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)
