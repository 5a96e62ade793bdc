"""convert on adapters PEFT itself saved: peft -> kohya -> peft and peft -> diffusers -> peft.

Adapters come from `get_peft_model(...).save_pretrained` on a tiny Llama and a tiny GPT-2 (Conv1D,
fan_in_fan_out) with plain, per-module rank/alpha patterns, rsLoRA, DoRA, embedding and lora_bias
configs. After the round trip, `PeftModel.from_pretrained` on a fresh base must load every adapter
key (none missing, none unexpected), build every layer with the original rank and scaling, and give
the original logits (max abs diff <= 1e-5 in fp32); every factor and magnitude must come back byte
for byte, and the kohya file in between must hold the same bytes with alpha = scale * r.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from loratool.cli import main
from loratool.commands.convert import convert
from loratool.errors import ConversionError

pytest.importorskip("peft")
pytest.importorskip("transformers")

from deltas import assert_same_deltas
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict

pytestmark = pytest.mark.filterwarnings(
    # the "proj" pattern keys match no module on purpose
    "ignore:The following (rank|alpha)_pattern keys did not match any targeted module:RuntimeWarning",
    "ignore:`lora_bias=True` was passed but the targeted layer",
)

WRAP = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
LOGITS_ATOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


# ---------------------------------------------------------------------------------------------------
# tiny models and the adapters PEFT makes on them
# ---------------------------------------------------------------------------------------------------


def tiny_llama() -> torch.nn.Module:
    from tiny_models import llama

    return llama().eval()  # seeds torch itself: every call gives the same weights


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}

# (model, LoraConfig fields). Patterns include keys a naive suffix match gets wrong: a more specific
# key listed before a general one (PEFT: the first key in dict order that matches wins), a regex, and
# "proj", which PEFT matches against no module (it needs a whole dotted component) though every name
# ends with it. Keys are listed in sorted order because PEFT writes adapter_config.json with
# sort_keys=True: an order that sorting changes gives the saved adapter other ranks/alphas than the
# model that saved it (test_pattern_order_is_the_saved_config_s_order covers that case).
CASES: dict[str, tuple[str, dict]] = {
    "llama-plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "llama-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"layers.1.self_attn.q_proj": 6, r"layers\.[01]\.mlp\.up_proj": 5, "proj": 7, "q_proj": 2},
            alpha_pattern={
                "layers.1.self_attn.o_proj": 32,
                "model.layers.0.mlp.down_proj": 3,
                "proj": 1,
                "v_proj": 0.1,
            },
        ),
    ),
    "llama-rslora": (
        "llama",
        dict(r=3, lora_alpha=8, target_modules=LLAMA_TARGETS, use_rslora=True, rank_pattern={"v_proj": 4}),
    ),
    "llama-dora": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "gpt2-plain": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True)),
    "gpt2-patterns": (
        "gpt2",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=GPT2_TARGETS,
            fan_in_fan_out=True,
            rank_pattern={"h.1.attn.c_proj": 6, "mlp.c_fc": 3, "mlp.c_proj": 2},
            alpha_pattern={r"attn\.c_attn": 5, "h.0.mlp.c_proj": 0.1, "proj": 99},
        ),
    ),
    "gpt2-rslora": (
        "gpt2",
        dict(r=3, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_rslora=True),
    ),
    "gpt2-dora": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_dora=True)),
    "gpt2-embedding": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True),
    ),
}
KOHYA_CASES = list(CASES)
# lora_B.bias has no kohya form (refused below); it round-trips through diffusers.
BIAS_CASES = {
    "llama-bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)),
    "gpt2-bias": ("gpt2", dict(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, lora_bias=True)),
}
ALL_CASES = {**CASES, **BIAS_CASES}
# diffusers' single file keeps PEFT's keys: every case's bytes are checked, logits on these
DIFFUSERS_LOGITS_CASES = [c for c in ALL_CASES if c.startswith("llama-")] + ["gpt2-dora", "gpt2-bias"]


def input_ids() -> torch.Tensor:
    return torch.arange(2 * 12).reshape(2, 12) * 7 % 64


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Module path (as in the base model) -> PEFT's LoRA layer."""
    return {
        name[len(WRAP) :]: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and name.startswith(WRAP)
    }


def perturb(model: torch.nn.Module) -> None:
    """Make DoRA magnitudes and LoRA biases differ from their initial values (weight norms, zeros)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for magnitude in layer.lora_magnitude_vector.values():
                noise = torch.rand(magnitude.weight.shape, generator=generator)
                magnitude.weight.mul_(0.5 + noise)
            for up in layer.lora_B.values():
                if up.bias is not None:
                    up.bias.copy_(torch.randn(up.bias.shape, generator=generator) * 0.1)


def make_adapter(model_name: str, config: dict, directory: Path, dtype: torch.dtype = torch.float32, **save) -> object:
    """Save a PEFT adapter made by get_peft_model on the tiny model; return the PeftModel (eval, fp32 unless asked)."""
    torch.manual_seed(0)
    model = get_peft_model(MODELS[model_name](), LoraConfig(init_lora_weights=False, **config))
    perturb(model)
    model = model.to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Setting `save_embedding_layers`", tied weights
        model.save_pretrained(directory, **save)
    return model


def load_round_trip(model_name: str, directory: Path) -> object:
    """PeftModel.from_pretrained on a fresh base, asserting that every adapter key loaded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(MODELS[model_name](), directory).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m], messages
    # PeftModel.from_pretrained does not return its load result: load the same file again to see it.
    result = set_peft_model_state_dict(model, load_file(str(directory / WEIGHTS)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert missing == [], f"missing adapter keys: {missing}"
    assert result.unexpected_keys == [], f"unexpected keys: {result.unexpected_keys}"
    return model


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=input_ids()).logits.float()


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = float((a - b).abs().max())
    assert diff <= LOGITS_ATOL, f"max abs logits diff {diff:g}"


def peft_truth(model: torch.nn.Module) -> dict[str, tuple[int, float]]:
    """Per module (base model path): PEFT's own rank and scaling."""
    return {path: (layer.r["default"], float(layer.scaling["default"])) for path, layer in lora_layers(model).items()}


def kohya_name(path: str) -> str:
    return "lora_te_" + path.replace(".", "_")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key, tensor in a.items():
        assert b[key].dtype == tensor.dtype, key
        assert b[key].shape == tensor.shape, key
        assert torch.equal(b[key], tensor), key


# ---------------------------------------------------------------------------------------------------
# the round trips
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Callable[[str], SimpleNamespace]:
    """One adapter per case, saved once; its reference logits come from the PeftModel that saved it."""
    cache: dict[str, SimpleNamespace] = {}

    def get(case: str) -> SimpleNamespace:
        if case not in cache:
            model_name, config = ALL_CASES[case]
            directory = tmp_path_factory.mktemp(case)
            embedding = any(t in ("embed_tokens", "wte") for t in config["target_modules"])
            save = {"save_embedding_layers": False} if embedding else {}
            model = make_adapter(model_name, config, directory / "adapter", **save)
            cache[case] = SimpleNamespace(
                model_name=model_name,
                directory=directory,
                adapter=directory / "adapter",
                logits=logits(model),
                truth=peft_truth(model),
            )
        return cache[case]

    return get


@pytest.fixture(scope="module")
def round_trip(made) -> Callable[[str, str], SimpleNamespace]:
    cache: dict[tuple[str, str], SimpleNamespace] = {}

    def get(case: str, via: str) -> SimpleNamespace:
        if (case, via) not in cache:
            src = made(case)
            middle = src.directory / f"{via}.safetensors"
            back = src.directory / f"back_from_{via}"
            there = convert(src.adapter, via, middle)
            again = convert(middle, "peft", back)
            cache[case, via] = SimpleNamespace(src=src, middle=middle, back=back, there=there, again=again)
        return cache[case, via]

    return get


@pytest.mark.parametrize(
    ("case", "via"),
    [(c, "kohya") for c in KOHYA_CASES] + [(c, "diffusers") for c in DIFFUSERS_LOGITS_CASES],
)
def test_round_trip_loads_clean_with_the_same_logits(round_trip, case: str, via: str) -> None:
    trip = round_trip(case, via)
    src = trip.src
    assert trip.there.modules_in == trip.there.modules_out == len(src.truth)
    assert trip.again.modules_in == trip.again.modules_out == len(src.truth)
    loaded = load_round_trip(src.model_name, trip.back)
    truth = peft_truth(loaded)
    assert sorted(truth) == sorted(src.truth)
    for path, (rank, scaling) in src.truth.items():
        assert truth[path][0] == rank, path
        assert truth[path][1] == pytest.approx(scaling, rel=1e-7), path
    assert_same_logits(logits(loaded), src.logits)


# Llama's Linear layers have no bias, so PEFT cannot merge lora_bias on them; GPT-2's Conv1D can.
@pytest.mark.parametrize(("case", "via"), [(c, "kohya") for c in KOHYA_CASES] + [("gpt2-bias", "diffusers")])
def test_round_trip_merges_to_the_same_model(round_trip, case: str, via: str) -> None:
    trip = round_trip(case, via)
    original = PeftModel.from_pretrained(MODELS[trip.src.model_name](), trip.src.adapter).merge_and_unload().eval()
    again = PeftModel.from_pretrained(MODELS[trip.src.model_name](), trip.back).merge_and_unload().eval()
    assert_same_logits(logits(again), logits(original))
    if case != "gpt2-embedding":  # GPT-2 ties lm_head to wte: merging wte's LoRA changes lm_head too
        assert_same_logits(logits(again), trip.src.logits)
    ours, theirs = original.state_dict(), again.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(
    ("case", "via"),
    [(c, "kohya") for c in KOHYA_CASES] + [(c, "diffusers") for c in ALL_CASES],
)
def test_round_trip_is_bit_identical(round_trip, case: str, via: str) -> None:
    trip = round_trip(case, via)
    original = load_file(str(trip.src.adapter / WEIGHTS))
    back = load_file(str(trip.back / WEIGHTS))
    assert_same_tensors(original, back)
    # every tensor is copied from the source's bytes; only kohya's alpha tensors are new
    assert trip.again.tensors_computed == 0
    assert trip.there.tensors_computed == (len(trip.src.truth) if via == "kohya" else 0)
    assert_same_deltas(trip.src.adapter, trip.back, rtol=1e-6, atol=1e-9, allow_zero_missing=False)
    assert_same_deltas(trip.src.adapter, trip.middle, rtol=1e-6, atol=1e-9, allow_zero_missing=False)


@pytest.mark.parametrize("case", KOHYA_CASES)
def test_kohya_file_holds_the_factors_and_alpha_is_scale_times_rank(round_trip, case: str) -> None:
    trip = round_trip(case, "kohya")
    original = load_file(str(trip.src.adapter / WEIGHTS))
    with safe_open(str(trip.middle), "pt") as f:
        kohya = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    modules = json.loads(metadata["loratool.hf_modules"])
    assert {v["path"] for v in modules.values()} == set(trip.src.truth)
    expected_keys = set()
    for path, (rank, scaling) in trip.src.truth.items():
        name = kohya_name(path)
        embedding = f"{WRAP}{path}.lora_embedding_A" in original
        assert modules[name] == {"path": path, "type": "embedding" if embedding else "linear"}
        a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        assert down.dtype == original[f"{WRAP}{path}.{a}"].dtype and torch.equal(down, original[f"{WRAP}{path}.{a}"])
        assert up.dtype == original[f"{WRAP}{path}.{b}"].dtype and torch.equal(up, original[f"{WRAP}{path}.{b}"])
        assert down.shape[0] == rank
        assert alpha.shape == () and alpha.dtype == torch.float32
        assert float(alpha) == float(torch.tensor(scaling * rank, dtype=torch.float32)), path
        expected_keys |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        magnitude = original.get(f"{WRAP}{path}.lora_magnitude_vector")
        if magnitude is not None:
            scale = kohya[f"{name}.dora_scale"]
            assert scale.shape == (magnitude.shape[0], 1)
            assert scale.dtype == magnitude.dtype and torch.equal(scale.flatten(), magnitude)
            expected_keys.add(f"{name}.dora_scale")
    assert set(kohya) == expected_keys
    config = json.loads(metadata["loratool.peft_config"])
    source_config = json.loads((trip.src.adapter / "adapter_config.json").read_text())
    math_fields = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias"}
    assert not math_fields & set(config)
    assert config == {k: v for k, v in source_config.items() if k not in math_fields}


@pytest.mark.parametrize("case", ["llama-patterns", "gpt2-patterns", "llama-rslora"])
def test_peft_config_patterns_are_anchored_full_paths(round_trip, case: str) -> None:
    trip = round_trip(case, "kohya")
    config = json.loads((trip.back / "adapter_config.json").read_text())
    source = json.loads((trip.src.adapter / "adapter_config.json").read_text())
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config[field]:
            assert key.startswith("^"), key
            assert any(key == "^" + path.replace(".", r"\.") for path in trip.src.truth), key
    assert config["use_rslora"] is False  # kohya has no rsLoRA: its scale is folded into alpha
    assert config["use_dora"] is source["use_dora"]
    for field in ("target_modules", "fan_in_fan_out", "task_type", "bias", "peft_type"):
        assert config[field] == source[field], field


# ---------------------------------------------------------------------------------------------------
# half-precision adapters: alpha in the factors' dtype only when that holds it exactly
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_half_precision_alpha_dtype(tmp_path: Path, dtype: torch.dtype, rslora: bool) -> None:
    lora_alpha = 8 if rslora else 16
    config = dict(
        r=4,
        lora_alpha=lora_alpha,
        target_modules=["q_proj", "v_proj", "o_proj"],
        use_rslora=rslora,
        rank_pattern={"v_proj": 3},
        alpha_pattern={"o_proj": 0.1},
    )
    model = make_adapter("llama", config, tmp_path / "adapter", dtype=dtype)
    truth = peft_truth(model)
    original = load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert {t.dtype for t in original.values()} == {dtype}
    convert(tmp_path / "adapter", "kohya", tmp_path / "kohya.safetensors")
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    for path, (rank, scaling) in truth.items():
        # kohya alpha = scale * r: plain 16 (exact) and 0.1 (not); rsLoRA 8 * sqrt(4) = 16 (exact),
        # 8 * sqrt(3) and 0.1 * sqrt(4) = 0.2 (not)
        alpha_config = 0.1 if path.endswith("o_proj") else lora_alpha
        value = alpha_config * math.sqrt(rank) if rslora else alpha_config
        assert value / rank == pytest.approx(scaling, rel=1e-12), path  # PEFT's own scaling agrees
        exact = value in (16, 16.0)
        alpha = kohya[f"{kohya_name(path)}.alpha"]
        assert alpha.dtype == (dtype if exact else torch.float32), (path, value)
        assert float(alpha) == pytest.approx(value, rel=1e-7), (path, value)
        assert float(alpha) == float(torch.tensor(value, dtype=alpha.dtype)), (path, value)
    convert(tmp_path / "kohya.safetensors", "peft", tmp_path / "back")
    assert_same_tensors(original, load_file(str(tmp_path / "back" / WEIGHTS)))
    loaded = load_round_trip("llama", tmp_path / "back")
    for path, (rank, scaling) in peft_truth(loaded).items():
        assert rank == truth[path][0]
        assert scaling == pytest.approx(truth[path][1], rel=1e-7), path


def test_rslora_alpha_in_kohya_is_lora_alpha_times_sqrt_rank(round_trip) -> None:
    trip = round_trip("llama-rslora", "kohya")
    kohya = load_file(str(trip.middle))
    for path, (rank, _) in trip.src.truth.items():
        expected = 8 * math.sqrt(rank)
        assert float(kohya[f"{kohya_name(path)}.alpha"]) == pytest.approx(expected, rel=1e-7), path


# ---------------------------------------------------------------------------------------------------
# what kohya cannot hold: refused on the command line, nothing written
# ---------------------------------------------------------------------------------------------------


def _refused(src: Path, dest: Path, key: str) -> None:
    before = sorted(p.name for p in dest.parent.iterdir())
    result = CliRunner().invoke(main, ["convert", str(src), "--to", "kohya", "-o", str(dest), "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in dest.parent.iterdir()) == before
    with pytest.raises(ConversionError):
        convert(src, "kohya", dest)


SAVED_CASES = {
    # modules_to_save: a trained full copy of lm_head, saved as base_model.model.lm_head.weight
    "lm_head": (
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        f"{WRAP}lm_head.weight",
    ),
    # PEFT's default for an embedding target also saves the base embedding beside the adapter
    "embedding base layer": (
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        f"{WRAP}model.embed_tokens.base_layer.weight",
    ),
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_saved_full_tensors_go_to_peft_keyed_layouts_and_are_refused_by_kohya(tmp_path: Path, case: str) -> None:
    config, key = SAVED_CASES[case]
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)  # trained: unlike the base's lm_head
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(tmp_path / "adapter")
    original = load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert key in original  # what PEFT itself saved
    reference = logits(model)

    convert(tmp_path / "adapter", "diffusers", tmp_path / "single.safetensors")
    single = load_file(str(tmp_path / "single.safetensors"))
    assert key in single and torch.equal(single[key], original[key])
    convert(tmp_path / "single.safetensors", "peft", tmp_path / "back")
    assert_same_tensors(original, load_file(str(tmp_path / "back" / WEIGHTS)))
    config_back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config_back["modules_to_save"] == config.get("modules_to_save")
    loaded = load_round_trip("llama", tmp_path / "back")
    assert_same_logits(logits(loaded), reference)

    _refused(tmp_path / "adapter", tmp_path / "refused.safetensors", key)
    _refused(tmp_path / "single.safetensors", tmp_path / "refused.safetensors", key)


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_lora_bias_is_refused_by_kohya(made, case: str) -> None:
    src = made(case)
    _refused(src.adapter, src.directory / "refused.safetensors", "lora_B.bias")


def test_diffusers_file_of_an_llm_adapter_has_peft_keys_and_its_config(round_trip) -> None:
    trip = round_trip("llama-patterns", "diffusers")
    with safe_open(str(trip.middle), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert keys == set(load_file(str(trip.src.adapter / WEIGHTS)))
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config == json.loads((trip.back / "adapter_config.json").read_text())
    LoraConfig(**{k: v for k, v in config.items() if k != "peft_version"})  # PEFT accepts it


def test_pattern_order_is_the_saved_config_s_order(tmp_path: Path) -> None:
    """PEFT saves adapter_config.json with sorted keys, so "c_proj" comes before "h.1.attn.c_proj" in
    the file, and PeftModel.from_pretrained gives h.1.attn.c_proj alpha 2 where the model that saved
    it used 3. The converted adapter must be the one PEFT loads from the file."""
    config = dict(
        r=4,
        lora_alpha=8,
        target_modules=GPT2_TARGETS,
        fan_in_fan_out=True,
        alpha_pattern={"h.1.attn.c_proj": 3, "c_proj": 2},
    )
    make_adapter("gpt2", config, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert list(saved["alpha_pattern"]) == ["c_proj", "h.1.attn.c_proj"]  # what PEFT wrote
    reference = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter").eval()
    convert(tmp_path / "adapter", "kohya", tmp_path / "kohya.safetensors")
    convert(tmp_path / "kohya.safetensors", "peft", tmp_path / "back")
    loaded = load_round_trip("gpt2", tmp_path / "back")
    assert peft_truth(loaded) == peft_truth(reference)
    assert_same_logits(logits(loaded), logits(reference))
