"""convert between kohya-layout LyCORIS files (LoHa, LoKr) and PEFT's LoHa/LoKr adapter dirs.

PEFT does not read factor shapes from a file: it builds every layer from the model and the
adapter_config.json (r, alpha, rank/alpha patterns, use_effective_conv2d, decompose_both,
decompose_factor) and then loads the tensors into it. So the checks here are PEFT's own:

- kohya -> peft: networks built by lycoris-lora on the tiny SD1.5 UNet (UNet only), saved by
  lycoris, converted; `PeftModel.from_pretrained` on a fresh UNet loads every adapter key (none
  missing, none unexpected, every value as in the file), and `merge_and_unload` gives, layer by
  layer, what the lycoris-wrapped layer computes and the weight loratool's own merge of the kohya
  file gives (merge is checked against lycoris in test_merge_lycoris.py).
- peft -> kohya: adapters made by `get_peft_model` with LoHaConfig/LoKrConfig, converted;
  lycoris-lora's own loader (`create_network_from_weights`) builds the network from the file and
  its wrapped layers compute what PEFT's merged layers compute; converting the kohya file back to
  peft gives an adapter that PEFT loads cleanly and that merges to the same weights.
- refusals: what one PEFT dir cannot hold (mixed kinds, two models, DoRA on LoHa, a Kronecker
  split no decompose_factor produces) and LoHa for diffusers: ConversionError naming the module,
  nothing written; on the command line exit 2 and one line on stderr.

Alphas differ from ranks throughout (and PEFT's alpha from r), so a scale lost, applied twice, or
left in alpha where LyCORIS ignores it (two whole LoKr factors) shows.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_models import sd15_unet

from loratool import merge
from loratool.cli import main
from loratool.commands.convert import convert
from loratool.errors import ConversionError

pytest.importorskip("lycoris")
pytest.importorskip("peft")

from lycoris import kohya as lycoris_kohya
from make_fixtures import lycoris_network
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

TOLERANCE = 1e-5  # relative to the update (weights) or to the output (layers)
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
WRAP = "base_model.model."
ADAPTER_PARTS = ("hada_", "lokr_")
A = "down_blocks.0.attentions.0.transformer_blocks.0"

# Class-level state lycoris-lora keeps between networks (its preset). A preset file with an empty
# name_algo_map does not reset the previous map (lycoris drops empty maps when it reads a preset).
PRESET_ATTRS = (
    "ENABLE_CONV",
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
)


@pytest.fixture(autouse=True)
def lycoris_preset(monkeypatch):
    """Every test starts with lycoris's name_algo_map empty, and lycoris's class state is put back afterwards."""
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    for attr in PRESET_ATTRS:
        monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, attr, getattr(lycoris_kohya.LycorisNetworkKohya, attr))
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "NAME_ALGO_MAP", {})


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def randomize(params: list[tuple[str, torch.nn.Parameter]], seed: int) -> None:
    """Seeded values large enough that a Hadamard or Kronecker product visibly moves the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(params, key=lambda np_: np_[0]):
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def unet_network(config: tuple, tmp: Path, alpha_of_whole: float | None = None):
    """(network, its UNet, the saved file): a lycoris-lora network on the UNet alone (the text
    encoder given to lycoris has no modules of its preset), randomized and saved by lycoris.
    `alpha_of_whole` rewrites the alpha of LoKr modules with two whole factors, which LyCORIS
    ignores (scale 1)."""
    algo, dim, alpha, conv_dim, conv_alpha, name_algo_map, options = config
    unet = sd15_unet()
    network = lycoris_network(
        algo, dim, alpha, conv_dim, conv_alpha, name_algo_map, (unet, torch.nn.Module()), **options
    )
    assert network.loras and all(m.lora_name.startswith("lora_unet_") for m in network.loras)
    randomize(list(network.named_parameters()), seed=1)
    path = tmp / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    if alpha_of_whole is not None:
        tensors = load_file(str(path))
        for module in network.loras:
            if getattr(module, "use_w1", False) and getattr(module, "use_w2", False):
                tensors[f"{module.lora_name}.alpha"] = torch.tensor(alpha_of_whole)
        save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya"})
    assert all(k.startswith("lora_unet_") for k in load_file(str(path)))
    return network, unet, path


def random_input(layer: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=g)
    return torch.randn(3, layer.in_features, generator=g)


def module_paths(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def unet_base(tmp: Path) -> Path:
    """A diffusers folder holding the tiny UNet's weights (the base PEFT wraps, for loratool's merge)."""
    base = tmp / "base"
    sd15_unet().save_pretrained(base / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (base / "model_index.json").write_text(json.dumps(index))
    return base


def load_peft(directory: Path) -> PeftModel:
    """PeftModel.from_pretrained on a fresh UNet, refusing any sign that the file and the layers PEFT
    built from the config disagree: a missing/unexpected-keys warning, missing or unexpected adapter
    keys when the file is loaded again, a shape PEFT cannot take, or other values than the file's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(sd15_unet(), directory)
    complaints = [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    assert not complaints, complaints
    file = load_file(str(directory / WEIGHTS))
    result = set_peft_model_state_dict(model, file)  # raises on a shape mismatch
    missing = [k for k in result.missing_keys if any(p in k for p in ADAPTER_PARTS)]
    assert missing == [], f"missing adapter keys: {missing}"
    assert result.unexpected_keys == [], f"unexpected keys: {result.unexpected_keys}"
    state = get_peft_model_state_dict(model)
    assert sorted(state) == sorted(file), sorted(set(state) ^ set(file))
    for key, value in file.items():
        assert torch.equal(state[key], value), f"{key}: PEFT holds other values than the file"
    return model.eval()


def relative(got: torch.Tensor, want: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / reference.double().norm())


def compare_layers(layers: list[tuple[str, torch.nn.Module]], plain: torch.nn.Module, seed: int) -> None:
    """Each (path, layer that applies an adapter) against `plain`'s layer at that path, on random inputs;
    the update must be visible next to the base layer's output."""
    base = dict(sd15_unet().named_modules())
    ours = dict(plain.named_modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, layer in layers:
            x = random_input(layer, g)
            want = layer(x)
            assert relative(base[path](x), want, want) > 1e-3, f"{path}: no update to see"
            error = relative(ours[path](x), want, want)
            assert error <= TOLERANCE, f"{path}: {error:.3g}"


def compare_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], paths: set[str]) -> None:
    """Every weight of the adapted modules equal to `want` (relative to the update), every other tensor unchanged."""
    base = sd15_unet().state_dict()
    assert set(got) == set(want) == set(base)
    changed = {k for k, v in want.items() if not torch.equal(v, base[k])}
    assert changed == {f"{p}.weight" for p in paths}
    for key, value in want.items():
        if key in changed:
            error = relative(got[key], value, value - base[key])
            assert error <= TOLERANCE, f"{key}: {error:.3g}"
        else:
            assert torch.equal(got[key], value), key


def assert_refused(call, out: Path, *names: str) -> str:
    with pytest.raises(ConversionError) as info:
        call()
    message = str(info.value)
    assert any(name in message for name in names), message
    assert list(out.iterdir()) == [], "something was written"
    return message


# ---------------------------------------------------------------------------------------------------
# 1. kohya LyCORIS -> PEFT: PEFT rebuilds every module and computes what LyCORIS computes
# ---------------------------------------------------------------------------------------------------

# (algo, dim, alpha, conv_dim, conv_alpha, name_algo_map, create_network options); the modules are
# make_fixtures.LYCORIS_UNET: attention and ff linears (32x32, 256x32, 32x128, 64x64, 64x32), the 1x1
# proj_in and three 3x3 convs (32->32, 64->64, 128->64).
FULL_V = {f"{A}.attn1.to_v": {"algo": "lokr", "full_matrix": True}}  # two whole factors: scale 1
KOHYA_CASES = {
    # conv rank and alpha other than the linears': rank_pattern and alpha_pattern
    "loha": ("loha", 4, 2.0, 2, 3.0, {}, {}),
    # 3x3 convs get Tucker cores (hada_t1/t2), the 1x1 proj_in none: use_effective_conv2d
    "loha-tucker": ("loha", 4, 3.0, 4, 2.0, {}, {"use_tucker": True}),
    # whole w1, factored w2 (plain convs fold the kernel into w2_b), one module with both factors
    # whole, one with its own rank and alpha
    "lokr": ("lokr", 2, 3.0, 2, 5.0, {**FULL_V, f"{A}.attn2.to_k": {"algo": "lokr", "dim": 3, "alpha": 7}}, {}),
    # factored w1 where it is wider than 2r (256x32 ff, 64x64 linears and convs), whole where not
    "lokr-decompose-both": ("lokr", 2, 3.0, 3, 5.0, FULL_V, {"decompose_both": True}),
    # Tucker cores on the 3x3 convs (merging them once crashed: test_lokr_tucker_delta).
    "lokr-tucker": ("lokr", 2, 3.0, 2, 5.0, {}, {"use_tucker": True}),
    # conv_dim 4 keeps w2 whole on the 32->32 and 64->64 convs (no core) and gives the 128->64 conv a
    # core; PEFT builds exactly that under use_effective_conv2d=True.
    "lokr-tucker-whole-w2": ("lokr", 2, 3.0, 4, 5.0, {}, {"use_tucker": True}),
}
EXPECTED_KEYS = {
    "loha": ("hada_w1_a", "hada_w2_b"),
    "loha-tucker": ("hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a"),
    "lokr-decompose-both": ("lokr_w1_a", "lokr_w1", "lokr_w2", "lokr_w2_b"),
    "lokr-tucker": ("lokr_t2", "lokr_w2_a"),
    "lokr-tucker-whole-w2": ("lokr_t2", "lokr_w2"),
}


@pytest.mark.parametrize("name", list(KOHYA_CASES))
def test_kohya_lycoris_to_peft_loads_and_merges_like_lycoris(tmp_path, name):
    network, unet, lora = unet_network(KOHYA_CASES[name], tmp_path, alpha_of_whole=7.0)
    suffixes = {k.split(".", 1)[1] for k in load_file(str(lora))}
    assert set(EXPECTED_KEYS[name]) <= suffixes, f"the {name} file lacks the layout under test"
    paths = module_paths(unet)
    layers = [(paths[id(m.org_module[0])], m.org_module[0]) for m in network.loras]

    report = convert(lora, "peft", tmp_path / "peft")
    assert report.target == "peft" and report.modules_out == len(network.loras)
    config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    assert config["peft_type"] == ("LOHA" if name.startswith("loha") else "LOKR")

    peft_model = load_peft(tmp_path / "peft")
    merged = peft_model.merge_and_unload()
    compare_layers(layers, merged, seed=2)  # LyCORIS's wrapped layers as the oracle

    out = tmp_path / "merged"
    merge(unet_base(tmp_path), [lora], out, weights=[1.0], device="cpu")
    ours = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    compare_weights(merged.state_dict(), ours, {p for p, _ in layers})


# ---------------------------------------------------------------------------------------------------
# 2. PEFT LoHa/LoKr -> kohya (lycoris-lora loads it) -> PEFT again
# ---------------------------------------------------------------------------------------------------

TARGETS = [
    f"{A}.attn1.to_q",  # 32x32
    f"{A}.attn2.to_k",  # 32x32 (cross-attention dim 32)
    f"{A}.ff.net.0.proj",  # 256x32
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",  # 64x64
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv 32->32
    "down_blocks.1.resnets.0.conv2",  # 3x3 conv 64->64
    "up_blocks.1.resnets.2.conv1",  # 3x3 conv 128->64
]
PEFT_CASES = {
    "loha": lambda: LoHaConfig(
        r=4, alpha=3, target_modules=TARGETS, rank_pattern={"conv2": 2}, alpha_pattern={"ff.net.0.proj": 5}
    ),
    "loha-effective-conv": lambda: LoHaConfig(r=4, alpha=6, target_modules=TARGETS, use_effective_conv2d=True),
    "lokr": lambda: LoKrConfig(r=2, alpha=5, target_modules=TARGETS, rank_pattern={"conv2": 3}),
    "lokr-decompose-both": lambda: LoKrConfig(r=2, alpha=3, target_modules=TARGETS, decompose_both=True),
    # r 8: both Kronecker factors whole everywhere, PEFT's scale 3/8 must move into lokr_w1
    "lokr-whole": lambda: LoKrConfig(r=8, alpha=3, target_modules=TARGETS),
    "lokr-effective-conv": lambda: LoKrConfig(r=2, alpha=3, target_modules=TARGETS, use_effective_conv2d=True),
}
PEFT_EXPECTED_KEYS = {
    "loha": ("hada_w1_a", "hada_w2_b"),
    "loha-effective-conv": ("hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w2_a"),
    "lokr-decompose-both": ("lokr_w1_a", "lokr_w2_b"),
    "lokr-whole": ("lokr_w1", "lokr_w2"),
    "lokr-effective-conv": ("lokr_t2",),
}
# lycoris-lora 4.1.3 cannot load a LoKr Tucker w2 beside a whole w1, even from its own files:
# make_module_from_state_dict takes the rank from lokr_w2_a.size(1), which for a Tucker w2 is the
# output split, and then builds other parameters than the file has.
LYCORIS_CANNOT_LOAD = {"lokr-effective-conv"}


def peft_adapter(name: str, tmp: Path) -> tuple[Path, torch.nn.Module]:
    """(adapter dir, PEFT's merged UNet) for a get_peft_model adapter with random factors."""
    config = PEFT_CASES[name]()
    config.init_weights = False
    model = get_peft_model(sd15_unet(), config)
    randomize([(n, p) for n, p in model.named_parameters() if any(s in n for s in ADAPTER_PARTS)], seed=3)
    directory = tmp / "peft"
    model.save_pretrained(directory)
    suffixes = {k.rsplit(".", 1)[1] for k in load_file(str(directory / WEIGHTS))}
    assert set(PEFT_EXPECTED_KEYS[name]) <= suffixes, f"PEFT did not write the {name} layout under test"
    return directory, model.merge_and_unload().eval()


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def lycoris_load(path: Path):
    """(network, UNet): lycoris-lora's own loader on a kohya file, applied to a fresh UNet."""
    # The loader first builds a bare network from the class preset: one without targets, so it does
    # not trip over lycoris's own duplicate names on a diffusers UNet (time_embedding.linear_1).
    lycoris_kohya.LycorisNetworkKohya.apply_preset(
        {
            "unet_target_module": [],
            "unet_target_name": [],
            "text_encoder_target_module": [],
            "text_encoder_target_name": [],
        }
    )
    unet = sd15_unet()
    network, weights = lycoris_kohya.create_network_from_weights(1.0, str(path), None, None, unet, weights_sd=None)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    result = network.load_state_dict(weights, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    return network, unet


@pytest.mark.parametrize("name", [n for n in PEFT_CASES if n not in LYCORIS_CANNOT_LOAD])
def test_peft_to_kohya_computes_in_lycoris_what_peft_computes(tmp_path, name):
    # "lokr-whole": lycoris-lora's loader needs an .alpha even for two whole LoKr factors
    # (test_whole_lokr_factors_keep_an_alpha).
    adapter, peft_merged = peft_adapter(name, tmp_path)
    kohya = tmp_path / "kohya.safetensors"
    convert(adapter, "kohya", kohya)
    assert {k.split(".", 1)[0] for k in load_file(str(kohya))} == {kohya_name(p) for p in TARGETS}

    network, unet = lycoris_load(kohya)
    assert sorted(m.lora_name for m in network.unet_loras) == sorted(kohya_name(p) for p in TARGETS)
    paths = module_paths(unet)
    compare_layers([(paths[id(m.org_module[0])], m.org_module[0]) for m in network.unet_loras], peft_merged, seed=4)


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_peft_kohya_peft_round_trip_merges_to_the_same_weights(tmp_path, name):
    adapter, peft_merged = peft_adapter(name, tmp_path)
    kohya = tmp_path / "kohya.safetensors"
    convert(adapter, "kohya", kohya)
    convert(kohya, "peft", tmp_path / "back")
    again = load_peft(tmp_path / "back").merge_and_unload()
    compare_weights(again.state_dict(), peft_merged.state_dict(), set(TARGETS))


# ---------------------------------------------------------------------------------------------------
# 3. refusals: ConversionError naming the module, nothing written
# ---------------------------------------------------------------------------------------------------


def test_mixed_lora_and_loha_file_is_refused_for_peft(tmp_path):
    loha = f"{A}.attn1.to_q"
    _, _, lora = unet_network(("locon", 4, 2.0, 4, 1.0, {loha: {"algo": "loha"}}, {}), tmp_path)
    suffixes = {k.split(".", 1)[1] for k in load_file(str(lora))}
    assert {"lora_down.weight", "hada_w1_a"} <= suffixes
    out = tmp_path / "out"
    out.mkdir()
    message = assert_refused(lambda: convert(lora, "peft", out / "peft"), out, kohya_name(loha))
    assert "LoHa" in message and "LoRA" in message


def test_unet_and_text_encoder_file_is_refused_for_peft(tmp_path):
    from tiny_models import kohya_clip

    network = lycoris_network("loha", 4, 2.0, 4, 1.0, {}, (sd15_unet(), kohya_clip()))
    randomize(list(network.named_parameters()), seed=1)
    lora = tmp_path / "both.safetensors"
    network.save_weights(str(lora), torch.float32, {"ss_network_module": "lycoris.kohya"})
    prefixes = {k.split("_", 2)[1] for k in load_file(str(lora))}
    assert prefixes == {"unet", "te"}
    out = tmp_path / "out"
    out.mkdir()
    message = assert_refused(lambda: convert(lora, "peft", out / "peft"), out, "text_encoder")
    assert "unet" in message


def test_loha_with_dora_is_refused_for_peft(tmp_path):
    dora = f"{A}.attn1.to_q"
    _, _, lora = unet_network(
        ("loha", 4, 2.0, 4, 1.0, {dora: {"algo": "loha", "weight_decompose": True}}, {}), tmp_path
    )
    assert {k for k in load_file(str(lora)) if k.endswith("dora_scale")} == {f"{kohya_name(dora)}.dora_scale"}
    out = tmp_path / "out"
    out.mkdir()
    message = assert_refused(lambda: convert(lora, "peft", out / "peft"), out, kohya_name(dora))
    assert "DoRA" in message


def test_loha_is_refused_for_diffusers(tmp_path):
    network, _, lora = unet_network(KOHYA_CASES["loha"], tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    names = [m.lora_name for m in network.loras]
    message = assert_refused(lambda: convert(lora, "diffusers", out / "d.safetensors"), out, *names)
    assert "LoHa" in message


def hand_made_lokr(path: Path) -> str:
    """A kohya LoKr file whose 32x32 attn1.to_q is split (2, 16) on its rows and (8, 4) on its
    columns: PEFT splits 32 as (4, 8) by default, and a decompose_factor f as (f, 32 / f) on both
    sides, so no setting rebuilds it. A second, ordinary module keeps the file recognizably SD1."""
    g = torch.Generator().manual_seed(5)
    odd, plain = kohya_name(f"{A}.attn1.to_q"), kohya_name(f"{A}.attn1.to_k")
    tensors = {
        f"{odd}.lokr_w1": torch.randn(2, 8, generator=g),
        f"{odd}.lokr_w2": torch.randn(16, 4, generator=g),
        f"{odd}.alpha": torch.tensor(1.0),
        f"{plain}.lokr_w1": torch.randn(4, 4, generator=g),
        f"{plain}.lokr_w2_a": torch.randn(8, 2, generator=g),
        f"{plain}.lokr_w2_b": torch.randn(2, 8, generator=g),
        f"{plain}.alpha": torch.tensor(3.0),
    }
    save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya"})
    return odd


def test_lokr_split_peft_cannot_build_is_refused(tmp_path):
    lora = tmp_path / "odd.safetensors"
    odd = hand_made_lokr(lora)
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(lambda: convert(lora, "peft", out / "peft", arch="sd1"), out, odd)


def test_lycoris_unbalanced_lokr_is_refused(tmp_path):
    """lycoris's unbalanced_factorization puts the larger side first ((8, 4) rows, (4, 8) columns)."""
    network, _, lora = unet_network(("lokr", 2, 3.0, 2, 5.0, {}, {"unbalanced_factorization": True}), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(lambda: convert(lora, "peft", out / "peft"), out, *[m.lora_name for m in network.loras])


def test_refusal_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    lora = tmp_path / "odd.safetensors"
    odd = hand_made_lokr(lora)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["convert", str(lora), "--to", "peft", "-o", str(out / "peft"), "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.stderr
    assert odd in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert list(out.iterdir()) == []


# No one decompose_both fits every module (per-module decompose_both on the 256x32 ff projection,
# whose w1 is factored, beside the 64x64 attn1.to_q, whose w1 is whole though PEFT's decompose_both
# would factor it): the error names a module in conflict, not the file's first LoKr module.
def test_lokr_decompose_both_on_some_modules_only_is_refused_naming_one_that_conflicts(tmp_path):
    ff, mid = f"{A}.ff.net.0.proj", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    _, _, lora = unet_network(("lokr", 2, 3.0, 2, 5.0, {ff: {"algo": "lokr", "decompose_both": True}}, {}), tmp_path)
    keys = load_file(str(lora))
    assert f"{kohya_name(ff)}.lokr_w1_a" in keys and f"{kohya_name(mid)}.lokr_w1" in keys
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(lambda: convert(lora, "peft", out / "peft"), out, kohya_name(ff), kohya_name(mid))


# ---------------------------------------------------------------------------------------------------
# bugs found, each as small as it gets (they fail until loratool/ is fixed)
# ---------------------------------------------------------------------------------------------------


# LoKr.delta on a Tucker w2 (lokr_t2): the einsum rebuilding w2 returns a non-contiguous tensor,
# which torch.kron once refused ("view size is not compatible").
def test_lokr_tucker_delta():
    from loratool.kinds import KINDS

    g = torch.Generator().manual_seed(6)
    t = {
        "w1": torch.randn(4, 4, generator=g),
        "t2": torch.randn(2, 2, 3, 3, generator=g),
        "w2a": torch.randn(2, 8, generator=g),
        "w2b": torch.randn(2, 8, generator=g),
    }
    w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["t2"], t["w2a"], t["w2b"])
    want = torch.kron(t["w1"].reshape(4, 4, 1, 1), w2.contiguous())
    torch.testing.assert_close(KINDS["lokr"].delta(t), want)


# For LoKr, a 3x3 conv whose w2 is whole has no Tucker core under use_effective_conv2d=True either
# (PEFT takes the whole-w2 branch first), so such a conv beside one with a core is one PEFT adapter.
def test_lokr_whole_w2_conv_beside_a_tucker_core(tmp_path):
    g = torch.Generator().manual_seed(7)
    whole, cored = kohya_name("down_blocks.0.resnets.0.conv1"), kohya_name("up_blocks.1.resnets.2.conv1")
    tensors = {
        f"{whole}.lokr_w1": torch.randn(4, 4, generator=g),  # 32 -> 32: (4, 8) x (4, 8)
        f"{whole}.lokr_w2": torch.randn(8, 8, 3, 3, generator=g),
        f"{whole}.alpha": torch.tensor(4.0),
        f"{cored}.lokr_w1": torch.randn(8, 8, generator=g),  # 128 -> 64: (8, 8) x (8, 16)
        f"{cored}.lokr_t2": torch.randn(2, 2, 3, 3, generator=g),
        f"{cored}.lokr_w2_a": torch.randn(2, 8, generator=g),
        f"{cored}.lokr_w2_b": torch.randn(2, 16, generator=g),
        f"{cored}.alpha": torch.tensor(3.0),
    }
    lora = tmp_path / "lokr.safetensors"
    save_file(tensors, str(lora), {"ss_network_module": "lycoris.kohya"})
    convert(lora, "peft", tmp_path / "peft", arch="sd1")
    assert json.loads((tmp_path / "peft" / CONFIG).read_text())["use_effective_conv2d"] is True
    load_peft(tmp_path / "peft")


# A LoKr module with two whole factors keeps an `.alpha`: LyCORIS ignores its value (scale 1) but
# always writes one, and lycoris-lora's loader (create_network_from_weights) does float(alpha).
def test_whole_lokr_factors_keep_an_alpha(tmp_path):
    model = get_peft_model(sd15_unet(), LoKrConfig(r=8, alpha=3, target_modules=[f"{A}.attn1.to_q"]))
    model.save_pretrained(tmp_path / "peft")
    convert(tmp_path / "peft", "kohya", tmp_path / "kohya.safetensors")
    network, _ = lycoris_load(tmp_path / "kohya.safetensors")
    assert [m.lora_name for m in network.unet_loras] == [kohya_name(f"{A}.attn1.to_q")]
