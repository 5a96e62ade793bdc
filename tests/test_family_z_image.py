"""Z-Image (issue 21), against diffusers at every step.

- Table: the original (single-file) names, fed through diffusers' own
  `convert_z_image_transformer_checkpoint_to_diffusers` at full size, give back exactly the diffusers
  model's keys, with q/k/v as equal thirds of the fused `attention.qkv` and the q/k norms renamed.
- A LoRA saved by diffusers itself (`ZImageLoraLoaderMixin.save_lora_weights`) on a tiny Z-Image
  transformer (real module names, narrow widths) is read as Z-Image. Our kohya output (musubi-tuner's
  `lora_unet_` + diffusers names) and ComfyUI output (`diffusion_model.` + original names, fused qkv),
  fed through diffusers' Z-Image LoRA converter, give back our diffusers file's update tensor for
  tensor; so do musubi's ComfyUI-converted names (`lora_unet_` + original names), OneTrainer's and
  SimpleTuner's LyCORIS renamings. Merged into the diffusers folder it equals diffusers'
  `load_lora_adapter` + `fuse_lora`; merged into the original single file it equals that after
  diffusers' single-file converter.
- At real widths a Z-Image LoRA is read as Z-Image, in diffusers' and in the original layout (whose
  names Lumina 2's original layout shares).
- A LoRA of qkv alone is told from Lumina 2 by its fused full-size shape, and ai-toolkit's
  `diffusion_model.` + diffusers paths read as diffusers reads them.
"""

from __future__ import annotations

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, assert_single_file_merge_is_fuse, tiny_dit
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import ZImageTransformer2DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402

# head_dim (dim / n_heads = 16) must equal sum(axes_dims); the timestep MLP keeps its fixed 256 -> 1024.
TINY = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=4,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=16,
    axes_dims=(4, 6, 6),
    axes_lens=(16, 16, 16),
)
BLOCK_TARGETS = [
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
]
OTHER_TARGETS = [
    "noise_refiner.0.attention.to_q",
    "noise_refiner.0.attention.to_k",
    "noise_refiner.0.attention.to_v",
    "noise_refiner.0.adaLN_modulation.0",
    "context_refiner.0.attention.to_out.0",
    "context_refiner.0.feed_forward.w2",
    "all_x_embedder.2-1",
    "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder.mlp.0",
    "cap_embedder.1",
]


def test_original_names_and_fused_qkv_match_diffusers_converter() -> None:
    arch = get_architecture("z_image")
    prefix = "model.diffusion_model."  # diffusers' converter strips it; ComfyUI's split file has none
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**_full_config())
    state = model.state_dict()
    checkpoint, expected = {}, {}
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    for marker, spec in enumerate(specs, 1):
        if spec.fused is not None:
            continue
        weight = _rows_marker(marker, spec.shape[0])
        if spec.type == "norm":
            weight = weight[:, 0]
        checkpoint[prefix + spec.native_weight] = expected[spec.path + ".weight"] = weight
        if spec.path + ".bias" in state:
            checkpoint[prefix + spec.native + ".bias"] = weight[:, 0].clone()
    groups = [g for g in arch.fused.values() if g.component == "transformer"]
    for marker, group in enumerate(groups, 10_000):
        parts = [arch.modules[p] for p in group.parts]
        assert group.sizes == ("in", "in", "in") and group.native.endswith(".attention.qkv")
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        checkpoint[prefix + group.weight] = fused
        start = 0
        for spec in parts:
            expected[spec.path + ".weight"] = fused[start : start + spec.shape[0]]
            start += spec.shape[0]
    for pad in ("x_pad_token", "cap_pad_token"):  # parameters, not modules: no rows
        checkpoint[prefix + pad] = torch.zeros(1, 1)
    assert len(groups) == 34  # 30 layers + 2 noise refiners + 2 context refiners
    assert {s.native for s in specs if s.path.startswith(("all_x_embedder", "all_final_layer"))} == {
        "x_embedder",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    }
    assert not [s for s in specs if s.rows]  # no swapped halves: the final modulation is a scale only

    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected) == {k for k in state if k.endswith(".weight")}
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    assert {k for k in converted if k.endswith(".bias")} == {k for k in state if k.endswith(".bias")}


def _full_config() -> dict:
    from loratool.archs.families import z_image

    return z_image.Z_IMAGE


# -- a LoRA diffusers saved, on a tiny Z-Image transformer -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file (ComfyUI's: no prefix); a
    diffusers-saved LoRA; and diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("z_image")
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**TINY)
    single = root / "z_image_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture("z_image"), {"transformer": model})
    for pad in ("x_pad_token", "cap_pad_token"):  # parameters, not modules
        checkpoint[pad] = getattr(model, pad).detach().clone()
    save_file(checkpoint, str(single))
    targets = [f"layers.{i}.{t}" for i in range(TINY["n_layers"]) for t in BLOCK_TARGETS] + OTHER_TARGETS
    with pytest.warns(RuntimeWarning, match="rank_pattern"):  # tiny_dit's proj_out rank: Z-Image has none
        dit = tiny_dit(root, model, "ZImagePipeline", ZImageLoraLoaderMixin, targets)
    return dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused, targets=targets)


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys, alphas folded in)."""
    return {
        key.removesuffix(".lora_A.weight"): state[key.replace(".lora_A.", ".lora_B.")].double() @ down.double()
        for key, down in state.items()
        if key.endswith(".lora_A.weight")
    }


def assert_same_updates(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    assert set(theirs) == set(ours)
    for module, value in theirs.items():
        torch.testing.assert_close(
            value, ours[module].double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
        )


def test_diffusers_lora_is_read_as_z_image(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "z_image"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def comfyui_for_diffusers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ComfyUI file as diffusers' Z-Image LoRA converter can take it: that converter splits a fused
    `attention.qkv` only in the dotted `.lora.down.weight` form (its `lora_down` path would leave a
    `qkv` module the model lacks), so the fused factors get that spelling; the split is exact for our
    block-diagonal factors (each q/k/v chunk of `up` is zero outside its own rank block)."""
    out = {}
    for key, value in tensors.items():
        if ".attention.qkv." in key:
            key = key.replace(".lora_down.weight", ".lora.down.weight").replace(".lora_up.weight", ".lora.up.weight")
        out[key] = value
    return out


def original_to_diffusers_name(module: str) -> str:
    """diffusers' single-file converter's name for an original top-level module (its LoRA converter
    leaves `x_embedder` and `final_layer.*` as they are, names the model does not have)."""
    (key,) = convert_z_image_transformer_checkpoint_to_diffusers({module + ".weight": torch.zeros(1)})
    return key.removesuffix(".weight")


def test_trainer_layouts_through_diffusers_z_image_converter_are_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])  # the scaled updates, by canonical module
    known = {"transformer." + k.removesuffix(".weight") for k in tiny["before"]}
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        first = {"kohya": "lora_unet_layers_0_attention_to_q.", "comfyui": "diffusion_model.layers.0.attention.qkv."}
        assert any(k.startswith(first[to]) for k in tensors), sorted(tensors)[:4]
        assert loratool.inspect(out).architecture == "z_image"
        if to == "comfyui":
            tensors = comfyui_for_diffusers(tensors)
        theirs = updates(_convert_non_diffusers_z_image_lora_to_diffusers(dict(tensors)))  # alpha / r baked in
        if to == "comfyui":
            unknown = set(theirs) - known
            assert {k.removeprefix("transformer.").split(".")[0] for k in unknown} == {"x_embedder", "final_layer"}
            theirs = {
                "transformer." + original_to_diffusers_name(k.removeprefix("transformer.")) if k in unknown else k: v
                for k, v in theirs.items()
            }
        assert_same_updates(theirs, ours)
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        got = deltas(back)
        assert set(got) == set(ours)
        for key in ours:
            torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-7)


def test_musubi_comfyui_converted_names_read_as_the_same_lora(tiny, tmp_path) -> None:
    """musubi-tuner's `convert_z_image_lora_to_comfy`: `lora_unet_` + original names with underscores
    (`..._attention_qkv`, `..._attention_out`), kohya tensor names."""
    from deltas import deltas

    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    renamed = {}
    for key, value in load_file(str(comfy)).items():
        module, _, tensor = key.removeprefix("diffusion_model.").partition(".lora_")
        if not tensor:
            module, _, tensor = module.rpartition(".")  # alpha
            renamed[f"lora_unet_{module.replace('.', '_')}.{tensor}"] = value
        else:
            renamed[f"lora_unet_{module.replace('.', '_')}.lora_{tensor}"] = value
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in renamed
    assert "lora_unet_layers_0_attention_out.lora_up.weight" in renamed
    path = tmp_path / "musubi_comfy.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "z_image"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(
        tiny["single"],
        tiny["lora"],
        tiny["fused"],
        convert_z_image_transformer_checkpoint_to_diffusers,
        tmp_path,
        layouts=("kohya", "comfyui"),
    )


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names (our kohya output is `lora_unet_` + the same)."""
    from deltas import deltas

    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    renamed = {prefix + k.removeprefix("lora_unet_"): v for k, v in load_file(str(kohya)).items()}
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "z_image"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("modules", "rows"),
    [
        # diffusers' names (ai-toolkit, SimpleTuner, diffusers itself)
        (("transformer.layers.{i}.attention.to_q", "transformer.layers.{i}.feed_forward.w1"), (3840, 10240)),
        # the original names (diffusion-pipe, ComfyUI), which Lumina 2's original layout shares
        (("diffusion_model.layers.{i}.attention.qkv", "diffusion_model.layers.{i}.feed_forward.w1"), (11520, 10240)),
    ],
)
def test_real_widths_are_read_as_z_image(tmp_path, modules: tuple[str, str], rows: tuple[int, int]) -> None:
    tensors = {}
    for i in (0, 1):
        for module, out in zip(modules, rows, strict=True):
            name = module.format(i=i)
            suffix = ("lora_A", "lora_B") if name.startswith("transformer.") else ("lora_down", "lora_up")
            tensors[f"{name}.{suffix[0]}.weight"] = torch.zeros(4, 3840)
            tensors[f"{name}.{suffix[1]}.weight"] = torch.zeros(out, 4)
    path = tmp_path / "real.safetensors"
    save_file(tensors, str(path))
    assert loratool.inspect(path).architecture == "z_image"


# -- what the names alone cannot tell, and ai-toolkit's layout ---------------------------------------------------
def test_real_width_fused_qkv_alone_is_read_as_z_image_by_its_shape(tmp_path) -> None:
    """Lumina 2's original layout has the same `layers.N.attention.qkv` names: the fused weight's
    full-size rows (3 x 3840 over 3840 inputs) must decide, not table order."""
    tensors = {}
    for i in (0, 1):
        tensors[f"diffusion_model.layers.{i}.attention.qkv.lora_down.weight"] = torch.zeros(4, 3840)
        tensors[f"diffusion_model.layers.{i}.attention.qkv.lora_up.weight"] = torch.zeros(11520, 4)
    path = tmp_path / "qkv.safetensors"
    save_file(tensors, str(path))
    with loratool.load_adapter(path) as adapter:
        assert adapter.arch.name == "z_image" and not adapter.arch_tied, adapter.arch_reason


def test_ai_toolkit_layout_reads_as_diffusers_reads_it(tiny, tmp_path) -> None:
    """ai-toolkit saves Z-Image LoRAs as `diffusion_model.` + diffusers paths, `lora_A`/`lora_B`, no
    alpha (scale 1): here the same LoRA with each module's scale folded into A."""
    from deltas import deltas

    scales = {m.name: m.scale for m in loratool.inspect(tiny["lora"]).modules}
    renamed = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.rpartition(".lora_")
        scaled = value * scales[module] if factor.startswith("A.") else value
        renamed["diffusion_model." + key.removeprefix("transformer.")] = scaled
    path = tmp_path / "ai_toolkit.safetensors"
    save_file(renamed, str(path))
    report = loratool.inspect(path)
    assert report.architecture == "z_image"
    ours, got = deltas(tiny["lora"]), deltas(path)
    theirs = updates(_convert_non_diffusers_z_image_lora_to_diffusers(dict(renamed)))
    assert_same_updates(theirs, ours)
    assert set(got) == set(ours)
    for key in ours:
        torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-7)
