"""`loratool resize`: each module cut to the optimal truncation of its update (checked here against
a dense SVD, which resize never forms), the scale kept, the layout kept, and the dynamic rules
picking the right rank on planted spectra."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool import load_adapter, resize
from loratool.archs import get_architecture
from loratool.cli import main
from loratool.errors import ResizeError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KOHYA = FIXTURES / "kohya_sd15.safetensors"  # fp16, LoRA + 1x1 and 3x3 LoCon
PEFT = FIXTURES / "peft_llama"  # fp32, rank_pattern and alpha_pattern
FLUX = FIXTURES / "kohya_flux.safetensors"  # bf16, fused qkv / linear1
DIFFUSERS = FIXTURES / "diffusers_sd15.safetensors"
SD1 = get_architecture("sd1")


def module_updates(path) -> dict[tuple[str, ...], tuple[torch.Tensor, float, int]]:
    """Per module, keyed by its canonical targets (layouts may spell names differently):
    (dW = scale * up @ down flattened to 2-D, float64; scale; rank)."""
    out = {}
    with load_adapter(path) as adapter:
        for module in adapter.modules.values():
            tensors = {role: t.double() for role, t in adapter.tensors(module).items()}
            up, down = module.kind.low_rank(tensors)
            out[module.targets] = (module.scale * (up.double() @ down.double()), module.scale, module.rank)
    return out


def truncated(dense: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def write_kohya(path: Path, modules: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> Path:
    tensors = {}
    for name, roles in modules.items():
        for role, t in roles.items():
            tensors[f"{name}.lora_{role}.weight"] = t.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alphas[name])
    save_file(tensors, str(path), {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    return path


def planted(out_f: int, in_f: int, spectrum: list[float], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """LoRA factors (rank `rank`) whose product has exactly `spectrum` (zeros beyond it)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(spectrum + [0.0] * (rank - len(spectrum)), dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(out_f, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(in_f, rank, generator=g, dtype=torch.float64)).Q
    mix = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64)).Q  # not already diagonal
    return {"up": ((u * s) @ mix).float(), "down": (mix.T @ v.T).float()}


def to_q(block: int) -> str:
    return SD1.kohya_name(f"unet.down_blocks.{block}.attentions.0.transformer_blocks.0.attn1.to_q")


# -- the optimal truncation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "rank", "tolerance"),
    [
        (PEFT, 2, 1e-5),  # fp32 factors: the truncation itself
        (KOHYA, 1, 2e-3),  # fp16 factors: the truncation, rounded to fp16 once
        (FLUX, 2, 1e-2),  # bf16 factors, fused qkv / linear1 cut as one matrix
        (DIFFUSERS, 2, 2e-3),
    ],
    ids=["peft-fp32", "kohya-fp16", "flux-bf16", "diffusers-fp16"],
)
def test_lower_rank_is_the_optimal_truncation(tmp_path, source, rank, tolerance):
    out = tmp_path / ("out" if source.is_dir() else "out.safetensors")
    report = resize(source, out, rank=rank, device="cpu")
    before, after = module_updates(source), module_updates(out)
    assert before.keys() == after.keys()
    cut = 0
    for name, (dense, scale, r) in before.items():
        new_dense, new_scale, new_r = after[name]
        assert new_r == min(r, rank), name
        assert new_scale == pytest.approx(scale, rel=1e-6), f"{name}: the scale is kept"
        want = truncated(dense, rank) if r > rank else dense
        assert relative(new_dense, want) <= tolerance, name
        cut += r > rank
    assert cut > 0 and sum(m.rank_out < m.rank_in for m in report.modules) == cut


def test_reported_error_is_the_truncation_error(tmp_path):
    report = resize(PEFT, tmp_path / "out", rank=2, device="cpu")
    before = module_updates(PEFT)
    for m in report.modules:
        dense = before[(m.name.removeprefix("base_model.model."),)][0]
        s = torch.linalg.svdvals(dense)
        want = float(s[m.rank_out :].square().sum().sqrt() / s.square().sum().sqrt())
        assert m.relative_error == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert m.retained == pytest.approx(1 - want**2, rel=1e-6, abs=1e-12)


def test_same_rank_leaves_every_update_unchanged(tmp_path):
    out = tmp_path / "same.safetensors"
    report = resize(KOHYA, out, rank=64, device="cpu")
    assert all(m.rank_out == m.rank_in for m in report.modules)
    with safe_open(str(KOHYA), "pt") as a, safe_open(str(out), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in sorted(a.keys()):
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_peft_dir_stays_a_peft_dir_with_patterns_for_the_new_ranks(tmp_path):
    out = tmp_path / "out"
    resize(PEFT, out, rank=2, device="cpu")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    with load_adapter(out) as adapter:
        ranks = {m.rank for m in adapter.modules.values()}
    assert ranks == {2}
    assert config["r"] == 2
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.shape[0] == 2 for k, t in tensors.items() if "lora_A" in k)


def test_rslora_scale_is_kept(tmp_path):
    src = tmp_path / "rs"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{path}.lora_A.weight": torch.randn(8, 64, generator=g),
            f"{path}.lora_B.weight": torch.randn(64, 8, generator=g),
        },
        str(src / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj"]}
    (src / "adapter_config.json").write_text(json.dumps(config))
    resize(src, tmp_path / "out", rank=2, device="cpu")
    before, after = module_updates(src), module_updates(tmp_path / "out")
    target = (path.removeprefix("base_model.model."),)
    (dense, scale, _), (new_dense, new_scale, _) = before[target], after[target]
    assert new_scale == pytest.approx(scale) == pytest.approx(16 / math.sqrt(8))
    assert relative(new_dense, truncated(dense, 2)) <= 1e-5
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_rslora"] is True


# -- convs --------------------------------------------------------------------------------------------
def test_locon_with_a_tucker_core_becomes_a_plain_locon_at_the_optimum(tmp_path):
    g = torch.Generator().manual_seed(3)
    name = SD1.kohya_name("unet.down_blocks.0.resnets.0.conv1")
    r = 6
    modules = {
        name: {
            "down": torch.randn(r, 32, 1, 1, generator=g),
            "mid": torch.randn(r, r, 3, 3, generator=g),
            "up": torch.randn(40, r, 1, 1, generator=g),
        }
    }
    src = write_kohya(tmp_path / "tucker.safetensors", modules, {name: 3.0})
    out = tmp_path / "out.safetensors"
    resize(src, out, rank=2, device="cpu")
    tensors = load_file(str(out))
    assert f"{name}.lora_mid.weight" not in tensors
    assert tensors[f"{name}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{name}.lora_up.weight"].shape == (40, 2, 1, 1)
    target = ("unet.down_blocks.0.resnets.0.conv1",)
    (dense, scale, _), (new_dense, new_scale, _) = module_updates(src)[target], module_updates(out)[target]
    assert new_scale == pytest.approx(scale)
    assert relative(new_dense, truncated(dense, 2)) <= 1e-5


# -- dynamic rank -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spectra(tmp_path_factory) -> Path:
    """Three modules of rank 8 with known spectra; alphas differ so scale enters the rule's input."""
    modules = {
        to_q(0): planted(64, 48, [5.0, 4.0, 3.0, 1e-3, 1e-4], 8, seed=0),  # three big values
        to_q(1): planted(64, 48, [2.0, 1e-4], 8, seed=1),  # one: a dynamic rank of 1
        to_q(2): planted(64, 48, [1.0] * 6, 8, seed=2),  # flat: six equal
    }
    alphas = {to_q(0): 8.0, to_q(1): 4.0, to_q(2): 16.0}
    return write_kohya(tmp_path_factory.mktemp("spectra") / "spectra.safetensors", modules, alphas)


@pytest.mark.parametrize(
    ("dynamic", "want"),
    [
        ("ratio:100", [3, 1, 6]),
        ("fro:0.9999", [3, 1, 6]),
        ("cumulative:0.999", [3, 1, 6]),
        ("eps:0.01", [3, 1, 6]),
        ("eps:1.5", [3, 1, 6]),  # on scale * S: [5, 4, 3], [1.0], [2.0] * 6
        ("fro:0.5", [1, 1, 2]),  # sqrt(25/50) = 0.707; sqrt(2/6) = 0.577 for the flat one
    ],
)
def test_dynamic_rules_pick_the_planted_rank(tmp_path, spectra, dynamic, want):
    out = tmp_path / "out.safetensors"
    report = resize(spectra, out, dynamic=dynamic, device="cpu")
    got = {m.name: m.rank_out for m in report.modules}
    # The rules see the update's singular values, scale * S: alphas 8, 4, 16 over rank 8 give
    # scales 1, 0.5 and 2 (only eps depends on them).
    assert [got[to_q(i)] for i in range(3)] == want
    with load_adapter(out) as adapter:
        assert [adapter.modules[to_q(i)].rank for i in range(3)] == want


def test_dynamic_keeps_the_scale_and_meets_the_rule(tmp_path, spectra):
    out = tmp_path / "out.safetensors"
    resize(spectra, out, dynamic="fro:0.9999", device="cpu")
    before, after = module_updates(spectra), module_updates(out)
    for name, (dense, scale, _) in before.items():
        new_dense, new_scale, _ = after[name]
        assert new_scale == pytest.approx(scale)
        assert relative(new_dense, dense) <= math.sqrt(1 - 0.9999**2)


# -- refusals and the CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["lycoris_loha.safetensors", "lycoris_lokr.safetensors"])
def test_loha_and_lokr_are_refused(tmp_path, fixture):
    out = tmp_path / "out.safetensors"
    with pytest.raises(ResizeError, match="resize works on LoRA and LoCon"):
        resize(FIXTURES / fixture, out, rank=2, device="cpu")
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"rank": 2, "dynamic": "fro:0.9"}, "exactly one of"),
        ({"rank": 0}, "at least 1"),
        ({"dynamic": "fro:2"}, "between 0 and 1"),
        ({"dynamic": "median:3"}, "METHOD:VALUE"),
    ],
)
def test_bad_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ResizeError, match=message):
        resize(KOHYA, tmp_path / "out.safetensors", device="cpu", **kwargs)


def test_resize_is_deterministic(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    resize(KOHYA, a, dynamic="fro:0.9", device="cpu")
    resize(KOHYA, b, dynamic="fro:0.9", device="cpu")
    assert a.read_bytes() == b.read_bytes()


def test_kohya_metadata_follows_the_new_ranks(tmp_path):
    out = tmp_path / "out.safetensors"
    resize(KOHYA, out, rank=1, device="cpu")
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "1"
    assert "loratool.resized_from" in metadata
    # The fixture's LoCon record was conv_dim 2, conv_alpha 1 (scale 0.5): at rank 1 the scale stays.
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "0.5"}


def test_cli_reports_json_and_refuses_in_one_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    result = runner.invoke(main, ["resize", str(KOHYA), "--rank", "1", "-o", str(out), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["target"] == "kohya" and all(m["rank_out"] == 1 for m in doc["modules"])
    again = runner.invoke(main, ["resize", str(KOHYA), "--rank", "1", "-o", str(out)])
    assert again.exit_code == 2 and "exists" in again.stderr and "Traceback" not in again.output
    loha = runner.invoke(
        main, ["resize", str(FIXTURES / "lycoris_loha.safetensors"), "--rank", "1", "-o", str(tmp_path / "x")]
    )
    assert loha.exit_code == 2 and len(loha.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# -- regressions from review ------------------------------------------------------------------------------
def test_a_rank_between_the_layers_width_and_the_files_rank_is_capped_at_the_width(tmp_path):
    """A rank-96 LoRA on a 64 x 64 layer has rank 64 at most; resizing it to 80 gives that."""
    g = torch.Generator().manual_seed(5)
    modules = {to_q(0): {"up": torch.randn(64, 96, generator=g), "down": torch.randn(96, 64, generator=g)}}
    src = write_kohya(tmp_path / "wide.safetensors", modules, {to_q(0): 96.0})
    out = tmp_path / "out.safetensors"
    report = resize(src, out, rank=80, device="cpu")
    assert report.modules[0].rank_out == 64
    target = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",)
    (dense, scale, _), (new_dense, new_scale, _) = module_updates(src)[target], module_updates(out)[target]
    assert new_scale == pytest.approx(scale)
    assert relative(new_dense, dense) <= 1e-5  # rank 64 of a 64 x 64 update is all of it


def test_peft_saved_full_weights_go_along(tmp_path):
    """modules_to_save (a trained lm_head) is part of the adapter: PEFT must load the resized dir."""
    peft = pytest.importorskip("peft")
    from tiny_models import llama

    model = llama()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    wrapped = peft.get_peft_model(model, config)
    src = tmp_path / "adapter"
    wrapped.save_pretrained(src)
    out = tmp_path / "out"
    resize(src, out, rank=2, device="cpu")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    saved = [k for k in load_file(str(src / "adapter_model.safetensors")) if "lm_head" in k]
    assert saved and all(k in tensors for k in saved)
    loaded = peft.PeftModel.from_pretrained(llama(), out)
    assert loaded.peft_config["default"].r == 2


def test_a_kohya_file_of_an_unknown_model_keeps_its_names(tmp_path):
    g = torch.Generator().manual_seed(6)
    names = ["lora_unet_blocks_0_cross_attn_q", "lora_unet_blocks_0_ffn_0"]
    modules = {n: {"up": torch.randn(48, 8, generator=g), "down": torch.randn(8, 40, generator=g)} for n in names}
    src = write_kohya(tmp_path / "wan.safetensors", modules, dict.fromkeys(names, 4.0))
    out = tmp_path / "out.safetensors"
    report = resize(src, out, rank=3, device="cpu")
    assert {m.name for m in report.modules} == set(names)
    tensors = load_file(str(out))
    for name in names:
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        assert up.shape == (48, 3) and down.shape == (3, 40)
        assert float(tensors[f"{name}.alpha"]) == pytest.approx(4.0 / 8 * 3)  # the scale alpha/r is kept
        dense = modules[name]["up"].double() @ modules[name]["down"].double()
        assert relative(up.double() @ down.double() * (1.5 / 3) / 0.5, truncated(dense, 3)) <= 1e-5
