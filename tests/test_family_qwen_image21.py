"""Qwen-Image 2.1 (issue 21), against diffusers at every step.

- Table: the single-file names ComfyUI ships (diffusers' names, the SwiGLU gate and up projections
  fused into `img_mlp.gate_up`, gate rows first), fed through diffusers' own
  `convert_qwen_image21_transformer_checkpoint_to_diffusers` at full size, give back exactly the
  diffusers model's keys, each with its own rows.
- A LoRA saved by diffusers itself (`QwenImageLoraLoaderMixin`, which `QwenImage21Pipeline` uses) on a
  tiny Qwen-Image 2.1 transformer (real module names, narrow widths, `mlp_ratio` 3 as published) is
  read as Qwen-Image 2.1. Our kohya output (musubi-tuner's `lora_unet_` + diffusers names) and ComfyUI
  output (`diffusion_model.` + single-file names, fused `gate_up`), fed through diffusers' Qwen LoRA
  converter (written for Qwen-Image 1; its quirks are worked around and named below), give back our
  diffusers file's updates tensor for tensor; so does ai-toolkit's layout. Merged into the diffusers
  folder it equals diffusers' `load_lora_adapter` + `fuse_lora`; merged into the original single file
  it equals that after diffusers' single-file converter.
- OneTrainer, SimpleTuner LyCORIS and ComfyUI-generic kohya names read as the same LoRA.
- At real widths Qwen-Image 2.1 and Qwen-Image (1) LoRAs are told apart in both directions, and from
  the other DiT families.
"""

from __future__ import annotations

import pytest
import torch
from dit_oracle import assert_folder_merge_is_fuse, tiny_dit
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_archs import _rows_marker
from test_merge_diffusers import base_checkpoint

import loratool
from loratool.archs import get_architecture

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImage21Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers  # noqa: E402

ARCH = "qwen_image21"
# head_dim 8 = sum(axes_dims_rope); mlp_ratio stays the published 3 (the table's `gate_up` halves are
# 3 x the input width); the timestep MLP keeps its fixed 256 inputs.
TINY = dict(
    patch_size=1,
    in_channels=8,
    out_channels=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    context_in_dim=12,
    mlp_ratio=3,
    axes_dims_rope=(2, 2, 4),
)
BLOCK_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "img_mlp.gate_layer",
    "img_mlp.proj",
    "img_mlp.out",
]
TOP_TARGETS = [
    "img_in",
    "txt_in.in_layer",
    "txt_in.out_layer",
    "modulation.1",
    "time_text_embed.timestep_embedder.linear_1",
    "norm_out.linear",
    "proj_out",
]
TARGETS = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in BLOCK_TARGETS] + TOP_TARGETS


def test_original_names_and_fused_gate_up_match_diffusers_converter() -> None:
    arch = get_architecture(ARCH)
    prefix = "model.diffusion_model."  # diffusers' converter strips it; ComfyUI's file has none
    checkpoint, expected = {}, {}
    for marker, spec in enumerate(arch.modules.values(), 1):
        if spec.fused is not None:
            continue
        weight = _rows_marker(marker, spec.shape[0])
        checkpoint[prefix + spec.native_weight] = weight[:, 0] if spec.type == "norm" else weight
        expected[spec.path + ".weight"] = checkpoint[prefix + spec.native_weight]
        assert spec.rows is None and spec.weight is None  # no swapped halves, no `.scale`
    for marker, group in enumerate(arch.fused.values(), 10_000):
        assert group.native.endswith(".img_mlp.gate_up") and group.sizes == ("in*3/1", "in*3/1")
        parts = [arch.modules[p] for p in group.parts]
        assert [p.path.rsplit(".", 1)[1] for p in parts] == ["gate_layer", "proj"]  # gate rows first
        fused = _rows_marker(marker, sum(p.shape[0] for p in parts))
        assert group.row_sizes(parts[0].shape[1], fused.shape[0]) == [p.shape[0] for p in parts]
        checkpoint[prefix + group.weight] = fused
        start = 0
        for spec in parts:
            expected[spec.path + ".weight"] = fused[start : start + spec.shape[0]]
            start += spec.shape[0]
    assert len(arch.fused) == 32
    assert sum(1 for s in arch.modules.values() if s.type == "norm") == 65  # 32 x q/k norms + txt_in.text_norm

    converted = convert_qwen_image21_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert set(converted) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(converted[k], v)]
    from loratool.archs.families.qwen_image21 import QWEN_IMAGE_21

    with torch.device("meta"):
        model = QwenImage21Transformer2DModel(**QWEN_IMAGE_21)
    assert set(converted) == set(model.state_dict())  # every parameter is a module's weight
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(shapes[k][0] == v.shape[0] for k, v in converted.items())


# -- a LoRA diffusers saved, on a tiny Qwen-Image 2.1 transformer -------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as a ComfyUI single file (fused `gate_up`); a
    diffusers-saved LoRA; diffusers' fused weights with it; our kohya and ComfyUI conversions."""
    root = tmp_path_factory.mktemp("qwen21")
    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(**TINY)
    single = root / "qwen21_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture(ARCH), {"transformer": model})
    assert "transformer_blocks.0.img_mlp.gate_up.weight" in checkpoint
    save_file(checkpoint, str(single))
    dit = tiny_dit(root, model, "QwenImage21Pipeline", QwenImageLoraLoaderMixin, TARGETS)
    out = dict(folder=dit.folder, single=single, lora=dit.lora, before=dit.before, fused=dit.fused)
    for to in ("kohya", "comfyui"):
        out[to] = root / f"{to}.safetensors"
        loratool.convert(dit.lora, to, out[to])
    return out


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys, alpha / r baked in)."""
    return {
        key.removesuffix(".lora_A.weight"): state[key.replace(".lora_A.", ".lora_B.")].double() @ down.double()
        for key, down in state.items()
        if key.endswith(".lora_A.weight")
    }


def split_gate_up(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' LoRA converter keeps ComfyUI's fused `img_mlp.gate_up` (a module its model lacks):
    split its update as the single-file converter splits the weight, gate rows first."""
    out = {}
    for module, value in theirs.items():
        if module.endswith(".img_mlp.gate_up"):
            gate, up = value.chunk(2, dim=0)
            out[module.replace("gate_up", "gate_layer")] = gate
            out[module.replace("gate_up", "proj")] = up
        else:
            out[module] = value
    return out


def assert_same_updates(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """Every update of ours in theirs, equal; what theirs has beyond it is zero (a fused weight's rows
    of a module the LoRA leaves alone)."""
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    assert not [k for k in set(theirs) - set(ours) if theirs[k].any()]
    for module, value in ours.items():
        torch.testing.assert_close(
            theirs[module], value.double(), rtol=1e-5, atol=1e-7, msg=lambda m, k=module: f"{k}: {m}"
        )


def test_diffusers_lora_is_read_as_qwen_image21(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == ARCH
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(TARGETS)
    assert not [f for f in report.findings if f.severity == "error"]


# diffusers' Qwen LoRA converter names kohya modules by re-dotting the flattened path with a fixed list
# of Qwen-Image 1 word pairs: 2.1's `img_mlp_gate_layer` comes out `img_mlp.gate.layer`, and top-level
# modules outside its fixed list (`txt_in_in_layer`, `txt_in_out_layer`, `modulation_1`) collapse onto
# each other and make it raise. The kohya file goes through it without those three (the ComfyUI file,
# whose dotted names it keeps, covers them), and `gate.layer` is renamed back.
KOHYA_OUT_OF_REACH = ("lora_unet_txt_in_", "lora_unet_modulation_")


def test_trainer_layouts_through_diffusers_qwen_converter_are_our_diffusers_file(tiny) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])  # the scaled updates, by canonical module
    kohya = load_file(str(tiny["kohya"]))
    assert "lora_unet_transformer_blocks_0_img_mlp_gate_layer.lora_down.weight" in kohya  # musubi-tuner's names
    assert "lora_unet_transformer_blocks_0_attn_to_out_0.alpha" in kohya
    reachable = {k: v for k, v in kohya.items() if not k.startswith(KOHYA_OUT_OF_REACH)}
    theirs = {
        k.replace(".img_mlp.gate.layer", ".img_mlp.gate_layer"): v
        for k, v in updates(_convert_non_diffusers_qwen_lora_to_diffusers(dict(reachable))).items()
    }
    skipped = {m for m in ours if m.removeprefix("transformer.").startswith(("txt_in.", "modulation."))}
    assert skipped == {"transformer.txt_in.in_layer", "transformer.txt_in.out_layer", "transformer.modulation.1"}
    assert_same_updates(theirs, {k: v for k, v in ours.items() if k not in skipped})

    comfy = load_file(str(tiny["comfyui"]))
    assert "diffusion_model.transformer_blocks.0.img_mlp.gate_up.lora_down.weight" in comfy
    assert not [k for k in comfy if ".gate_layer." in k or ".img_mlp.proj." in k]
    theirs = split_gate_up(updates(_convert_non_diffusers_qwen_lora_to_diffusers(dict(comfy))))
    assert_same_updates(theirs, ours)

    for path in (tiny["kohya"], tiny["comfyui"]):
        assert loratool.inspect(path).architecture == ARCH
        got = deltas(path)
        assert set(ours) <= set(got) and not [k for k in set(got) - set(ours) if got[k].any()]
        for key in ours:
            torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-7)


def test_ai_toolkit_layout_reads_as_diffusers_reads_it(tiny, tmp_path) -> None:
    """ai-toolkit saves Qwen-Image 2.1 LoRAs as `diffusion_model.` + diffusers paths (`gate_layer` and
    `proj` apart), `lora_A`/`lora_B`, no alpha (scale 1), ss_base_model_version "qwen_image_2.1": here
    the same LoRA with each module's scale folded into A."""
    from deltas import deltas

    scales = {m.name: m.scale for m in loratool.inspect(tiny["lora"]).modules}
    renamed = {}
    for key, value in load_file(str(tiny["lora"])).items():
        module, _, factor = key.rpartition(".lora_")
        scaled = value * scales[module] if factor.startswith("A.") else value
        renamed["diffusion_model." + key.removeprefix("transformer.")] = scaled
    path = tmp_path / "ai_toolkit.safetensors"
    save_file(renamed, str(path), metadata={"ss_base_model_version": "qwen_image_2.1"})
    assert loratool.inspect(path).architecture == ARCH
    ours, got = deltas(tiny["lora"]), deltas(path)
    assert_same_updates(updates(_convert_non_diffusers_qwen_lora_to_diffusers(dict(renamed))), ours)
    assert set(got) == set(ours)
    for key in ours:
        torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-7)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], TARGETS, tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    for lora in (tiny["lora"], tiny["kohya"], tiny["comfyui"]):
        out = tmp_path / f"merged_{lora.stem}.safetensors"
        loratool.merge(tiny["single"], [lora], out, device="cpu")
        merged = load_file(str(out))
        assert "transformer_blocks.0.img_mlp.gate_up.weight" in merged
        converted = convert_qwen_image21_transformer_checkpoint_to_diffusers(dict(merged))
        assert set(converted) == set(tiny["fused"])
        for key, value in tiny["fused"].items():
            torch.testing.assert_close(converted[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names (our kohya output is `lora_unet_` + the same)."""
    from deltas import deltas

    renamed = {prefix + k.removeprefix("lora_unet_"): v for k, v in load_file(str(tiny["kohya"])).items()}
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == ARCH
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


def test_comfyui_generic_kohya_names_read_as_the_same_lora(tiny, tmp_path) -> None:
    """ComfyUI's generic rule: `lora_unet_` + the single-file path with underscores, so the fused
    `..._img_mlp_gate_up` (kohya tensor names, our ComfyUI file renamed)."""
    from deltas import deltas

    renamed = {}
    for key, value in load_file(str(tiny["comfyui"])).items():
        module, _, tensor = key.removeprefix("diffusion_model.").partition(".lora_")
        if tensor:
            renamed[f"lora_unet_{module.replace('.', '_')}.lora_{tensor}"] = value
        else:
            module, _, tensor = module.rpartition(".")  # alpha
            renamed[f"lora_unet_{module.replace('.', '_')}.{tensor}"] = value
    assert "lora_unet_transformer_blocks_0_img_mlp_gate_up.lora_down.weight" in renamed
    path = tmp_path / "comfy_kohya.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == ARCH
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(want) <= set(got) and not [k for k in set(got) - set(want) if got[k].any()]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


def test_gate_alone_is_written_as_the_whole_gate_up_with_zero_up_rows(tiny, tmp_path) -> None:
    """A LoRA on a block's gate but not its up projection: ComfyUI's `gate_up` is written whole, the up
    rows zero (their count, 3 x the input width, comes from the table's "in*3/1").

    Needs the library change in `loratool/units.py: fuse_group` (an absent part's rows from any
    "in*a/b" size, not only "in"); until then the conversion raises ConversionError."""
    from deltas import deltas

    dropped = "transformer.transformer_blocks.1.img_mlp.proj."
    with safe_open(str(tiny["lora"]), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in list(f.keys()) if not k.startswith(dropped)}
    gate_only = tmp_path / "gate_only.safetensors"
    save_file(tensors, str(gate_only), metadata=metadata)
    comfy = tmp_path / "gate_only_comfyui.safetensors"
    loratool.convert(gate_only, "comfyui", comfy)
    written = load_file(str(comfy))
    up = written["diffusion_model.transformer_blocks.1.img_mlp.gate_up.lora_up.weight"]
    width = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    assert up.shape[0] == 2 * TINY["mlp_ratio"] * width and not up[up.shape[0] // 2 :].any()
    ours = deltas(gate_only)
    assert dropped.removesuffix(".") not in ours
    theirs = split_gate_up(updates(_convert_non_diffusers_qwen_lora_to_diffusers(dict(written))))
    assert_same_updates(theirs, ours)
    out = tmp_path / "merged.safetensors"
    loratool.merge(tiny["single"], [comfy], out, device="cpu")
    converted = convert_qwen_image21_transformer_checkpoint_to_diffusers(dict(load_file(str(out))))
    proj = dropped.removeprefix("transformer.") + "weight"
    torch.testing.assert_close(converted[proj], tiny["before"][proj], rtol=0, atol=1e-6)


# -- real widths: Qwen-Image 2.1 (4096 wide, SwiGLU of 12288) against Qwen-Image (3072 wide) and the rest ------------
def _real_width_file(path, modules: dict[str, tuple[int, int]]) -> None:
    """Two blocks of zero factors (rank 4) at the given full-size (out, in) shapes: kohya tensor names
    for kohya module names and ComfyUI's fused `gate_up`, PEFT's for the rest."""
    tensors = {}
    for i in (0, 1):
        for module, (rows, cols) in modules.items():
            name = module.format(i=i)
            kohya = name.startswith("lora_unet_") or name.endswith(".gate_up")
            down, up = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
            tensors[f"{name}.{down}.weight"] = torch.zeros(4, cols)
            tensors[f"{name}.{up}.weight"] = torch.zeros(rows, 4)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("modules", "want"),
    [
        # diffusers' names (diffusers, SimpleTuner): attention shared with Qwen-Image 1, the SwiGLU 2.1's own
        (
            {
                "transformer.transformer_blocks.{i}.attn.to_q": (4096, 4096),
                "transformer.transformer_blocks.{i}.img_mlp.gate_layer": (12288, 4096),
            },
            ARCH,
        ),
        # ai-toolkit: `diffusion_model.` + diffusers names
        (
            {
                "diffusion_model.transformer_blocks.{i}.attn.to_out.0": (4096, 4096),
                "diffusion_model.transformer_blocks.{i}.img_mlp.out": (4096, 12288),
            },
            ARCH,
        ),
        # musubi-tuner's kohya names
        (
            {
                "lora_unet_transformer_blocks_{i}_attn_to_k": (4096, 4096),
                "lora_unet_transformer_blocks_{i}_img_mlp_proj": (12288, 4096),
            },
            ARCH,
        ),
        # ComfyUI's single-file names: the fused SwiGLU input alone
        ({"diffusion_model.transformer_blocks.{i}.img_mlp.gate_up": (24576, 4096)}, ARCH),
        # the other direction: a Qwen-Image (1) LoRA stays Qwen-Image, in diffusers and in musubi's names
        (
            {
                "transformer.transformer_blocks.{i}.attn.to_q": (3072, 3072),
                "transformer.transformer_blocks.{i}.img_mlp.net.0.proj": (12288, 3072),
            },
            "qwen_image",
        ),
        (
            {
                "lora_unet_transformer_blocks_{i}_attn_to_v": (3072, 3072),
                "lora_unet_transformer_blocks_{i}_img_mod_1": (18432, 3072),
            },
            "qwen_image",
        ),
    ],
)
def test_real_widths_tell_qwen_image21_from_qwen_image_and_the_rest(tmp_path, modules: dict, want: str) -> None:
    path = tmp_path / "real.safetensors"
    _real_width_file(path, modules)
    with loratool.load_adapter(path) as adapter:
        assert adapter.arch.name == want and not adapter.arch_tied, adapter.arch_reason


@pytest.mark.parametrize(("width", "other"), [(4096, "qwen_image"), (3072, ARCH)])
def test_real_width_attention_alone_is_not_read_as_the_other_qwen(tmp_path, width: int, other: str) -> None:
    """Attention projections alone have the same names in both Qwen-Image tables (and in other DiTs'
    diffusers layouts): the full-size width must rule out the other Qwen-Image, whatever the names.
    What the width leaves tied is decided by table order: at 4096 Flux.2 Klein 9B's `to_q`/`to_out.0`
    (order 74, after this family's 62), at 3072 Flux.1, Chroma and Flux.2 Klein 4B with Qwen-Image."""
    path = tmp_path / "attn.safetensors"
    _real_width_file(
        path,
        {
            "transformer.transformer_blocks.{i}.attn.to_q": (width, width),
            "transformer.transformer_blocks.{i}.attn.to_out.0": (width, width),
        },
    )
    with loratool.load_adapter(path) as adapter:
        assert adapter.arch.name != other and other not in adapter.arch_tied, adapter.arch_reason
        if width == 4096:
            assert adapter.arch.name == ARCH, adapter.arch_reason


def test_the_longest_metadata_name_settles_a_tie(tmp_path) -> None:
    """`ss_base_model_version: qwen_image_2.1` (ai-toolkit) starts with Qwen-Image's hint `qwen_image` too:
    the longer, more specific one names the model when the names and widths tie (attention alone at
    4096 fits Qwen-Image 2.1 and FLUX.2 [klein] 9B; here at the narrow widths of a test model, all
    attention-only diffusers-named tables)."""
    path = tmp_path / "narrow.safetensors"
    tensors = {}
    for part in ("attn.to_q", "attn.to_out.0"):
        tensors[f"transformer.transformer_blocks.0.{part}.lora_A.weight"] = torch.zeros(4, 16)
        tensors[f"transformer.transformer_blocks.0.{part}.lora_B.weight"] = torch.zeros(16, 4)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "qwen_image_2.1"})
    with loratool.load_adapter(path) as adapter:
        assert adapter.arch.name == ARCH and "metadata names it" in adapter.arch_reason, adapter.arch_reason
