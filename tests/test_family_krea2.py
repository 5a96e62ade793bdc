"""Krea 2 (issue 21), against diffusers at every step.

- Table: the original (single-file) names of every transformer module, fed through diffusers' own
  `convert_krea2_transformer_checkpoint_to_diffusers` at full size (marker rows, RMSNorm weights as
  `.scale`), give back exactly the diffusers model's keys with the right rows. No weight is fused and
  no rows are swapped: the per-block and final modulations are parameter tables, not modules.
- A LoRA saved by diffusers itself (`Krea2LoraLoaderMixin.save_lora_weights`) on a tiny Krea 2
  transformer (real module names, narrow widths, grouped-query attention, one text-fusion block of each
  kind) is read as Krea 2. Our kohya (`lora_unet_` + original names) and ComfyUI (`diffusion_model.` +
  original names) outputs, given to diffusers' Krea 2 LoRA loader in the one spelling it reads, are our
  diffusers file's update tensor for tensor; so is ai-toolkit's PEFT layout (`base_model.model.` +
  original names). Merged into the diffusers folder it equals diffusers' `fuse_lora`; merged into the
  original single file it equals that after diffusers' single-file converter. OneTrainer's and
  SimpleTuner's LyCORIS renamings read as the same LoRA.
- At real widths a Krea 2 LoRA is read as Krea 2, in both layouts. Its width is Flux.2-dev's (6144):
  diffusers-named q/out projections alone fit both; k/v (1536 rows: 12 key/value heads) or metadata decide.
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
from diffusers import Krea2Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import Krea2LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers  # noqa: E402

# hidden 32 = 4 heads of 8 (sum(axes_dims_rope) must equal the head width); 2 key/value heads, so
# to_k/to_v have 16 rows as at full size they have a quarter of q's; text fusion 16 wide, 3 tapped layers.
TINY = dict(
    in_channels=8,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    timestep_embed_dim=16,
    text_hidden_dim=16,
    num_text_layers=3,
    text_num_attention_heads=2,
    text_num_key_value_heads=2,
    text_intermediate_size=24,
    num_layerwise_text_blocks=1,
    num_refiner_text_blocks=1,
    axes_dims_rope=(2, 2, 4),
)
BLOCK_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_gate",
    "attn.to_out.0",
    "ff.gate",
    "ff.up",
    "ff.down",
]
OTHER_TARGETS = [
    "text_fusion.layerwise_blocks.0.attn.to_q",
    "text_fusion.layerwise_blocks.0.ff.down",
    "text_fusion.refiner_blocks.0.attn.to_gate",
    "text_fusion.refiner_blocks.0.attn.to_out.0",
    "text_fusion.projector",
    "img_in",
    "time_embed.linear_1",
    "time_embed.linear_2",
    "time_mod_proj",
    "txt_in.linear_1",
    "txt_in.linear_2",
    "final_layer.linear",
]


def modulation_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The learned modulation tables, parameters rather than modules (no rows), under their original
    names: each block's six vectors flattened into one `mod.lin` (diffusers' converter reshapes it to
    (6, width)); the final layer's (2, width) `last.modulation.lin` as it is."""
    out = {
        f"blocks.{i}.mod.lin": b.scale_shift_table.detach().flatten() for i, b in enumerate(model.transformer_blocks)
    }
    out["last.modulation.lin"] = model.final_layer.scale_shift_table.detach()
    return {k: v.clone().contiguous() for k, v in out.items()}


def test_original_names_match_diffusers_converter() -> None:
    from loratool.archs.families import krea2

    arch = get_architecture("krea2")
    prefix = "model.diffusion_model."  # diffusers' converter strips it; ComfyUI's split file has none
    with torch.device("meta"):
        model = Krea2Transformer2DModel(**krea2.KREA2)
    state = model.state_dict()
    specs = [s for s in arch.modules.values() if s.component == "transformer"]
    assert not arch.fused and not [s for s in specs if s.rows]  # nothing fused, no halves swapped
    checkpoint, expected = {}, {}
    for marker, spec in enumerate(specs, 1):
        weight = _rows_marker(marker, spec.shape[0])
        if spec.type == "norm":
            assert spec.native_weight.endswith(".scale")  # every RMSNorm keeps its weight as `scale`
            weight = weight[:, 0]
        checkpoint[prefix + spec.native_weight] = expected[spec.path + ".weight"] = weight
        if spec.path + ".bias" in state:
            checkpoint[prefix + spec.native + ".bias"] = weight[:, 0].clone()
    width = arch.modules["transformer.img_in"].shape[0]
    for i in range(krea2.KREA2["num_layers"]):  # parameters, not modules: no rows
        checkpoint[f"{prefix}blocks.{i}.mod.lin"] = torch.zeros(6 * width)
    checkpoint[prefix + "last.modulation.lin"] = torch.zeros(2, width)
    # 28 blocks x (prenorm, postnorm, q/k norms) + 4 text-fusion blocks x 4 + txtmlp.0 + last.norm
    assert sum(1 for s in specs if s.type == "norm") == 28 * 4 + 4 * 4 + 2
    assert arch.modules["transformer.transformer_blocks.0.attn.to_k"].shape == (1536, 6144)  # 12 of 48 heads

    converted = convert_krea2_transformer_checkpoint_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected) == {k for k in state if k.endswith(".weight")}
    assert not [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    assert set(converted) == set(state)
    for key in (k for k in state if k.endswith("scale_shift_table")):
        assert converted[key].shape == state[key].shape


# -- a LoRA diffusers saved, on a tiny Krea 2 transformer --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The tiny model as a diffusers folder and as an original single file (ComfyUI's: no prefix); a
    diffusers-saved LoRA; and diffusers' fused weights with it."""
    root = tmp_path_factory.mktemp("krea2")
    torch.manual_seed(0)
    model = Krea2Transformer2DModel(**TINY)
    # Zero-initialized norms and modulation tables would hide a misplaced tensor: make them distinct.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 or name.endswith("scale_shift_table"):
                param.copy_(torch.randn_like(param))
    single = root / "krea2_tiny.safetensors"
    checkpoint = base_checkpoint(get_architecture("krea2"), {"transformer": model})
    checkpoint.update(modulation_tables(model))
    save_file(checkpoint, str(single))
    targets = [f"transformer_blocks.{i}.{t}" for i in range(TINY["num_layers"]) for t in BLOCK_TARGETS] + OTHER_TARGETS
    with pytest.warns(RuntimeWarning, match="rank_pattern"):  # tiny_dit's proj_out rank: Krea 2 has none
        dit = tiny_dit(root, model, "Krea2Pipeline", Krea2LoraLoaderMixin, targets)
    originals = {k.rsplit(".", 1)[0] for k in checkpoint}
    return dict(
        folder=dit.folder,
        single=single,
        lora=dit.lora,
        before=dit.before,
        fused=dit.fused,
        targets=targets,
        originals=originals,
    )


def updates(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> B @ A of a diffusers-named LoRA state dict (`transformer.` keys, scales folded in)."""
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


def for_diffusers_loader(tensors: dict[str, torch.Tensor], originals: set[str]) -> dict[str, torch.Tensor]:
    """A kohya-tensor-named file (`lora_down`/`lora_up`/`alpha`) as diffusers' Krea 2 LoRA loader can
    take it. Its converter (`_convert_non_diffusers_krea2_lora_to_diffusers`) is reached only for keys
    under `diffusion_model.` or `base_model.model.`, reads only `.lora_A.weight`/`.lora_B.weight` and
    has no alpha handling: a `lora_unet_` key is not converted at all, and a `lora_down` or `.alpha` key
    is left over and raises "`state_dict` should be empty". So: `lora_unet_` names are unflattened
    against the original names, the factors respelled, and alpha / rank folded into A."""
    flat = {name.replace(".", "_"): name for name in originals}
    out = {}
    for key, value in tensors.items():
        module, _, tensor = key.partition(".")
        if module.startswith("lora_unet_"):
            module = "diffusion_model." + flat[module.removeprefix("lora_unet_")]
        else:
            module, found, tensor = key.rpartition(".lora_")
            if found:
                tensor = "lora_" + tensor
            else:  # alpha
                module, _, tensor = key.rpartition(".")
        if tensor == "alpha":
            continue
        if tensor == "lora_down.weight":
            alpha = tensors.get(key.replace(".lora_down.weight", ".alpha"))
            scale = 1.0 if alpha is None else float(alpha) / value.shape[0]
            out[f"{module}.lora_A.weight"] = value.float() * scale
        else:
            assert tensor == "lora_up.weight", key
            out[f"{module}.lora_B.weight"] = value.float()
    return out


def test_diffusers_lora_is_read_as_krea2(tiny) -> None:
    report = loratool.inspect(tiny["lora"])
    assert report.format == "diffusers" and report.architecture == "krea2"
    assert {m.name.removeprefix("transformer.") for m in report.modules} == set(tiny["targets"])
    assert not [f for f in report.findings if f.severity == "error"]


def test_kohya_and_comfyui_outputs_through_diffusers_krea2_loader_are_our_diffusers_file(tiny, tmp_path) -> None:
    from deltas import deltas

    ours = deltas(tiny["lora"])  # the scaled updates, by canonical module
    first = {"kohya": "lora_unet_blocks_0_attn_wq.", "comfyui": "diffusion_model.blocks.0.attn.wq."}
    for to in ("kohya", "comfyui"):
        out = tmp_path / f"{to}.safetensors"
        loratool.convert(tiny["lora"], to, out)
        tensors = load_file(str(out))
        assert any(k.startswith(first[to]) for k in tensors), sorted(tensors)[:4]
        assert loratool.inspect(out).architecture == "krea2"
        theirs = updates(Krea2LoraLoaderMixin.lora_state_dict(for_diffusers_loader(tensors, tiny["originals"])))
        assert_same_updates(theirs, ours)
        back = tmp_path / f"{to}_back.safetensors"
        loratool.convert(out, "diffusers", back)
        got = deltas(back)
        assert set(got) == set(ours)
        for key in ours:
            torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_ai_toolkit_layouts_read_as_diffusers_reads_them(tiny, tmp_path, prefix: str) -> None:
    """ai-toolkit: original names under `diffusion_model.` or, in PEFT's spelling, `base_model.model.`
    (the two prefixes diffusers' Krea 2 converter names), `lora_A`/`lora_B`, no alpha (scale 1): here
    our ComfyUI output respelled, its alpha / rank folded into A.

    The `base_model.model.` case NEEDS A LIBRARY CHANGE (loratool/formats/peft.py `_place`): PEFT-keyed
    single files are placed on diffusers paths only, so original names there find no architecture."""
    from deltas import deltas

    comfy = tmp_path / "comfyui.safetensors"
    loratool.convert(tiny["lora"], "comfyui", comfy)
    renamed = {
        prefix + k.removeprefix("diffusion_model."): v
        for k, v in for_diffusers_loader(load_file(str(comfy)), tiny["originals"]).items()
    }
    assert f"{prefix}blocks.0.attn.wq.lora_A.weight" in renamed
    path = tmp_path / "ai_toolkit.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "krea2"
    ours, got = deltas(tiny["lora"]), deltas(path)
    assert_same_updates(updates(Krea2LoraLoaderMixin.lora_state_dict(dict(renamed))), ours)
    assert set(got) == set(ours)
    for key in ours:
        torch.testing.assert_close(got[key], ours[key], rtol=1e-5, atol=1e-7)


def test_merge_into_the_diffusers_folder_equals_fuse_lora(tiny, tmp_path) -> None:
    assert_folder_merge_is_fuse(
        tiny["folder"], tiny["lora"], tiny["before"], tiny["fused"], tiny["targets"], tmp_path / "merged"
    )


def test_merge_into_the_original_single_file_equals_fuse_lora_after_diffusers_converter(tiny, tmp_path) -> None:
    assert_single_file_merge_is_fuse(
        tiny["single"],
        tiny["lora"],
        tiny["fused"],
        convert_krea2_transformer_checkpoint_to_diffusers,
        tmp_path,
        layouts=("kohya", "comfyui"),
    )


@pytest.mark.parametrize("prefix", ["lora_transformer_", "lycoris_"])
def test_onetrainer_and_simpletuner_names_read_as_the_same_lora(tiny, tmp_path, prefix: str) -> None:
    """OneTrainer (`lora_transformer_`) and SimpleTuner's LyCORIS (`lycoris_`): the diffusers path with
    underscores, kohya tensor names."""
    from deltas import deltas

    kohya = tmp_path / "kohya.safetensors"
    loratool.convert(tiny["lora"], "kohya", kohya)
    diffusers_names = {
        m.name: m.name.removeprefix("transformer.").replace(".", "_") for m in loratool.inspect(tiny["lora"]).modules
    }
    assert len(set(diffusers_names.values())) == len(diffusers_names)
    with loratool.load_adapter(kohya) as adapter:
        renamed_modules = {name: diffusers_names[m.targets[0]] for name, m in adapter.modules.items()}
    renamed = {}
    for key, value in load_file(str(kohya)).items():
        module, _, tensor = key.partition(".")
        renamed[f"{prefix}{renamed_modules[module]}.{tensor}"] = value
    assert f"{prefix}transformer_blocks_0_attn_to_q.lora_down.weight" in renamed
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, str(path))
    assert loratool.inspect(path).architecture == "krea2"
    want, got = deltas(tiny["lora"]), deltas(path)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)


# -- real widths ------------------------------------------------------------------------------------------------
def _zeros_lora(path, modules: dict[str, tuple[int, int]], metadata: dict[str, str] | None = None):
    """A rank-4 LoRA of zeros on `modules` ({name: (out, in)}), in blocks 0 and 1."""
    tensors = {}
    for i in (0, 1):
        for module, (rows, cols) in modules.items():
            name = module.format(i=i)
            down, up = ("lora_A", "lora_B") if name.startswith("transformer.") else ("lora_down", "lora_up")
            tensors[f"{name}.{down}.weight"] = torch.zeros(4, cols)
            tensors[f"{name}.{up}.weight"] = torch.zeros(rows, 4)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "modules",
    [
        # diffusers' names: q/k with grouped-query k (Flux.2-dev has the same q, a 6144-row k)
        {
            "transformer.transformer_blocks.{i}.attn.to_q": (6144, 6144),
            "transformer.transformer_blocks.{i}.attn.to_k": (1536, 6144),
        },
        # diffusers' names only Krea 2 has
        {
            "transformer.transformer_blocks.{i}.attn.to_gate": (6144, 6144),
            "transformer.transformer_blocks.{i}.ff.gate": (16384, 6144),
        },
        # the original names: musubi-style kohya and ComfyUI-style
        {"lora_unet_blocks_{i}_attn_wq": (6144, 6144), "lora_unet_blocks_{i}_mlp_down": (6144, 16384)},
        {"diffusion_model.blocks.{i}.attn.wv": (1536, 6144), "diffusion_model.blocks.{i}.attn.wo": (6144, 6144)},
    ],
)
def test_real_widths_are_read_as_krea2(tmp_path, modules: dict[str, tuple[int, int]]) -> None:
    path = _zeros_lora(tmp_path / "real.safetensors", modules)
    with loratool.load_adapter(path) as adapter:
        assert adapter.arch.name == "krea2" and not adapter.arch_tied, adapter.arch_reason


def test_flux2_width_names_alone_tie_and_metadata_decides(tmp_path) -> None:
    """q and out projections of the first blocks, at 6144: Flux.2-dev's diffusers names and full-size
    shapes too, so the names and shapes tie (Flux.2, earlier in table order, is read); Krea 2 trainers'
    metadata decides."""
    modules = {
        "transformer.transformer_blocks.{i}.attn.to_q": (6144, 6144),
        "transformer.transformer_blocks.{i}.attn.to_out.0": (6144, 6144),
    }
    with loratool.load_adapter(_zeros_lora(tmp_path / "bare.safetensors", modules)) as adapter:
        assert {"flux2", "krea2"} <= set(adapter.arch_tied), adapter.arch_reason
    for metadata in ({"ss_base_model_version": "krea2"}, {"modelspec.architecture": "Krea-2/lora"}):
        path = _zeros_lora(tmp_path / "hinted.safetensors", modules, metadata)
        with loratool.load_adapter(path) as adapter:
            assert adapter.arch.name == "krea2" and not adapter.arch_tied, adapter.arch_reason
