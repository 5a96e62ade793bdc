"""extract on HF model directories: the PEFT adapter it writes is the truncated SVD of tuned - base.

Fine-tunes are synthetic: tuned = base + a planted low-rank change (rank 3 to 6 per module) + a
little dense noise, on tiny Llama (hidden 128, 2 layers, intermediate 320) and GPT-2 (Conv1D,
weights stored (in, out)) models saved with `save_pretrained`. Because D = tuned - base is known,
every claim is checked against the test's own full SVD of D (Eckart-Young: the rank-R truncation
error is sqrt(sum_{i>R} s_i^2) / ||D||_F, and nothing does better):

- merging the extracted adapter back into the base (loratool.merge) gives every module within
  1.001x of that optimum, for the randomized SVD and for `exact=True`, and the report's
  relative_error is what the merged weights show;
- `PeftModel.from_pretrained` loads the adapter with no missing or unexpected keys (the adapter
  state PEFT holds is the file, key for key and value for value), and its `merge_and_unload()`
  gives our merge's weights and logits close to the tuned model's; GPT-2's adapter has
  fan_in_fan_out and PEFT's Conv1D factor shapes;
- embeddings are extracted only when `include` selects them, as lora_embedding_A/B (PEFT only);
- `dynamic` picks each module's rank from planted spectra (ratio, fro, eps, cumulative; max_rank
  caps; a rank of 1 stays 1), `alpha` rescales the factors and leaves the update alone, `min_diff`
  skips modules, `clamp` is kohya's quantile clamp of [U S, V^T];
- the output is deterministic; sharded checkpoints give the same bytes; misuse is one
  ExtractError/OutputError (and on the command line, one error line and exit 2), with nothing written.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratool
from loratool.cli import main
from loratool.commands.extract import ExtractReport
from loratool.errors import ExtractError, OutputError

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from test_merge_peft import read_header
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.usefixtures("sketch_every_module")


WRAP = "base_model.model."
ADAPTER = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
RANK = 8  # above every planted rank: the truncation error is the noise beyond the top R directions
PLANTED_RANKS = (3, 4, 5, 6)  # cycled over the modules
CHANGE = 0.3  # ||planted|| / ||W|| per module
NOISE = 0.02  # ||noise|| / ||planted||
OPTIMUM_SLACK = 1.001  # the randomized SVD may miss the Eckart-Young optimum by this factor
# report.relative_error against what the merged fp32 weights show. The report computes the error as
# sqrt(||D||^2 - sum_{i<=R} s_i^2) / ||D|| from fp32 singular values, which cancels: its absolute
# precision is about sqrt(R) * eps_fp32 / error (~2e-5 at these 2% errors), hence an absolute bound.
REPORT_ATOL = 1e-4
# The same cancellation bounds what the report can say about near-exact fits: the share of ||D||^2 it
# leaves out is accurate to a few fp32 ulps of ||D||^2, so an error of 0 may read as ~3e-4.
ENERGY_ATOL = 2e-6
FP32_ATOL = 1e-6
LOGITS_FACTOR = 3.0  # logits may move by at most this many times (worst module error) x (tuned - base)
LLAMA_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LEAVES = ("c_attn", "c_proj", "c_fc")


# ---------------------------------------------------------------------------------------------------
# tiny models and synthetic fine-tunes
# ---------------------------------------------------------------------------------------------------


def tiny_llama(intermediate: int = 320) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def planted(shape: tuple[int, int], singular_values: list[float], generator: torch.Generator) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V: a matrix whose spectrum is exactly `singular_values`."""
    m, n = shape
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def low_rank_change(weight: torch.Tensor, rank: int, generator: torch.Generator, noise: float = NOISE) -> torch.Tensor:
    """A rank-`rank` change of norm CHANGE * ||W|| (decaying spectrum) plus dense noise of `noise` x its norm."""
    spectrum = torch.linspace(1.0, 0.5, rank, dtype=torch.float64)
    spectrum *= CHANGE * float(weight.double().norm()) / float(spectrum.norm())
    change = planted(tuple(weight.shape), spectrum.tolist(), generator)
    dense = torch.randn(change.shape, generator=generator, dtype=torch.float64)
    return change + dense * (noise * float(change.norm()) / float(dense.norm()))


def targeted_keys(model: torch.nn.Module, leaves: tuple[str, ...]) -> list[str]:
    return sorted(k for k in model.state_dict() if k.endswith(".weight") and k.split(".")[-2] in leaves)


def fine_tuned(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    tuned = copy.deepcopy(model)
    state = tuned.state_dict()
    with torch.no_grad():
        for key, delta in deltas.items():
            state[key].add_(delta.to(state[key].dtype))
    return tuned


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@dataclass
class Pair:
    """A saved base and fine-tune, their tensors as stored, and the models they came from."""

    base: Path
    tuned: Path
    base_model: torch.nn.Module
    tuned_model: torch.nn.Module
    targets: list[str]  # the keys extract adapts by default
    w_base: dict[str, torch.Tensor] = field(init=False)
    w_tuned: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.w_base, self.w_tuned = weights(self.base), weights(self.tuned)

    def delta(self, key: str) -> torch.Tensor:
        return self.w_tuned[key].double() - self.w_base[key].double()


def save_pair(root: Path, model: torch.nn.Module, deltas: dict[str, torch.Tensor], targets: list[str], **save) -> Pair:
    tuned = fine_tuned(model, deltas)
    model.save_pretrained(root / "base", **save)
    tuned.save_pretrained(root / "tuned", **save)
    return Pair(root / "base", root / "tuned", model, tuned, targets)


def key_of(name: str) -> str:
    """The output module's name (base_model.model.<path>) -> the checkpoint key of its weight."""
    assert name.startswith(WRAP), name
    return name[len(WRAP) :] + ".weight"


def optimum(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the least ||D - X||_F / ||D||_F over rank-`rank` X."""
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def relative_errors(pair: Pair, merged: dict[str, torch.Tensor], keys: list[str]) -> dict[str, float]:
    """||W_merged - W_tuned||_F / ||D||_F per key."""
    return {
        key: float((merged[key].double() - pair.w_tuned[key].double()).norm() / pair.delta(key).norm()) for key in keys
    }


def input_ids() -> torch.Tensor:
    return torch.arange(2 * 12).reshape(2, 12) * 7 % 64


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=input_ids()).logits.double()


def peft_updates(directory: Path) -> dict[str, torch.Tensor]:
    """checkpoint key -> scale * B @ A from the adapter file and its config (patterns matched as PEFT
    matches them), in (out, in) orientation."""
    config = json.loads((directory / CONFIG).read_text())
    tensors = load_file(str(directory / ADAPTER))
    out = {}
    for name, down in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removesuffix(".lora_A.weight")
        up = tensors[module + ".lora_B.weight"]
        path = module[len(WRAP) :]
        rank = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"], path), config["r"])
        alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"], path), config["lora_alpha"])
        assert down.shape[0] == up.shape[1] == rank, f"{path}: factors of rank {down.shape[0]}, config says {rank}"
        out[path + ".weight"] = up.double() @ down.double() * (alpha / rank)
    return out


# ---------------------------------------------------------------------------------------------------
# PEFT's view of an adapter dir
# ---------------------------------------------------------------------------------------------------


def load_base(directory: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def load_peft(base: Path, adapter: Path) -> PeftModel:
    """PeftModel.from_pretrained on the base, refusing any sign that the file and the model disagree:
    PEFT's missing-keys warning, incompatible keys when the adapter is loaded again under another
    name, or an adapter state (what PEFT would save) other than the file's tensors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_base(base), adapter)
        again = model.load_adapter(adapter, adapter_name="again")
    complaints = [str(w.message) for w in caught if "missing" in str(w.message) or "unexpected" in str(w.message)]
    assert not complaints, complaints
    assert not again.missing_keys, again.missing_keys
    assert not again.unexpected_keys, again.unexpected_keys
    model.delete_adapter("again")
    model.set_adapter("default")
    file = load_file(str(adapter / ADAPTER))
    state = get_peft_model_state_dict(model, adapter_name="default", save_embedding_layers=False)
    assert sorted(state) == sorted(file), sorted(set(state) ^ set(file))
    for key, value in file.items():
        assert torch.equal(state[key].cpu(), value), f"{key}: PEFT holds other values than the file"
    return model.eval()


@torch.no_grad()
def peft_merged(base: Path, adapter: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_peft(base, adapter).merge_and_unload().eval()


# ---------------------------------------------------------------------------------------------------
# fixtures: one saved pair per model and variant, one extraction per option set
# ---------------------------------------------------------------------------------------------------


def llama_deltas(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    keys = targeted_keys(model, LLAMA_LEAVES)
    return {k: low_rank_change(state[k], PLANTED_RANKS[i % len(PLANTED_RANKS)], generator) for i, k in enumerate(keys)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Pair:
    model = tiny_llama()
    return save_pair(tmp_path_factory.mktemp("llama"), model, llama_deltas(model), targeted_keys(model, LLAMA_LEAVES))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Pair:
    model = tiny_gpt2()
    keys = targeted_keys(model, GPT2_LEAVES)
    generator = torch.Generator().manual_seed(2)
    state = model.state_dict()
    # planted on the stored (in, out) Conv1D weight: the change's rank is the same either way round
    deltas = {k: low_rank_change(state[k], PLANTED_RANKS[i % 4], generator) for i, k in enumerate(keys)}
    return save_pair(tmp_path_factory.mktemp("gpt2"), model, deltas, keys)


EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def llama_embed(llama, tmp_path_factory) -> Pair:
    """The llama fine-tune with its token embedding (64 x 128) changed too."""
    model = llama.base_model
    deltas = llama_deltas(model)
    deltas[EMBED] = low_rank_change(model.state_dict()[EMBED], 4, torch.Generator().manual_seed(3))
    return save_pair(tmp_path_factory.mktemp("llama-embed"), model, deltas, llama.targets)


@pytest.fixture(scope="module")
def extracted(llama, tmp_path_factory) -> Callable[..., tuple[Path, ExtractReport]]:
    """(adapter dir, report) per option set, extracted once."""
    cache: dict[tuple, tuple] = {}

    def get(**options) -> tuple[Path, ExtractReport]:
        key = tuple(sorted(options.items()))
        if key not in cache:
            dest = tmp_path_factory.mktemp("extracted") / "adapter"
            options = {"rank": RANK, "device": "cpu", **options}
            report = loratool.extract(llama.base, llama.tuned, dest, **options)
            cache[key] = dest, report
        return cache[key]

    return get


@pytest.fixture(scope="module")
def merged(llama, extracted, tmp_path_factory) -> Callable[..., dict[str, torch.Tensor]]:
    """The base with an extracted adapter merged in by loratool.merge, per option set."""
    cache: dict[tuple, dict] = {}

    def get(**options) -> dict[str, torch.Tensor]:
        key = tuple(sorted(options.items()))
        if key not in cache:
            adapter, _ = extracted(**options)
            dest = tmp_path_factory.mktemp("merged") / "model"
            loratool.merge(llama.base, [adapter], dest, device="cpu")
            cache[key] = weights(dest)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------------------
# 1. rank-R extraction is the Eckart-Young truncation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"exact": True}], ids=["randomized", "exact"])
def test_merged_extraction_is_within_the_optimal_truncation_error(llama, extracted, merged, options: dict) -> None:
    adapter, report = extracted(**options)
    ours = merged(**options)
    assert report.exact is options.get("exact", False)
    assert (report.target, report.architecture, report.method) == ("peft", "llama", f"rank {RANK}")
    assert sorted(key_of(m.name) for m in report.modules) == llama.targets
    assert report.skipped == []
    measured = relative_errors(llama, ours, llama.targets)
    for module in report.modules:
        key = key_of(module.name)
        delta = llama.delta(key)
        best = optimum(delta, RANK)
        assert 0 < best < 2 * NOISE, f"{key}: the fixture should leave only noise beyond rank {RANK}"
        assert measured[key] <= OPTIMUM_SLACK * best, f"{key}: error {measured[key]:.6g}, optimum {best:.6g}"
        assert module.rank == RANK
        assert abs(module.relative_error - measured[key]) <= REPORT_ATOL, (
            f"{key}: report says {module.relative_error:.6g}, the merged weights show {measured[key]:.6g}"
        )
        assert module.retained == pytest.approx(1 - module.relative_error**2, abs=1e-9)
        change = float(delta.norm() / llama.w_base[key].double().norm())
        assert module.change == pytest.approx(change, rel=1e-5)
    # every tensor extract does not adapt (embeddings, norms, lm_head) is the base's
    for key, value in ours.items():
        if key not in llama.targets:
            assert torch.equal(value, llama.w_base[key]), key
    header = read_header(adapter / ADAPTER)
    assert report.bytes_written == sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.entries.values())


def test_randomized_and_exact_agree_on_the_planted_part(llama, extracted) -> None:
    """Both keep the planted directions: their updates differ by at most the noise they truncate."""
    randomized, exact = peft_updates(extracted()[0]), peft_updates(extracted(exact=True)[0])
    assert sorted(randomized) == sorted(exact) == llama.targets
    for key in llama.targets:
        gap = float((randomized[key] - exact[key]).norm() / llama.delta(key).norm())
        assert gap <= 2 * NOISE, f"{key}: randomized and exact updates differ by {gap:.3g} of ||D||"


# ---------------------------------------------------------------------------------------------------
# 2. PEFT loads what extract writes, and merges it to our weights
# ---------------------------------------------------------------------------------------------------


def test_peft_loads_the_adapter_and_merges_to_our_weights_and_the_tuned_logits(llama, extracted, merged) -> None:
    adapter, report = extracted()
    config = json.loads((adapter / CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is False
    assert config["r"] == RANK
    theirs = peft_merged(llama.base, adapter)
    ours = merged()
    state = theirs.state_dict()
    for key, value in ours.items():
        diff = float((state[key] - value).abs().max())
        assert diff <= FP32_ATOL, f"{key}: merge_and_unload and loratool.merge differ by {diff:g}"

    # Logits move with the weights to first order: the extracted model's distance from the tuned one
    # is the truncation error (relative, per module) times the fine-tune's own distance from the base.
    worst = max(m.relative_error for m in report.modules)
    tuned, base = logits(llama.tuned_model), logits(llama.base_model)
    assert float((logits(load_base(llama.tuned)) - tuned).abs().max()) <= 1e-5, "the saved tuned model is the model"
    shift = float((tuned - base).norm())
    miss = float((logits(theirs) - tuned).norm())
    assert shift > 0.1 * float(tuned.norm()), "the fine-tune should move the logits"
    assert miss <= LOGITS_FACTOR * worst * shift, f"|merged - tuned| {miss:.4g}, |base - tuned| {shift:.4g}"


# ---------------------------------------------------------------------------------------------------
# 3. GPT-2: Conv1D weights stored (in, out), fan_in_fan_out
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_extracted(gpt2, tmp_path_factory) -> tuple[Path, ExtractReport]:
    adapter = tmp_path_factory.mktemp("gpt2-extracted") / "adapter"
    return adapter, loratool.extract(gpt2.base, gpt2.tuned, adapter, rank=RANK, device="cpu")


def test_gpt2_extraction_reports_the_optimal_truncation(gpt2, gpt2_extracted) -> None:
    """The SVD does not care which way round D is stored: the report is right either way."""
    _, report = gpt2_extracted
    assert (report.target, report.architecture) == ("peft", "gpt2")
    assert sorted(key_of(m.name) for m in report.modules) == gpt2.targets
    for module in report.modules:
        key = key_of(module.name)
        assert module.rank == RANK
        best = optimum(gpt2.delta(key), RANK)
        assert 0 < best < 2 * NOISE
        assert abs(module.relative_error - best) <= REPORT_ATOL, f"{key}: {module.relative_error:.6g} vs {best:.6g}"


def test_gpt2_conv1d_adapter_has_fan_in_fan_out_and_peft_factor_shapes(gpt2, gpt2_extracted) -> None:
    adapter, report = gpt2_extracted
    assert json.loads((adapter / CONFIG).read_text())["fan_in_fan_out"] is True
    tensors = load_file(str(adapter / ADAPTER))
    for module in report.modules:  # PEFT's Conv1D factors: A is (r, in), B is (out, r)
        stored = gpt2.w_base[key_of(module.name)].shape  # (in, out)
        assert tensors[module.name + ".lora_A.weight"].shape == (RANK, stored[0]), module.name
        assert tensors[module.name + ".lora_B.weight"].shape == (stored[1], RANK), module.name


def test_gpt2_adapter_loads_in_peft_and_merges_to_the_tuned_weights(gpt2, gpt2_extracted, tmp_path: Path) -> None:
    adapter, report = gpt2_extracted
    theirs = peft_merged(gpt2.base, adapter).state_dict()
    measured = relative_errors(gpt2, theirs, gpt2.targets)
    reported = {key_of(m.name): m.relative_error for m in report.modules}
    for key in gpt2.targets:
        best = optimum(gpt2.delta(key), RANK)
        assert measured[key] <= OPTIMUM_SLACK * best, f"{key}: error {measured[key]:.6g}, optimum {best:.6g}"
        assert abs(reported[key] - measured[key]) <= REPORT_ATOL, key
    ours = tmp_path / "merged"
    loratool.merge(gpt2.base, [adapter], ours, device="cpu")
    for key, value in weights(ours).items():
        diff = float((theirs[key] - value).abs().max())
        assert diff <= FP32_ATOL, f"{key}: merge_and_unload and loratool.merge differ by {diff:g}"


# ---------------------------------------------------------------------------------------------------
# 4. embeddings: only when selected, only in PEFT's layout
# ---------------------------------------------------------------------------------------------------


def test_included_embedding_becomes_lora_embedding_factors(llama_embed, tmp_path: Path) -> None:
    pair = llama_embed
    plain = loratool.extract(pair.base, pair.tuned, tmp_path / "plain", rank=RANK, device="cpu")
    assert EMBED not in {key_of(m.name) for m in plain.modules}, "embeddings only when include selects them"

    adapter = tmp_path / "adapter"
    report = loratool.extract(
        pair.base, pair.tuned, adapter, rank=RANK, include=r"embed_tokens|self_attn", device="cpu"
    )
    attention = [k for k in pair.targets if ".self_attn." in k]
    assert sorted(key_of(m.name) for m in report.modules) == sorted([EMBED, *attention])
    tensors = load_file(str(adapter / ADAPTER))
    prefix = WRAP + EMBED.removesuffix(".weight")
    vocab, hidden = pair.w_base[EMBED].shape
    assert tensors[prefix + ".lora_embedding_A"].shape == (RANK, vocab)
    assert tensors[prefix + ".lora_embedding_B"].shape == (hidden, RANK)
    assert not any(".mlp." in k for k in tensors)
    assert sum(k.startswith(prefix) for k in tensors) == 2

    theirs = peft_merged(pair.base, adapter).state_dict()
    keys = [EMBED, *attention]
    measured = relative_errors(pair, theirs, keys)
    reported = {key_of(m.name): m.relative_error for m in report.modules}
    for key in keys:
        best = optimum(pair.delta(key), RANK)
        assert measured[key] <= OPTIMUM_SLACK * best, f"{key}: error {measured[key]:.6g}, optimum {best:.6g}"
        assert abs(reported[key] - measured[key]) <= REPORT_ATOL, key
    assert torch.equal(theirs["lm_head.weight"], pair.w_base["lm_head.weight"])


def test_embedding_to_kohya_is_refused(llama_embed, tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    with pytest.raises(ExtractError, match="embedding"):
        loratool.extract(
            llama_embed.base, llama_embed.tuned, dest, rank=RANK, include=r"embed_tokens|self_attn", to="kohya"
        )
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# 5. dynamic rank from planted spectra
# ---------------------------------------------------------------------------------------------------

SPECTRA = {
    "three": [1.0, 0.8, 0.6, 1e-3, 1e-3, 5e-4],
    "one": [1.0, 5e-3, 2e-3],
    "ten": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
}
SPECTRUM_OF = {
    "q_proj": "three",
    "k_proj": "one",
    "v_proj": "ten",
    "o_proj": "one",
    "gate_proj": "ten",
    "up_proj": "three",
    "down_proj": "one",
}
# spec -> expected rank per spectrum, worked out by hand from SPECTRA (no value sits on a threshold):
# ratio keeps S_i >= S_0/v; fro the smallest k with sqrt(sum S[:k]^2 / sum S^2) >= v; eps keeps
# S_i > v; cumulative the smallest k with sum S[:k] / sum S >= v.
DYNAMIC = {
    "ratio:100": {"three": 3, "one": 1, "ten": 10},
    "ratio:3": {"three": 3, "one": 1, "ten": 7},
    "fro:0.999": {"three": 3, "one": 1, "ten": 10},
    "fro:0.9": {"three": 2, "one": 1, "ten": 5},
    "eps:0.65": {"three": 2, "one": 1, "ten": 4},
    "cumulative:0.99": {"three": 3, "one": 1, "ten": 10},
    "cumulative:0.7": {"three": 2, "one": 1, "ten": 5},
}


@pytest.fixture(scope="module")
def spectra(llama, tmp_path_factory) -> Pair:
    """The llama base with exactly SPECTRA planted per module, no noise."""
    model = llama.base_model
    generator = torch.Generator().manual_seed(4)
    state = model.state_dict()
    deltas = {
        k: planted(tuple(state[k].shape), SPECTRA[SPECTRUM_OF[k.split(".")[-2]]], generator) for k in llama.targets
    }
    return save_pair(tmp_path_factory.mktemp("spectra"), model, deltas, llama.targets)


def expected_ranks(keys: list[str], spec: str, cap: int | None = None) -> dict[str, int]:
    ranks = {key: DYNAMIC[spec][SPECTRUM_OF[key.split(".")[-2]]] for key in keys}
    return {key: min(r, cap) if cap else r for key, r in ranks.items()}


def test_the_hand_worked_dynamic_table_is_right() -> None:
    """The expectations above, recomputed from the rules' definitions (guards the table, not the code)."""
    for spec, by_spectrum in DYNAMIC.items():
        method, value = spec.split(":")
        v = float(value)
        for name, expected in by_spectrum.items():
            s = SPECTRA[name]
            if method == "ratio":
                k = sum(x >= s[0] / v for x in s)
            elif method == "eps":
                k = sum(x > v for x in s)
            else:
                terms = [x * x for x in s] if method == "fro" else s
                shares = [sum(terms[: i + 1]) / sum(terms) for i in range(len(s))]
                shares = [math.sqrt(x) for x in shares] if method == "fro" else shares
                k = next(i + 1 for i, x in enumerate(shares) if x >= v)
            assert k == expected, (spec, name, k)


@pytest.mark.parametrize("spec", list(DYNAMIC))
def test_dynamic_rank_follows_the_planted_spectra(spectra, tmp_path: Path, spec: str) -> None:
    adapter = tmp_path / "adapter"
    report = loratool.extract(spectra.base, spectra.tuned, adapter, dynamic=spec, device="cpu")
    assert report.method == f"{spec} (max rank 64)"
    got = {key_of(m.name): m.rank for m in report.modules}
    assert got == expected_ranks(spectra.targets, spec)
    assert 1 in got.values()
    tensors = load_file(str(adapter / ADAPTER))
    for module in report.modules:
        assert tensors[module.name + ".lora_A.weight"].shape[0] == module.rank, module.name
        assert tensors[module.name + ".lora_B.weight"].shape[1] == module.rank, module.name
        planted_s = SPECTRA[SPECTRUM_OF[key_of(module.name).split(".")[-2]]]
        tail = math.sqrt(sum(x * x for x in planted_s[module.rank :]) / sum(x * x for x in planted_s))
        # near-exact fits: compare the shares of ||D||^2 (see ENERGY_ATOL), not their square roots
        reported = module.relative_error**2
        assert abs(reported - tail**2) <= ENERGY_ATOL, (
            f"{module.name}: reports {reported:.3g} of ||D||^2 left, not {tail**2:.3g}"
        )
        assert module.retained == pytest.approx(1 - tail**2, abs=ENERGY_ATOL), module.name
    updates = peft_updates(adapter)
    for key, rank in got.items():  # the update is the rank-k truncation of D
        delta = spectra.delta(key)
        error = float((updates[key] - delta).norm() / delta.norm())
        assert error <= optimum(delta, rank) + 1e-5, key


@pytest.mark.parametrize(("spec", "cap"), [("ratio:100", 2), ("ratio:100", 6), ("fro:0.999", 1), ("eps:0.65", 3)])
def test_max_rank_caps_the_dynamic_rank(spectra, tmp_path: Path, spec: str, cap: int) -> None:
    adapter = tmp_path / "adapter"
    report = loratool.extract(spectra.base, spectra.tuned, adapter, dynamic=spec, max_rank=cap, device="cpu")
    assert report.method == f"{spec} (max rank {cap})"
    assert {key_of(m.name): m.rank for m in report.modules} == expected_ranks(spectra.targets, spec, cap)
    assert max(m.rank for m in report.modules) == cap


def test_dynamic_ranks_load_in_peft(spectra, tmp_path: Path) -> None:
    """Mixed ranks need PEFT's rank_pattern (and alpha_pattern) to be right, or loading fails."""
    adapter = tmp_path / "adapter"
    report = loratool.extract(spectra.base, spectra.tuned, adapter, dynamic="ratio:100", device="cpu")
    model = load_peft(spectra.base, adapter)
    ranks = {key_of(m.name): m.rank for m in report.modules}
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    for key, rank in ranks.items():
        layer = layers[WRAP + key.removesuffix(".weight")]
        assert layer.r["default"] == rank, key
        assert layer.scaling["default"] == pytest.approx(1.0), key  # alpha = rank per module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.merge_and_unload().state_dict()
    for key in ranks:
        delta = spectra.delta(key)
        error = float((theirs[key].double() - spectra.w_tuned[key].double()).norm() / delta.norm())
        assert error <= optimum(delta, ranks[key]) + 1e-5, key


# ---------------------------------------------------------------------------------------------------
# 6. alpha, 7. min_diff
# ---------------------------------------------------------------------------------------------------


def test_alpha_is_recorded_and_leaves_the_update_unchanged(llama, extracted, merged) -> None:
    with_alpha, _ = extracted(rank=4, alpha=8.0)
    without, _ = extracted(rank=4)
    assert json.loads((with_alpha / CONFIG).read_text())["lora_alpha"] == 8
    assert json.loads((with_alpha / CONFIG).read_text())["r"] == 4
    assert json.loads((without / CONFIG).read_text())["lora_alpha"] == 4
    a, b = peft_updates(with_alpha), peft_updates(without)
    assert sorted(a) == sorted(b) == llama.targets
    for key in llama.targets:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    scaled, plain = load_file(str(with_alpha / ADAPTER)), load_file(str(without / ADAPTER))
    for key, value in plain.items():  # the factors carry sqrt(r / alpha) each, undoing PEFT's alpha / r
        assert torch.allclose(scaled[key], value * math.sqrt(4 / 8), rtol=1e-5, atol=1e-8), key
    reference = merged(rank=4)
    for key, value in merged(rank=4, alpha=8.0).items():
        diff = float((value - reference[key]).abs().max())
        assert diff <= FP32_ATOL, f"{key}: merged with alpha 8 differs by {diff:g}"


UNCHANGED = "model.layers.1.self_attn.o_proj.weight"
SMALL = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def partial(llama, tmp_path_factory) -> Pair:
    """One module left as in the base, one changed by 1% of its norm, the rest as in `llama`."""
    model = llama.base_model
    deltas = llama_deltas(model)
    del deltas[UNCHANGED]
    deltas[SMALL] *= 0.01 / CHANGE
    return save_pair(tmp_path_factory.mktemp("partial"), model, deltas, llama.targets)


@pytest.mark.parametrize("min_diff", [0.0, 0.05])
def test_min_diff_skips_unchanged_and_small_changes(partial, tmp_path: Path, min_diff: float) -> None:
    adapter = tmp_path / "adapter"
    report = loratool.extract(partial.base, partial.tuned, adapter, rank=RANK, min_diff=min_diff, device="cpu")
    skipped = {key_of(m.name): m for m in report.skipped}
    expected = {UNCHANGED} if min_diff == 0 else {UNCHANGED, SMALL}
    assert set(skipped) == expected
    assert skipped[UNCHANGED].change == 0.0
    assert skipped[UNCHANGED].rank == 0
    if SMALL in skipped:
        change = float(partial.delta(SMALL).norm() / partial.w_base[SMALL].double().norm())
        assert skipped[SMALL].change == pytest.approx(change, rel=1e-5)
        assert 0.005 < change < 0.05
    assert sorted(key_of(m.name) for m in report.modules) == sorted(set(partial.targets) - expected)
    config = json.loads((adapter / CONFIG).read_text())
    tensors = load_file(str(adapter / ADAPTER))
    for key in expected:
        path = key.removesuffix(".weight")
        assert path not in config["target_modules"]
        assert not any(k.startswith(WRAP + path + ".") for k in tensors), key
    assert len(tensors) == 2 * len(report.modules)
    load_peft(partial.base, adapter)


def test_untouched_model_has_nothing_to_extract(llama, tmp_path: Path) -> None:
    same = tmp_path / "same"
    shutil.copytree(llama.base, same)
    dest = tmp_path / "adapter"
    with pytest.raises(ExtractError, match="nothing to extract"):
        loratool.extract(llama.base, same, dest, rank=RANK, device="cpu")
    assert not dest.exists()


# ---------------------------------------------------------------------------------------------------
# 8. determinism, 9. sharding
# ---------------------------------------------------------------------------------------------------


def test_extraction_is_deterministic(llama, tmp_path: Path) -> None:
    torch.manual_seed(123)  # the global RNG state must not matter
    loratool.extract(llama.base, llama.tuned, tmp_path / "one", rank=RANK, device="cpu")
    torch.manual_seed(456)
    torch.randn(1000)
    loratool.extract(llama.base, llama.tuned, tmp_path / "two", rank=RANK, device="cpu")
    for name in (ADAPTER, CONFIG):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory) -> tuple[Path, ExtractReport]:
    """The llama pair saved in 200 KB shards (same directory names), and its extraction."""
    root = tmp_path_factory.mktemp("sharded")
    llama.base_model.save_pretrained(root / "base", max_shard_size="200KB")
    llama.tuned_model.save_pretrained(root / "tuned", max_shard_size="200KB")
    for which in ("base", "tuned"):
        assert len(list((root / which).glob("*.safetensors"))) > 2, f"{which} should be sharded"
        assert (root / which / "model.safetensors.index.json").exists()
    report = loratool.extract(root / "base", root / "tuned", root / "adapter", rank=RANK, device="cpu")
    return root / "adapter", report


def test_sharded_checkpoints_give_the_same_adapter_tensors(sharded, extracted) -> None:
    (adapter, report), (whole, whole_report) = sharded, extracted()
    ours, theirs = (read_header(d / ADAPTER) for d in (adapter, whole))
    assert ours.metadata == theirs.metadata
    assert sorted(ours.entries) == sorted(theirs.entries)
    for key, entry in theirs.entries.items():
        assert ours.entries[key]["dtype"] == entry["dtype"] and ours.entries[key]["shape"] == entry["shape"], key
        assert ours.raw(key) == theirs.raw(key), f"{key}: other bytes from a sharded checkpoint"
    configs = [json.loads((d / CONFIG).read_text()) for d in (adapter, whole)]
    assert configs[0].pop("base_model_name_or_path") == str(adapter.parent / "base")
    configs[1].pop("base_model_name_or_path")
    assert configs[0] == configs[1]
    assert sorted(m.name for m in report.modules) == sorted(m.name for m in whole_report.modules)


def test_sharded_checkpoints_give_a_byte_identical_adapter(sharded, extracted) -> None:
    (adapter, _), (whole, _) = sharded, extracted()
    assert (adapter / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()


# ---------------------------------------------------------------------------------------------------
# 11. clamp
# ---------------------------------------------------------------------------------------------------


def kohya_clamped(delta: torch.Tensor, rank: int, quantile: float) -> torch.Tensor:
    """kohya's extract_lora_from_models: U S and V^T of the truncated SVD, both clamped to
    +-(the quantile of their values together), multiplied back."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), quantile)
    return u.clamp(-limit, limit).double() @ vh.clamp(-limit, limit).double()


def test_clamp_is_kohyas_quantile_clamp(llama, extracted, merged) -> None:
    adapter, report = extracted(clamp=0.99, exact=True)
    updates = peft_updates(adapter)
    assert sorted(updates) == llama.targets
    for key in llama.targets:
        # the same fp32 delta the tool forms, so the same exact SVD
        delta = llama.w_tuned[key] - llama.w_base[key]
        reference = kohya_clamped(delta, RANK, 0.99)
        gap = float((updates[key] - reference).norm() / reference.norm())
        assert gap <= 1e-5, f"{key}: {gap:.3g} from kohya's clamp"
        unclamped = kohya_clamped(delta, RANK, 1.0)  # the 1.0 quantile is the largest value: nothing clamped
        assert not torch.allclose(reference, unclamped, rtol=1e-4), f"{key}: 0.99 should clamp something"

    clamped = relative_errors(llama, merged(clamp=0.99, exact=True), llama.targets)
    plain = relative_errors(llama, merged(exact=True), llama.targets)
    for key in llama.targets:
        assert math.isfinite(clamped[key]), key
        assert clamped[key] > plain[key], f"{key}: clamping should cost accuracy"
        assert clamped[key] < 1.0, f"{key}: the clamped update should still approximate D"
    assert all(m.rank == RANK for m in report.modules)
    # The report tells the clamped truth, not the SVD's error before the clamp.
    reported = {key_of(m.name): m for m in report.modules}
    for key in llama.targets:
        assert reported[key].relative_error == pytest.approx(clamped[key], rel=1e-3), key
        assert reported[key].retained == pytest.approx(1 - clamped[key] ** 2, abs=1e-4), key


def test_clamp_with_the_randomized_svd_stays_finite_and_close(llama, extracted, merged) -> None:
    clamped = relative_errors(llama, merged(clamp=0.99), llama.targets)
    plain = relative_errors(llama, merged(), llama.targets)
    for key in llama.targets:
        assert math.isfinite(clamped[key]) and plain[key] < clamped[key] < 1.0, key


# ---------------------------------------------------------------------------------------------------
# 10. errors, through the API and the command line
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def others(tmp_path_factory) -> dict[str, Path]:
    """A GPT-2 model and a Llama whose MLP is wider than the base's."""
    root = tmp_path_factory.mktemp("others")
    tiny_gpt2().save_pretrained(root / "gpt2")
    tiny_llama(intermediate=256).save_pretrained(root / "wide")
    return {"gpt2": root / "gpt2", "wide": root / "wide"}


ERRORS: dict[str, tuple[dict, str]] = {
    "rank-and-dynamic": ({"rank": 4, "dynamic": "ratio:10"}, "exactly one of"),
    "neither": ({}, "exactly one of"),
    "bad-method": ({"dynamic": "bogus:1"}, "--dynamic"),
    "no-value": ({"dynamic": "ratio"}, "--dynamic"),
    "fro-above-1": ({"dynamic": "fro:2"}, "--dynamic"),
    "ratio-below-1": ({"dynamic": "ratio:0.5"}, "--dynamic"),
    "not-a-number": ({"dynamic": "eps:abc"}, "--dynamic"),
    "max-rank-without-dynamic": ({"rank": 4, "max_rank": 8}, "--max-rank"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_options_are_refused(llama, tmp_path: Path, case: str) -> None:
    options, message = ERRORS[case]
    dest = tmp_path / "adapter"
    with pytest.raises(ExtractError, match=message):
        loratool.extract(llama.base, llama.tuned, dest, device="cpu", **options)
    assert not dest.exists()


@pytest.mark.parametrize(("tuned", "message"), [("gpt2", "is llama but TUNED"), ("wide", "BASE has it as")])
def test_checkpoints_of_different_models_are_refused(llama, others, tmp_path: Path, tuned: str, message: str) -> None:
    dest = tmp_path / "adapter"
    with pytest.raises(ExtractError, match=message):
        loratool.extract(llama.base, others[tuned], dest, rank=4, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_existing_dest_is_kept_without_force(llama, tmp_path: Path) -> None:
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        loratool.extract(llama.base, llama.tuned, dest, rank=4, device="cpu")
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "mine"
    loratool.extract(llama.base, llama.tuned, dest, rank=4, device="cpu", force=True)
    assert sorted(p.name for p in dest.iterdir()) == [CONFIG, ADAPTER]


def assert_one_error_line(result) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratool: error:"), result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


CLI_ERRORS: dict[str, list[str]] = {
    "rank-and-dynamic": ["--rank", "4", "--dynamic", "ratio:10"],
    "neither": [],
    "bad-dynamic": ["--dynamic", "fro:2"],
    "bad-method": ["--dynamic", "svd:3"],
}


@pytest.mark.parametrize("case", [*CLI_ERRORS, "other-model", "other-shape", "existing-dest"])
def test_cli_errors_are_one_line_and_exit_2(llama, others, tmp_path: Path, case: str) -> None:
    base, tuned, dest = str(llama.base), str(llama.tuned), tmp_path / "adapter"
    args = CLI_ERRORS.get(case, ["--rank", "4"])
    if case == "other-model":
        tuned = str(others["gpt2"])
    elif case == "other-shape":
        tuned = str(others["wide"])
    elif case == "existing-dest":
        dest.mkdir()
        (dest / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["extract", base, tuned, "-o", str(dest), "--device", "cpu", "-q", *args])
    assert_one_error_line(result)
    if case == "existing-dest":
        assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    else:
        assert not dest.exists()


def test_cli_extract_json(llama, extracted, tmp_path: Path) -> None:
    dest = tmp_path / "adapter"
    args = ["extract", str(llama.base), str(llama.tuned), "-o", str(dest), "--rank", str(RANK), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target"] == "peft"
    assert report["method"] == f"rank {RANK}"
    assert report["exact"] is False
    assert sorted(key_of(m["name"]) for m in report["modules"]) == llama.targets
    assert all(m["rank"] == RANK for m in report["modules"])
    whole, _ = extracted()
    assert (dest / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes(), "the CLI writes what the API writes"
    again = CliRunner().invoke(main, [*args, "-q", "--exact"])
    assert_one_error_line(again)  # DEST exists
    assert (dest / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()
    forced = CliRunner().invoke(main, [*args, "-q", "--exact", "--force"])
    assert forced.exit_code == 0, forced.output
    exact, _ = extracted(exact=True)
    assert (dest / ADAPTER).read_bytes() == (exact / ADAPTER).read_bytes(), "--force replaces DEST"


def test_a_non_finite_delta_is_an_error_naming_the_module(llama, tmp_path: Path) -> None:
    broken = tmp_path / "tuned"
    shutil.copytree(llama.tuned, broken)
    path = broken / "model.safetensors"
    tensors = load_file(str(path))
    key = llama.targets[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), {"format": "pt"})
    with pytest.raises(ExtractError, match=re.escape(key.removesuffix(".weight")) + ".*not finite"):
        loratool.extract(llama.base, broken, tmp_path / "out", rank=RANK, device="cpu")
    assert not (tmp_path / "out").exists()


def test_scaled_fp8_checkpoints_are_refused(llama, tmp_path: Path) -> None:
    """ComfyUI's scaled fp8 keeps a per-weight scale beside it; ignoring it would extract garbage."""
    scaled = tmp_path / "tuned"
    shutil.copytree(llama.tuned, scaled)
    path = scaled / "model.safetensors"
    tensors = load_file(str(path))
    key = llama.targets[0]
    tensors[key.removesuffix("weight") + "scale_weight"] = torch.tensor(1.0)
    save_file(tensors, str(path), {"format": "pt"})
    with pytest.raises(ExtractError, match="scaled fp8"):
        loratool.extract(llama.base, scaled, tmp_path / "out", rank=RANK, device="cpu")
    assert not (tmp_path / "out").exists()
