"""PEFT's AdaLoRA, VeRA, OFT and BOFT adapters (issue 20), against PEFT itself on a tiny Llama.

The oracle for every merge is PEFT's own `merge_and_unload` of the adapter directory it saved,
reloaded with `PeftModel.from_pretrained` (what the files mean to PEFT; the `oracle` tests check that
it equals the merge of the model that saved them, and which base tensors it changes). The trained
parameters are randomized with a seeded generator first: PEFT initializes most of them to an
identity or a zero update, against which no test could fail.

- AdaLoRA, after one rank allocation step (a real backward pass, then `update_and_allocate`): the
  merge at strength s is W + s (oracle - W); inspect's rank is what the allocation left; converted to
  PEFT LoRA or kohya, the plain LoRA merges to the same weights.
- VeRA with its shared projections saved: the merge at strength s is W + s (oracle - W), negative
  strengths included. Without them (`save_projection=False`) it is refused by name.
- OFT and BOFT (multiplicative: strength 1 only) in several configurations; BOFT's multi-stage
  butterflies come from PEFT's math with its CUDA block-diagonal kernel replaced by torch.
- Layouts that cannot hold OFT, BOFT or VeRA refuse them by name; combine and resize refuse the
  rotations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import llama

import loratool
from loratool.errors import ConversionError, LoratoolError

peft = pytest.importorskip("peft")

LAYERS = 2  # tiny_models.llama(): hidden 32, intermediate 64, 2 layers
PATHS = {
    "q_proj": "self_attn.q_proj",  # 32 -> 32
    "v_proj": "self_attn.v_proj",  # 32 -> 16
    "up_proj": "mlp.up_proj",  # 32 -> 64
    "down_proj": "mlp.down_proj",  # 64 -> 32
}
TARGETS = ("q_proj", "v_proj", "down_proj")


def close(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def module_names(targets: tuple[str, ...]) -> list[str]:
    return [f"model.layers.{i}.{PATHS[t]}" for i in range(LAYERS) for t in targets]


@dataclass
class Saved:
    """An adapter dir PEFT saved, and what PEFT makes of it."""

    adapter: Path
    oracle: dict[str, torch.Tensor]  # merge_and_unload of PeftModel.from_pretrained(adapter)
    in_memory: dict[str, torch.Tensor]  # merge_and_unload of the model that saved it
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors
    config: dict
    modules: list[str]  # the modules PEFT adapted
    notes: dict = field(default_factory=dict)

    @property
    def changed(self) -> set[str]:
        """The base tensors a merge must change."""
        return {f"{name}.weight" for name in self.modules}


def randomize(model: torch.nn.Module, seed: int, draws: dict[str, Callable]) -> torch.Generator:
    """Each parameter whose name holds a key of `draws` becomes draws[key](shape, generator)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            for part, draw in draws.items():
                if part in name:
                    param.copy_(draw(param.shape, g))
    return g


def normal(std: float, mean: float = 0.0) -> Callable:
    return lambda shape, g: mean + std * torch.randn(shape, generator=g)


def save(root: Path, model, modules: list[str], notes: dict | None = None) -> Saved:
    from peft import PeftModel

    adapter = root / "adapter"
    model.save_pretrained(adapter)
    in_memory = state(model.merge_and_unload())
    oracle = state(PeftModel.from_pretrained(llama(), adapter).merge_and_unload())
    return Saved(
        adapter=adapter,
        oracle=oracle,
        in_memory=in_memory,
        tensors=load_file(str(adapter / "adapter_model.safetensors")),
        config=json.loads((adapter / "adapter_config.json").read_text()),
        modules=modules,
        notes=notes or {},
    )


# AdaLoRA ----------------------------------------------------------------------------------------

INIT_R, TARGET_R, ADALORA_ALPHA = 6, 3, 12
# PEFT's cubic schedule at step 5 of 10 (tinit 1, tfinal 2) over 6 modules:
# int((6 * 6 - 3 * 6) * (1 - (5 - 1) / (10 - 2 - 1)) ** 3 + 3 * 6) ranks kept of 36
ADALORA_BUDGET = 19
STARVED = "model.layers.1.self_attn.q_proj"


def build_adalora(root: Path, seed: int, starve: str | None = None) -> Saved:
    """Randomized factors and singular values, then one real budget-allocation step mid-schedule.

    `starve`: a module whose factors are drawn 100 times smaller, so that the allocator scores all
    its ranks least important and prunes the module to nothing.
    """
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        init_r=INIT_R,
        target_r=TARGET_R,
        lora_alpha=ADALORA_ALPHA,
        total_step=10,
        tinit=1,
        tfinal=2,
        target_modules=list(TARGETS),
    )
    model = get_peft_model(llama(), config)
    g = randomize(model, seed, {"lora_A": normal(0.3), "lora_B": normal(0.3), "lora_E": normal(1.0)})
    if starve is not None:
        with torch.no_grad():
            for name, param in model.base_model.model.get_submodule(starve).named_parameters():
                if name.startswith("lora_"):
                    param.mul_(0.01)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()  # the allocator scores parameters by |p * grad|
    # Step 5 is in the budgeting phase (tinit < 5 < total_step - tfinal): the budget drops to
    # ADALORA_BUDGET of the 36 ranks and the least important entries of lora_E are set to zero.
    model.base_model.update_and_allocate(5)
    model.zero_grad()
    kept = {
        name.removesuffix(".lora_E.default"): int(torch.count_nonzero(p))
        for name, p in model.base_model.model.named_parameters()
        if name.endswith(".lora_E.default")
    }
    modules = [m for m in module_names(TARGETS) if kept[m] > 0]
    return save(root, model, modules, {"kept": kept})


# VeRA -------------------------------------------------------------------------------------------

VERA_R = 4
VERA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # so the shared projections are sliced 4 ways


def build_vera(root: Path, save_projection: bool) -> Saved:
    from peft import VeraConfig, get_peft_model

    targets = VERA_TARGETS if save_projection else ("q_proj", "v_proj")
    config = VeraConfig(r=VERA_R, target_modules=list(targets), save_projection=save_projection)
    model = get_peft_model(llama(), config)
    randomize(model, 1, {"vera_lambda_b": normal(1.0), "vera_lambda_d": normal(1.0)})
    return save(root, model, module_names(targets))


# OFT --------------------------------------------------------------------------------------------

COFT_EPS = 0.1
OFT_VARIANTS = {
    "block8": dict(r=0, oft_block_size=8),  # Cayley-Neumann with 5 terms: PEFT's default
    "exact-cayley": dict(r=0, oft_block_size=8, use_cayley_neumann=False),
    "neumann-3-terms": dict(r=0, oft_block_size=8, num_cayley_neumann_terms=3),
    # PEFT clips each block's skew matrix to Frobenius norm eps / sqrt(blocks) when it merges
    "coft": dict(r=0, oft_block_size=8, coft=True, eps=COFT_EPS),
    "block-share": dict(r=0, oft_block_size=8, block_share=True),  # one block for the whole layer
    "r4": dict(r=4, oft_block_size=0),  # block size in_features // 4: 8 for q/v, 16 for down_proj
}


def build_oft(root: Path, variant: str) -> Saved:
    from peft import OFTConfig, get_peft_model

    options = OFT_VARIANTS[variant]
    model = get_peft_model(llama(), OFTConfig(target_modules=list(TARGETS), **options))
    if options.get("coft"):
        # Alternate rows (blocks) between 0.1 and 0.001: the first are far outside eps and get clipped,
        # the others are inside it and kept, so both branches of the projection are used.
        def draw(shape, g):
            scale = torch.tensor([0.1 if i % 2 == 0 else 0.001 for i in range(shape[0])])[:, None]
            return scale * torch.randn(shape, generator=g)

        randomize(model, 2, {"oft_R": draw})
    else:
        randomize(model, 2, {"oft_R": normal(0.1)})
    # get_weight (called by merge) overwrites a COFT parameter with its projection, in place:
    # keep the parameters to see what the saved (unprojected) values became.
    params = {n: p for n, p in model.named_parameters() if "oft_R" in n}
    saved = save(root, model, module_names(TARGETS))
    saved.notes["projected"] = {n.replace(".oft_R.default.", ".oft_R."): p.detach().clone() for n, p in params.items()}
    return saved


# BOFT -------------------------------------------------------------------------------------------


def fake_fbd_cuda() -> SimpleNamespace:
    """PEFT's CUDA block-diagonal kernel in torch: (stages, blocks, b, b) -> (stages, blocks*b, blocks*b).

    Without the kernel (get_fbd_cuda() is None: no CUDA, no ninja) PEFT silently builds a single
    butterfly stage whatever boft_n_butterfly_factor says; with it, each stage is block_diag'ed here.
    """

    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*stage) for stage in blocks])]

    def backward(*_):
        raise AssertionError("no training here")

    return SimpleNamespace(forward=forward, backward=backward)


# name: (config, whether the CUDA kernel is there)
BOFT_VARIANTS = {
    "size4": (dict(boft_block_size=4), False),
    "num4": (dict(boft_block_size=0, boft_block_num=4), False),  # block size 8 for q/v, 16 for down_proj
    "size4-with-kernel": (dict(boft_block_size=4), True),  # the stand-in, at one stage, is PEFT's own path
    "size4-factor2": (dict(boft_block_size=4, boft_n_butterfly_factor=2), True),
    "num4-factor2": (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2), True),
    "size2-factor3": (dict(boft_block_size=2, boft_n_butterfly_factor=3), True),
    # Trained where the kernel could not load: the config says 2, the tensors hold one stage.
    "size4-factor2-without-kernel": (dict(boft_block_size=4, boft_n_butterfly_factor=2), False),
}


def build_boft(root: Path, variant: str) -> Saved:
    from peft import BOFTConfig, get_peft_model
    from peft.tuners.boft import layer

    options, kernel = BOFT_VARIANTS[variant]
    fbd = fake_fbd_cuda() if kernel else None
    # Patched either way: on a machine without CUDA the real get_fbd_cuda tries (and fails) to
    # compile the extension into ~/.cache/torch_extensions, then returns None.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer, "get_fbd_cuda", lambda: fbd)
        model = get_peft_model(llama(), BOFTConfig(target_modules=list(TARGETS), **options))
        randomize(model, 3, {"boft_R": normal(0.1), "boft_s": normal(0.1, mean=1.0)})
        return save(root, model, module_names(TARGETS), {"stages": options.get("boft_n_butterfly_factor", 1)})


BUILDERS: dict[str, Callable[[Path], Saved]] = {
    "adalora-pruned": partial(build_adalora, seed=3),  # every module keeps 2 to 5 of its 6 ranks
    "adalora-module-pruned-away": partial(build_adalora, seed=3, starve=STARVED),
    "vera": partial(build_vera, save_projection=True),
    "vera-no-projection": partial(build_vera, save_projection=False),
    **{f"oft-{v}": partial(build_oft, variant=v) for v in OFT_VARIANTS},
    **{f"boft-{v}": partial(build_boft, variant=v) for v in BOFT_VARIANTS},
}
ADALORA = ["adalora-pruned", "adalora-module-pruned-away"]
OFT = [f"oft-{v}" for v in OFT_VARIANTS]
BOFT = [f"boft-{v}" for v in BOFT_VARIANTS]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[str], Saved]:
    """built(name): the case, made once per module on first use."""
    cache: dict[str, Saved] = {}

    def get(name: str) -> Saved:
        if name not in cache:
            cache[name] = BUILDERS[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "llama"
    llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def before() -> dict[str, torch.Tensor]:
    return state(llama())


def merged(base: Path, adapter: Path, dest: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    loratool.merge(base, [adapter], dest, weights=[strength], device="cpu")
    return load_file(str(dest / "model.safetensors"))


def check_merge(got: dict, before: dict, case: Saved, strength: float = 1.0) -> None:
    """Every tensor is W + strength (oracle - W), and exactly the adapted ones changed."""
    assert set(got) == set(before)
    for key, value in got.items():
        want = case.oracle[key] if strength == 1 else before[key] + strength * (case.oracle[key] - before[key])
        close(value, want, key)
    assert {k for k in got if not torch.equal(got[k], before[k])} == case.changed


def modules_by_name(report) -> dict:
    return {m.name: m for m in report.modules}


# The oracles themselves -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "vera-no-projection"])
def test_oracle_is_what_peft_makes_of_the_saved_dir(built, before, name: str) -> None:
    """The merge of the model that saved the dir equals that of the dir reloaded, changes exactly
    the adapted tensors, and by a clear, finite amount."""
    case = built(name)
    for key, value in case.oracle.items():
        torch.testing.assert_close(value, case.in_memory[key], rtol=1e-6, atol=1e-7)
    changed = {k for k, v in case.oracle.items() if not torch.equal(v, before[k])}
    assert changed == case.changed
    for key in changed:
        delta = case.oracle[key] - before[key]
        assert torch.isfinite(delta).all() and delta.abs().max() > 1e-3 * before[key].abs().max(), key


@pytest.mark.parametrize("name", OFT + BOFT)
def test_saved_config_holds_the_options(built, name: str) -> None:
    """What the implementation reads: PEFT writes each option into adapter_config.json as given."""
    case = built(name)
    options = OFT_VARIANTS[name[4:]] if name.startswith("oft-") else BOFT_VARIANTS[name[5:]][0]
    assert {k: case.config[k] for k in options} == options
    assert case.config["peft_type"] == ("OFT" if name.startswith("oft-") else "BOFT")


def test_adalora_oracle_was_pruned(built) -> None:
    """The allocation really zeroed entries of E, and PEFT saved only the ranks it kept."""
    for name, fully_kept in (("adalora-pruned", True), ("adalora-module-pruned-away", False)):
        case = built(name)
        kept = case.notes["kept"]
        assert sum(kept.values()) == ADALORA_BUDGET and max(kept.values()) <= INIT_R
        assert (min(kept.values()) > 0) == fully_kept
        assert fully_kept or kept[STARVED] == 0
        pattern = case.config["rank_pattern"]  # {"model.layers.0.mlp.down_proj.lora_E": [bool] * init_r}
        assert {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()} == kept
        assert all(len(v) == INIT_R for v in pattern.values())
        assert not [k for k in case.tensors if "ranknum" in k]  # the scale's divisor is init_r, from the config
        for module, rank in kept.items():
            key = f"base_model.model.{module}"
            assert case.tensors[f"{key}.lora_E"].shape == (rank, 1)
            assert case.tensors[f"{key}.lora_A"].shape[0] == case.tensors[f"{key}.lora_B"].shape[1] == rank


def test_vera_oracle_saves_the_widest_projections(built) -> None:
    case = built("vera")
    assert case.tensors["base_model.vera_A"].shape == (VERA_R, 64)  # r x the widest input
    assert case.tensors["base_model.vera_B"].shape == (64, VERA_R)  # the widest output x r
    assert not [k for k in built("vera-no-projection").tensors if "vera_A" in k or "vera_B" in k]


def test_coft_oracle_clips_some_blocks_and_keeps_others(built) -> None:
    case = built("oft-coft")
    clipped = kept = 0
    for key, projected in case.notes["projected"].items():
        saved = case.tensors[key]
        for row, (a, b) in enumerate(zip(saved, projected, strict=True)):
            if torch.equal(a, b):
                kept += 1
                assert row % 2 == 1, key
            else:
                clipped += 1
                assert row % 2 == 0 and b.norm() < 0.5 * a.norm(), key
    assert clipped and kept


@pytest.mark.parametrize("name", BOFT)
def test_boft_oracle_has_the_stages_peft_built(built, name: str) -> None:
    case = built(name)
    _, kernel = BOFT_VARIANTS[name.removeprefix("boft-")]
    stages = case.notes["stages"] if kernel else 1
    assert case.config["boft_n_butterfly_factor"] == case.notes["stages"]
    assert {t.shape[0] for k, t in case.tensors.items() if k.endswith(".boft_R")} == {stages}


def test_boft_kernel_stand_in_agrees_with_peft_without_it(built) -> None:
    one, other = built("boft-size4").oracle, built("boft-size4-with-kernel").oracle
    for key, value in one.items():
        torch.testing.assert_close(other[key], value, rtol=1e-6, atol=1e-7)


# AdaLoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADALORA)
def test_adalora_is_inspected_with_the_rank_allocation_left(built, name: str) -> None:
    case = built(name)
    effective = {
        key.removeprefix("base_model.model.").removesuffix(".lora_E"): int(torch.count_nonzero(t))
        for key, t in case.tensors.items()
        if key.endswith(".lora_E")
    }
    report = loratool.inspect(case.adapter)
    assert report.format == "peft" and {m.kind for m in report.modules} == {"adalora"}
    ranks = {m.name: m.rank for m in report.modules}
    # a module pruned to nothing may be left out; if it is listed, its rank is 0
    assert ranks == {n: r for n, r in effective.items() if r > 0 or n in ranks}
    for m in report.modules:
        assert m.scale == pytest.approx(ADALORA_ALPHA / (INIT_R + 1e-5), rel=1e-6), m.name
    assert not [f for f in report.findings if f.severity == "error"]
    if name == "adalora-pruned":
        assert not [f for f in report.findings if f.severity != "info"]


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("name", ADALORA)
def test_adalora_merge_equals_merge_and_unload(built, base, before, tmp_path, name: str, strength: float) -> None:
    case = built(name)
    check_merge(merged(base, case.adapter, tmp_path / "merged", strength), before, case, strength)


@pytest.mark.parametrize("name", ADALORA)
def test_adalora_converts_to_a_plain_peft_lora(built, tmp_path, name: str) -> None:
    """E folded into A and lora_alpha / (init_r + 1e-5) carried as the scale: PEFT's LoRA of the
    converted dir merges to AdaLoRA's weights."""
    from peft import PeftModel

    case = built(name)
    loratool.convert(case.adapter, "peft", tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not [k for k in load_file(str(tmp_path / "lora" / "adapter_model.safetensors")) if "lora_E" in k]
    got = state(PeftModel.from_pretrained(llama(), tmp_path / "lora").merge_and_unload())
    for key, value in got.items():
        close(value, case.oracle[key], key)


@pytest.mark.parametrize("name", ADALORA)
def test_adalora_converts_to_a_plain_kohya_lora(built, base, before, tmp_path, name: str) -> None:
    case = built(name)
    out = tmp_path / "adalora.safetensors"
    loratool.convert(case.adapter, "kohya", out)
    assert not [k for k in load_file(str(out)) if "lora_E" in k]
    assert {m.kind for m in loratool.inspect(out).modules} == {"lora"}
    check_merge(merged(base, out, tmp_path / "merged"), before, case)


# VeRA -------------------------------------------------------------------------------------------


def test_vera_is_inspected_as_what_it_is(built) -> None:
    case = built("vera")
    report = loratool.inspect(case.adapter)
    assert report.format == "peft" and {m.kind for m in report.modules} == {"vera"}
    assert sorted(modules_by_name(report)) == sorted(case.modules)
    assert {m.rank for m in report.modules} == {VERA_R}
    assert not [f for f in report.findings if f.severity != "info"]


@pytest.mark.parametrize("strength", [1.0, -1.0])
def test_vera_merge_equals_merge_and_unload(built, base, before, tmp_path, strength: float) -> None:
    """VeRA's update is (lambda_b * B) @ (lambda_d * A): linear in the strength, negative included."""
    case = built("vera")
    check_merge(merged(base, case.adapter, tmp_path / "merged", strength), before, case, strength)


def test_vera_without_its_projections_is_refused(built, base, tmp_path) -> None:
    """PEFT regenerates them from projection_prng_key with torch's generator; loratool does not guess."""
    case = built("vera-no-projection")
    assert case.config["save_projection"] is False
    with pytest.raises(LoratoolError, match="save_projection"):
        loratool.inspect(case.adapter)
    with pytest.raises(LoratoolError, match="save_projection"):
        loratool.merge(base, [case.adapter], tmp_path / "merged", device="cpu")
    assert not (tmp_path / "merged").exists()


# OFT and BOFT -----------------------------------------------------------------------------------


def expected_block_sizes(case: Saved, before: dict) -> dict[str, int]:
    """Each module's block size as PEFT's config sets it (the rotation acts on the input side)."""
    sizes = {}
    for name in case.modules:
        in_features = before[f"{name}.weight"].shape[1]
        c = case.config
        if c["peft_type"] == "OFT":
            sizes[name] = c["oft_block_size"] or in_features // c["r"]
        else:
            sizes[name] = c["boft_block_size"] or in_features // c["boft_block_num"]
    return sizes


@pytest.mark.parametrize("name", OFT + BOFT)
def test_rotations_are_inspected_with_their_block_size(built, before, name: str) -> None:
    case = built(name)
    kind = "oft-peft" if name.startswith("oft-") else "boft-peft"
    report = loratool.inspect(case.adapter)
    assert report.format == "peft" and {m.kind for m in report.modules} == {kind}
    got = {m.name: m.block_size for m in report.modules}
    assert got == expected_block_sizes(case, before)
    assert all(type(size) is int for size in got.values())
    assert not [f for f in report.findings if f.severity == "error"]


@pytest.mark.parametrize("name", OFT + BOFT)
def test_rotations_merge_equals_merge_and_unload(built, base, before, tmp_path, name: str) -> None:
    case = built(name)
    check_merge(merged(base, case.adapter, tmp_path / "merged"), before, case)


# Refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"), [("oft-block8", r"OFT \(PEFT\)"), ("boft-size4", r"BOFT \(PEFT\)"), ("vera", "VeRA")]
)
def test_layouts_that_cannot_hold_it_refuse_it_by_name(built, tmp_path, name: str, label: str) -> None:
    case = built(name)
    for to, dest in (("kohya", tmp_path / "out.safetensors"), ("diffusers", tmp_path / "out_diffusers")):
        with pytest.raises(ConversionError, match=label):
            loratool.convert(case.adapter, to, dest)
        assert not dest.exists()


@pytest.mark.parametrize(
    ("name", "label"), [("oft-block8", r"OFT \(PEFT\)"), ("boft-size4", r"BOFT \(PEFT\)"), ("vera", "VeRA")]
)
def test_combine_and_resize_refuse_them_by_name(built, tmp_path, name: str, label: str) -> None:
    case = built(name)
    with pytest.raises(LoratoolError, match=label):
        loratool.combine([case.adapter, case.adapter], tmp_path / "combined")
    with pytest.raises(LoratoolError, match=label):
        loratool.resize(case.adapter, tmp_path / "resized", rank=2)
    assert not (tmp_path / "combined").exists() and not (tmp_path / "resized").exists()


@pytest.mark.parametrize("name", ["oft-block8", "oft-coft", "oft-block-share", "boft-size4", "boft-num4"])
def test_rotations_convert_to_a_peft_dir_peft_merges_the_same(built, tmp_path, monkeypatch, name: str) -> None:
    """A PEFT dir can hold OFT and BOFT: the copy carries the config whose settings decide the math."""
    from peft import PeftModel
    from peft.tuners.boft import layer

    case = built(name)
    loratool.convert(case.adapter, "peft", tmp_path / "copy")
    # One stage, as the file holds; and no attempt to compile the CUDA kernel, whose build imports
    # setuptools, whose vendored packages then shadow the installed ones for the rest of the session.
    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: None)
    reloaded = state(PeftModel.from_pretrained(llama(), tmp_path / "copy").merge_and_unload())
    for key, value in reloaded.items():
        close(value, case.oracle[key], key)


def test_vera_is_refused_by_peft_output_too(built, tmp_path) -> None:
    """VeRA's projections are shared by every module; loratool writes no VeRA dir (merge it)."""
    with pytest.raises(ConversionError, match="VeRA"):
        loratool.convert(built("vera").adapter, "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ADALORA)
def test_adalora_combines_and_resizes_as_the_lora_it_is(built, base, before, tmp_path, name: str) -> None:
    """AdaLoRA is a low-rank product: combining it with itself at 0.5 + 0.5 merges to the oracle,
    and resizing to its own largest rank changes nothing."""
    case = built(name)
    loratool.combine([case.adapter, case.adapter], tmp_path / "combined", weights=[0.5, 0.5])
    check_merge(merged(base, tmp_path / "combined", tmp_path / "m1"), before, case)
    rank = max(m.rank for m in loratool.inspect(case.adapter).modules)
    loratool.resize(case.adapter, tmp_path / "resized", rank=rank)
    check_merge(merged(base, tmp_path / "resized", tmp_path / "m2"), before, case)


@pytest.mark.parametrize(("name", "label"), [("oft-block8", r"OFT \(PEFT\)"), ("boft-size4", r"BOFT \(PEFT\)")])
def test_rotations_refuse_a_negative_strength(built, base, tmp_path, name: str, label: str) -> None:
    with pytest.raises(LoratoolError, match=label + ".*negative"):
        merged(base, built(name).adapter, tmp_path / "out", strength=-0.5)
    assert not (tmp_path / "out").exists()
