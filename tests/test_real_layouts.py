"""Adapter files as real trainers write them (issue 19), read, converted and merged right.

Each layout is built twice: from the header of a real file (`fixtures/headers/`, real keys, shapes
and metadata, seeded values), which loratool must read and report as what it is; and on a tiny model
by the library that writes the layout, so the library itself can say what the file means.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from from_headers import build, header
from safetensors.torch import load_file, save_file
from tiny_models import sd15_unet

import loratool

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


def lora_weights_only(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights under their plain names, once a LoRA is fused into them."""
    return {
        k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k
    }


def unet_folder(tmp: Path) -> Path:
    """A diffusers folder with the tiny UNet's weights, the base both loratool and diffusers change."""
    base = tmp / "base"
    sd15_unet().save_pretrained(base / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (base / "model_index.json").write_text(json.dumps(index))
    return base


# -- diffusers files with PEFT names and no component prefix ---------------------------------------------
NO_PREFIX = "diffusers-peft-names-no-prefix"


@pytest.fixture(scope="module")
def no_prefix_tiny(tmp_path_factory) -> tuple[Path, dict]:
    """What diffusers' SD LoRA training script saves, on the tiny UNet: `get_peft_model_state_dict`
    of the UNet (no `unet.` prefix), its LoraConfig in `lora_adapter_metadata`."""
    tmp = tmp_path_factory.mktemp("no_prefix")
    unet = sd15_unet()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_k", "to_q", "to_v"], init_lora_weights=False)
    unet.add_adapter(config)
    state_dict = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    as_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    path = tmp / "pytorch_lora_weights.safetensors"
    save_file(state_dict, str(path), {"format": "pt", "lora_adapter_metadata": json.dumps(as_dict, sort_keys=True)})
    return path, as_dict


def test_real_no_prefix_file_is_read_as_the_unet_with_its_alphas(tmp_path):
    path = build(NO_PREFIX, tmp_path / "lora.safetensors")
    report = loratool.inspect(path)
    assert (report.format, report.architecture) == ("diffusers", "sd1")
    assert "no component prefix" in report.variant
    modules = report.modules
    assert len(modules) == len(header(NO_PREFIX)["tensors"]) // 2 == 96
    assert {(m.component, m.rank, m.alpha, m.scale) for m in modules} == {("unet", 4, 16.0, 4.0)}
    assert not [f for f in report.findings if f.severity != "info"]
    for to in ("kohya", "diffusers", "peft"):
        out = tmp_path / f"out.{to}"
        loratool.convert(path, to, out)
        back = loratool.inspect(out)
        assert {(m.rank, m.scale) for m in back.modules} == {(4, 4.0)} and len(back.modules) == 96


def test_no_prefix_merge_equals_diffusers_loading_it_without_prefix(no_prefix_tiny, tmp_path):
    path, config = no_prefix_tiny
    reference = sd15_unet()
    reference.load_lora_adapter(load_file(str(path)), prefix=None, metadata=config)
    reference.fuse_lora()
    want = lora_weights_only(reference)

    out = tmp_path / "merged"
    report = loratool.merge(unet_folder(tmp_path), [path], out, device="cpu")
    assert report.loras[0].unmatched == []
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    before = sd15_unet().state_dict()
    assert got.keys() == want.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")
    changed = {k.rsplit(".", 2)[-2] for k in got if not torch.equal(got[k], before[k])}
    assert changed == {"to_q", "to_k", "to_v"}


def test_no_prefix_converted_to_diffusers_loads_through_the_pipeline_loader(no_prefix_tiny, tmp_path):
    """Our `--to diffusers` output carries the `unet.` prefix the pipeline loader filters on, and the
    same factors and alphas."""
    path, config = no_prefix_tiny
    dest = tmp_path / "diffusers.safetensors"
    loratool.convert(path, "diffusers", dest)
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(dest), return_lora_metadata=True)
    assert alphas is None
    unet = sd15_unet()
    unet.load_lora_adapter(state_dict, prefix="unet", metadata=metadata, adapter_name="default")
    loaded = get_peft_model_state_dict(unet)
    original = load_file(str(path))
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert (unet.peft_config["default"].r, unet.peft_config["default"].lora_alpha) == (4, config["lora_alpha"])


# -- SD1 and SD2 share every module name; the factors tell them apart -----------------------------------
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_legacy_sd15_fixture_converts_without_asking_for_the_architecture(tmp_path):
    """Its 1x1-conv `proj_in` factors are 4-D: SD2's `proj_in` is a Linear, so only SD1 fits."""
    src = FIXTURES / "diffusers_legacy_sd15.safetensors"
    report = loratool.inspect(src)
    assert report.architecture == "sd1" and "layer types match" in report.architecture_reason
    out = loratool.convert(src, "diffusers", tmp_path / "out.safetensors")
    assert out.architecture == "sd1" and out.modules_out == 35


@pytest.mark.parametrize(
    ("proj_in_shape", "expected", "tied"),
    [
        ((32, 32, 1, 1), "sd1", []),  # a kohya/PEFT LoRA of a 1x1 conv: only SD1 has one
        ((32, 32), "sd1", ["sd1", "sd2"]),  # LyCORIS flattens 1x1 convs: either could be meant
    ],
)
def test_layer_types_break_an_sd1_sd2_tie(proj_in_shape, expected, tied):
    from loratool.archs import detect

    block = "unet.down_blocks.0.attentions.0"
    names = [f"{block}.proj_in", f"{block}.transformer_blocks.0.attn1.to_q"]
    shapes = {names[0]: proj_in_shape, names[1]: (32, 32)}  # narrow: full-size shapes say nothing
    found = detect(names, "diffusers", {}, shapes.get)
    assert found.arch.name == expected
    assert found.tied == tied


# -- family names in reports ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "targets", "base_name"),
    [("opt", ["q_proj", "v_proj"], "facebook/opt-350m"), ("distilbert", ["q_lin", "v_lin"], None)],
)
def test_peft_adapters_of_common_families_are_named_as_such(tmp_path, family, targets, base_name):
    """PEFT's default targets on OPT (q_proj, v_proj) also fit Llama's paths; a distilbert adapter
    was 'unknown'. Both are reported as the model they are, with and without the config's name."""
    import transformers as tf
    from peft import get_peft_model

    if family == "opt":
        sizes = dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
        model = tf.OPTForCausalLM(tf.OPTConfig(**sizes, word_embed_proj_dim=32))
    else:
        model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for name in [None, base_name] if base_name else [None]:
        config["base_model_name_or_path"] = name
        config_path.write_text(json.dumps(config))
        report = loratool.inspect(tmp_path / "adapter")
        assert report.architecture == family, (name, report.architecture_reason)


# -- OneTrainer's Flux files name T5 lora_te2_ ----------------------------------------------------------
def onetrainer_t5_names() -> list[str]:
    """Every T5-XXL module OneTrainer trains, as it names them: 24 blocks x 7 = 168 modules."""
    parts = [f"layer_0_SelfAttention_{p}" for p in "qkvo"] + [
        f"layer_1_DenseReluDense_{p}" for p in ("wi_0", "wi_1", "wo")
    ]
    return [f"lora_te2_encoder_block_{i}_{p}" for i in range(24) for p in parts]


def test_onetrainer_flux_t5_modules_are_read_and_written_back_as_kohya_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    shapes = {"wi_0": (10240, 4096), "wi_1": (10240, 4096), "wo": (4096, 10240), "attn_proj": (3072, 3072)}
    for name in [*onetrainer_t5_names(), "lora_unet_double_blocks_0_img_attn_proj"]:
        out, inp = next((v for k, v in shapes.items() if name.endswith(k)), (4096, 4096))
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, inp, generator=g, dtype=torch.float32).to(torch.bfloat16)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g, dtype=torch.float32).to(torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "onetrainer_flux.safetensors"
    save_file(tensors, str(path))
    report = loratool.inspect(path)
    assert report.architecture == "flux1"
    assert not [f for f in report.findings if f.code in ("unknown-key", "orphan-tensor")]
    assert sum(1 for m in report.modules if m.component == "t5") == 168
    loratool.convert(path, "diffusers", tmp_path / "diffusers.safetensors")
    keys = load_file(str(tmp_path / "diffusers.safetensors")).keys()
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight" in keys
    loratool.convert(tmp_path / "diffusers.safetensors", "kohya", tmp_path / "kohya.safetensors")
    back = load_file(str(tmp_path / "kohya.safetensors"))
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_k.lora_down.weight" in back  # sd-scripts' name
    for key, value in tensors.items():
        assert torch.equal(back[key.replace("lora_te2_", "lora_te3_")], value), key


# -- cloneofsimo's lora_diffusion files ---------------------------------------------------------------
COS = "lora-diffusion-cloneofsimo"


def test_real_lora_diffusion_file_is_placed_by_its_numbering(tmp_path):
    """Every one of the 192 numbered modules has SD1's full-size shape at the place lora_diffusion's
    walk puts it: a wrong order would put GEGLU's 2560 rows or a cross-attention's 768 inputs elsewhere."""
    path = build(COS, tmp_path / "lora.safetensors")
    report = loratool.inspect(path)
    assert (report.format, report.architecture) == ("lora-diffusion", "sd1")
    assert "full-size shapes match" in report.architecture_reason
    assert {(m.rank, m.scale) for m in report.modules} == {(4, 1.0)}
    assert not [f for f in report.findings if f.severity != "info"]
    targets = {m.name: m.targets[0] for m in report.modules}
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    assert targets["unet:0"] == f"{block}.attn1.to_q"
    assert targets["unet:4"] == f"{block}.ff.net.0.proj"  # old diffusers registered ff before attn2
    assert targets["unet:6"] == f"{block}.attn2.to_k"
    assert targets["unet:135"] == "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"  # mid last
    assert targets["text_encoder:0"] == "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    assert targets["text_encoder:2"] == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def _lora_diffusion_order(unet: torch.nn.Module) -> list[str]:
    """lora_diffusion's walk, written out independently: every module of class Attention or GEGLU
    in model order, its nn.Linear children in registration order, with the transformer block's
    children in the order the diffusers of its day registered them (attn1, ff, attn2)."""
    from diffusers.models.attention import BasicTransformerBlock

    order = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            for child in ("attn1", "ff.net.0", "attn2"):
                sub = module.get_submodule(child)
                order += [f"{name}.{child}.{n}" for n, m in sub.named_modules() if isinstance(m, torch.nn.Linear)]
    return order


def test_lora_diffusion_merge_applies_up_down_at_scale_one(tmp_path):
    unet = sd15_unet()
    weights = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(3)
    tensors, paths = {}, _lora_diffusion_order(unet)
    for i, path in enumerate(paths):
        out, inp = weights[f"{path}.weight"].shape
        tensors[f"unet:{i}:down"] = torch.randn(2, inp, generator=g) * 0.1
        tensors[f"unet:{i}:up"] = torch.randn(out, 2, generator=g) * 0.1
    lora = tmp_path / "lora.safetensors"
    save_file(tensors, str(lora), {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"])})
    report = loratool.inspect(lora)
    assert report.architecture in ("sd1", "sd2") and len(report.modules) == len(paths) == 144

    loratool.merge(unet_folder(tmp_path), [lora], tmp_path / "merged", device="cpu")
    got = load_file(str(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors"))
    want = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    for i, path in enumerate(paths):
        want[f"{path}.weight"] += tensors[f"unet:{i}:up"] @ tensors[f"unet:{i}:down"]
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_lora_diffusion_tokens_are_embeddings_kept_only_where_a_layout_holds_them(tmp_path):
    path = build(COS, tmp_path / "lora.safetensors")
    tensors = load_file(str(path))
    tensors["<s1>"] = torch.randn(768).half()
    with_tokens = tmp_path / "tokens.safetensors"
    save_file(tensors, str(with_tokens), header(COS)["metadata"])
    report = loratool.inspect(with_tokens)
    assert report.summary["other_tensors"] == {"<s1>": "textual-inversion token embedding"}

    loratool.convert(with_tokens, "kohya", tmp_path / "kohya.safetensors")
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert torch.equal(kohya["bundle_emb.<s1>.string_to_param.*"], tensors["<s1>"][None])
    again = loratool.inspect(tmp_path / "kohya.safetensors")
    assert again.summary["other_tensors"] == {"bundle_emb.<s1>.string_to_param.*": "textual-inversion token embedding"}
    assert not any(k.startswith("unet") or k.startswith("text_encoder") for k in again.summary["metadata"])
    from loratool.errors import ConversionError, MergeError

    for src in (with_tokens, tmp_path / "kohya.safetensors"):
        with pytest.raises(ConversionError, match="token embedding; diffusers files have no place for it"):
            loratool.convert(src, "diffusers", tmp_path / "d.safetensors")
        with pytest.raises(ConversionError, match="token embedding"):
            loratool.combine([src, src], tmp_path / "c.safetensors")
    with pytest.raises(MergeError, match="<s1>: a textual-inversion token embedding"):
        loratool.merge(unet_folder(tmp_path), [with_tokens], tmp_path / "m", device="cpu")


def test_real_lycoris_lokr_file_reads_with_its_sd_scripts_record(tmp_path):
    """The LyCORIS author's own LoKr (kohya names, full ss_* metadata): every module placed at SD1's
    full size, the recorded dim/alpha agree with the tensors. Only the hash differs: the values are
    ours, not the file's."""
    report = loratool.inspect(build("lycoris-lokr-sd15", tmp_path / "lokr.safetensors"))
    assert (report.format, report.architecture) == ("lycoris", "sd1")
    assert "full-size shapes match" in report.architecture_reason
    assert len(report.modules) == 350 and {m.kind for m in report.modules} == {"lokr"}
    assert [(f.code, f.severity) for f in report.findings] == [("hash-mismatch", "warning")]


# -- BFL's Flux control LoRAs (Depth, Canny) -------------------------------------------------------------
def test_bfl_control_lora_merges_as_comfyui_applies_it(tmp_path):
    """img_in takes the control image's channels too (lora_A has twice the model's input columns):
    the base's img_in is widened with zero columns, then updated; `lora_B.bias` adds to the biases;
    the q/k norm scales replace the base's (at strength s: W + s (S - W))."""
    from test_merge_diffusers import base_checkpoint
    from tiny_models import flux_transformer

    from loratool.archs import get_architecture

    flux = get_architecture("flux1")
    base_sd = base_checkpoint(flux, {"transformer": flux_transformer()})
    base = tmp_path / "flux.safetensors"
    save_file(base_sd, str(base))
    hidden, channels = base_sd["img_in.weight"].shape
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    qkv_rows = base_sd["double_blocks.0.img_attn.qkv.weight"].shape[0]
    lora = {
        "img_in.lora_A.weight": r(4, 2 * channels),
        "img_in.lora_B.weight": r(hidden, 4),
        "img_in.lora_B.bias": r(hidden),
        "double_blocks.0.img_attn.qkv.lora_A.weight": r(4, hidden),
        "double_blocks.0.img_attn.qkv.lora_B.weight": r(qkv_rows, 4),
        "double_blocks.0.img_attn.qkv.lora_B.bias": r(qkv_rows),
    }
    for norm in ("double_blocks.0.img_attn.norm.key_norm", "single_blocks.0.norm.query_norm"):
        lora[f"{norm}.scale"] = 1 + r(*base_sd[f"{norm}.scale"].shape)
    path = tmp_path / "control.safetensors"
    save_file(lora, str(path))

    report = loratool.inspect(path, base=base)  # narrow widths: only the base says img_in is wider
    assert {m.kind for m in report.modules} == {"lora", "set"}
    codes = {(f.code, f.module) for f in report.findings}
    assert ("widened-input", "img_in") in codes and not [f for f in report.findings if f.severity == "error"]

    for strength in (1.0, 0.5):
        out = tmp_path / f"merged_{strength}.safetensors"
        merged_report = loratool.merge(base, [path], out, weights=[strength], device="cpu")
        assert any("img_in.weight: widened from" in n for n in merged_report.loras[0].notes)
        got = load_file(str(out))
        want = dict(base_sd)
        wide = torch.zeros(hidden, 2 * channels)
        wide[:, :channels] = base_sd["img_in.weight"]
        want["img_in.weight"] = wide + strength * lora["img_in.lora_B.weight"] @ lora["img_in.lora_A.weight"]
        want["img_in.bias"] = base_sd["img_in.bias"] + strength * lora["img_in.lora_B.bias"]
        q = "double_blocks.0.img_attn.qkv"
        want[f"{q}.weight"] = (
            base_sd[f"{q}.weight"] + strength * lora[f"{q}.lora_B.weight"] @ lora[f"{q}.lora_A.weight"]
        )
        want[f"{q}.bias"] = base_sd[f"{q}.bias"] + strength * lora[f"{q}.lora_B.bias"]
        for norm in ("double_blocks.0.img_attn.norm.key_norm", "single_blocks.0.norm.query_norm"):
            key = f"{norm}.scale"
            want[key] = base_sd[key] + strength * (lora[key] - base_sd[key])
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")

    from click.testing import CliRunner

    from loratool.cli import main
    from loratool.errors import ConversionError

    shown = CliRunner().invoke(main, ["merge", str(base), str(path), "-o", str(tmp_path / "cli.safetensors"), "-q"])
    assert shown.exit_code == 0 and "img_in.weight: widened from" in shown.stdout

    set_only = tmp_path / "norms.safetensors"
    save_file({k: v for k, v in lora.items() if k.endswith(".scale")}, str(set_only))
    for to in ("kohya", "diffusers", "peft"):
        with pytest.raises(ConversionError, match=r"set weight has no .*form"):
            loratool.convert(set_only, to, tmp_path / f"out_{to}")


@pytest.mark.parametrize(("columns", "model"), [(128, "FLUX.1 Depth/Canny (control)"), (384, "FLUX.1 Fill")])
def test_a_widened_img_in_names_the_flux_model_it_is_for(tmp_path, columns: int, model: str):
    """At full size, img_in's input width tells a control LoRA (64 latent + 64 control channels) from a
    Fill one (64 + 64 masked image + 256 mask)."""
    lora = {
        "img_in.lora_A.weight": torch.zeros(4, columns),
        "img_in.lora_B.weight": torch.zeros(3072, 4),
        "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 3072),
        "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9216, 4),
        # FLUX.2 [klein] 4B has Flux.1's width and a 128-channel img_in: Flux.1's linear1 (7x) tells them apart
        "single_blocks.0.linear1.lora_A.weight": torch.zeros(4, 3072),
        "single_blocks.0.linear1.lora_B.weight": torch.zeros(21504, 4),
    }
    path = tmp_path / "widened.safetensors"
    save_file(lora, str(path))
    report = loratool.inspect(path)
    assert report.architecture == "flux1"
    (widened,) = [f for f in report.findings if f.code == "widened-input"]
    assert f"takes {columns} input channels where the model's layer has 64: a {model} LoRA" in widened.message
