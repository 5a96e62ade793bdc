"""LyCORIS's orthogonal kinds, diag-OFT and BOFT, with LyCORIS as the oracle.

Networks are built by lycoris-lora itself (`lycoris.kohya.create_network`, algo "diag-oft" or "boft")
on the tiny SD1.5 UNet and CLIP, linear and conv layers alike; their zero-initialised `oft_blocks` are
randomized (and `rescale`, where present), and the file is written by LyCORIS's own `save_weights`.
loratool then merges it into a single-file base: every adapted layer, run plainly with the merged
weight, must give what the LyCORIS-wrapped layer gives on random inputs, at strength 1 and at 0.5
(the network's multiplier then 0.5 too: LyCORIS interpolates each rotation toward the identity and
applies `rescale` whole, which is not half the strength-1 update).

The constrained cases use a constraint small enough that LyCORIS really clips ||Q|| for some modules
(and, for the larger layers, not for others); the tests assert that from the randomized blocks, so a
merge ignoring the constraint fails. `test_saved_tensors_explain_lycoris_weights` rebuilds each
merged weight from the saved tensors alone with an independent reading of LyCORIS's formulas (whole
rotation matrices, not its reshapes), so the facts the other tests rely on are checked too.

inspect reports the kinds ("oft": 3-D blocks, "boft": 4-D) and their block size; convert to kohya
(the file's own layout) keeps every tensor; diffusers and PEFT cannot hold these kinds, and combine
and resize have no low-rank factors to work on: each refuses, naming the kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_merge_lycoris import check_layers, save_base
from tiny_models import kohya_clip, sd15_unet

import loratool
from loratool.errors import ConversionError, LoratoolError

pytest.importorskip("lycoris")
from make_fixtures import lycoris_network


@dataclass(frozen=True)
class Config:
    algo: str
    dim: int  # LyCORIS's lora_dim: the wanted block size for linear layers
    conv_dim: int  # the same for conv layers
    constraint: float | None  # None: not passed (LyCORIS then stores alpha 0 and never clips)
    rescaled: bool


CONFIGS = {
    "diag-oft": Config("diag-oft", 4, 8, None, False),
    # 0.02 * out_dim is below ||Q|| for the 32- and 64-wide layers and above it for the 256-wide one.
    "diag-oft-constrained": Config("diag-oft", 4, 4, 0.02, False),
    "diag-oft-rescaled": Config("diag-oft", 4, 8, None, True),
    "boft": Config("boft", 2, 4, None, False),
    # 0.05 * out_dim is below ||Q|| for the 32- and 64-wide layers and above it for the 256-wide one.
    "boft-constrained-rescaled": Config("boft", 4, 4, 0.05, True),
}
KIND = {"diag-oft": "oft", "boft": "boft"}
LABEL = {"diag-oft": "OFT", "boft": "BOFT"}
MODULE_CLASS = {"diag-oft": "DiagOFTModule", "boft": "ButterflyOFTModule"}


@dataclass
class Built:
    config: Config
    network: object  # lycoris.kohya.LycorisNetworkKohya, applied to its own UNet and CLIP
    base: Path
    lora: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each network built, randomized and saved once for the whole module, on first use."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            # Neutral folder and file names: a message quoting a path must not name the kind by chance.
            cache[name] = build(name, tmp_path_factory.mktemp("network"))
        return cache[name]

    return get


def build(name: str, tmp: Path) -> Built:
    config = CONFIGS[name]
    torch.manual_seed(0)
    unet, te = sd15_unet(), kohya_clip()
    base = save_base(unet, te, tmp, "single-file")
    options: dict[str, object] = {"rescaled": config.rescaled}
    if config.constraint is not None:
        options["constraint"] = config.constraint
    network = lycoris_network(config.algo, config.dim, 1.0, config.conv_dim, 1.0, {}, (unet, te), **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in sorted(network.named_parameters()):
            noise = torch.randn(param.shape, generator=g) * 0.1
            if key.endswith("oft_blocks"):
                param.copy_(noise)  # zero as built: the identity rotation, which no test could tell apart
            elif key.endswith("rescale"):
                param.copy_(1 + noise)
            else:
                raise AssertionError(f"unexpected LyCORIS parameter {key}")
    lora = tmp / "adapter.safetensors"
    network.save_weights(str(lora), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return Built(config, network, base, lora)


def skew_norm(blocks: torch.Tensor) -> float:
    """||Q|| over the whole tensor, Q = blocks - blocks^T per block: what LyCORIS's constraint bounds."""
    return float((blocks - blocks.transpose(-1, -2)).norm())


def cayley(blocks: torch.Tensor, limit: float) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 per block, Q skew and scaled down to norm `limit` where above it (0: never)."""
    q = blocks.double() - blocks.double().transpose(-1, -2)
    norm = float(q.norm()) + 1e-8
    if limit > 0 and norm > limit:
        q = q * (limit / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


def reference_weight(tensors: dict[str, torch.Tensor], name: str, weight: torch.Tensor, strength: float):
    """The merged weight from the saved tensors alone, each rotation a whole out x out matrix.

    diag-OFT: W' = rescale * (blockdiag(R_s))^T W, R_s = s R + (1 - s) I per block.
    BOFT: W' = rescale * (M_{m-1} ... M_0) W, stage i's M_i = blockdiag(R_i,s) on the output channels
    taken in the order that pairs channel c with c + 2^i * b/2 (b the block size).
    """
    blocks, alpha = tensors[f"{name}.oft_blocks"], tensors[f"{name}.alpha"]
    rescale = tensors.get(f"{name}.rescale")
    out = weight.shape[0]
    w = weight.double().reshape(out, -1)
    eye_out = torch.eye(out, dtype=torch.float64)
    r = cayley(blocks, float(alpha) * out)
    eye_block = torch.eye(blocks.shape[-1], dtype=torch.float64)
    r = strength * r + (1 - strength) * eye_block
    if blocks.ndim == 3:
        rotation = block_diagonal(r).T
    else:
        rotation = eye_out
        size = blocks.shape[-1]
        for i, stage in enumerate(r):
            half = 2**i * size // 2
            order = torch.arange(out).reshape(-1, 2, half).transpose(1, 2).flatten()
            m = torch.zeros(out, out, dtype=torch.float64)
            m[order[:, None], order[None, :]] = block_diagonal(stage)
            rotation = m @ rotation
    merged = rotation @ w
    if rescale is not None:
        merged = rescale.double().reshape(out, 1) * merged
    return merged.reshape(weight.shape)


def check_constraint_bites(item: Built) -> None:
    """Where a constraint is set, LyCORIS clips ||Q|| (to constraint * out_dim) for some modules and
    leaves it for others, so a merge that ignores it, or applies it to every module, fails."""
    if item.config.constraint is None:
        return
    clipped = [skew_norm(m.oft_blocks.detach()) > m.constraint for m in item.network.loras]
    assert any(clipped) and not all(clipped), clipped


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_layers_compute_what_lycoris_computes(built, tmp_path, name, strength):
    item = built(name)
    check_constraint_bites(item)
    for module in item.network.loras:
        module.multiplier = strength
    out = tmp_path / "merged.safetensors"
    report = loratool.merge(item.base, [item.lora], out, weights=[strength], device="cpu")
    assert report.loras[0].matched == len(item.network.loras) and not report.loras[0].unmatched
    assert {"Conv2d", "Linear"} <= check_layers(item.network, out, item.base, visible=1e-2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_tensors_explain_lycoris_weights(built, name):
    """The oracle's own facts: the saved keys per module, alpha as the raw constraint, and the
    merged weight rebuilt from the file's tensors alone equals LyCORIS's, at strength 1 and 0.5."""
    item = built(name)
    config = item.config
    saved = load_file(str(item.lora))
    parts = {"oft_blocks", "alpha"} | ({"rescale"} if config.rescaled else set())
    assert set(saved) == {f"{m.lora_name}.{p}" for m in item.network.loras for p in parts}
    for module in item.network.loras:
        name_ = module.lora_name
        assert type(module).__name__ == MODULE_CLASS[config.algo]
        blocks, alpha = saved[f"{name_}.oft_blocks"], saved[f"{name_}.alpha"]
        assert blocks.ndim == (3 if config.algo == "diag-oft" else 4), (name_, blocks.shape)
        assert alpha.shape == () and alpha.dtype == torch.float32
        assert float(alpha) == pytest.approx(config.constraint or 0.0)
        assert module.constraint == pytest.approx(float(alpha) * module.dim)
        layer = module.org_module[0]
        if config.rescaled:
            assert saved[f"{name_}.rescale"].shape == (layer.weight.shape[0],) + (1,) * (layer.weight.ndim - 1)
        with torch.no_grad():
            for strength in (1.0, 0.5):
                theirs, _ = module.get_merged_weight(multiplier=strength, shape=layer.weight.shape)
                ours = reference_weight(saved, name_, layer.weight.detach(), strength)
                error = float((ours - theirs.double()).norm() / theirs.double().norm())
                assert error < 1e-5, (name_, strength, error)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inspect_reports_the_kind_and_block_size(built, name):
    item = built(name)
    report = loratool.inspect(item.lora)
    assert report.architecture == "sd1" and not report.unexplained
    assert not [f for f in report.findings if f.severity in ("warning", "error")], report.findings
    saved = load_file(str(item.lora))
    ours = {m.name: m for m in report.modules}
    assert set(ours) == {m.lora_name for m in item.network.loras}
    for module in item.network.loras:
        got = ours[module.lora_name]
        assert got.kind == KIND[item.config.algo], (module.lora_name, got.kind)
        block_size = saved[f"{module.lora_name}.oft_blocks"].shape[-1]
        assert block_size == module.block_size
        assert isinstance(got.block_size, int) and got.block_size == block_size, module.lora_name


def names_kind(message: str, algo: str, exact_case: bool) -> bool:
    """The message names the kind: BOFT as such; OFT as a word of its own (not the tail of BOFT).
    A tensor name quoted in it (`....oft_blocks`) does not count."""
    message = message.replace("oft_blocks", "")
    if algo == "boft":
        return "BOFT" in message if exact_case else "boft" in message.lower()
    pattern = r"(?<![A-Za-z])OFT(?![A-Za-z])"
    return re.search(pattern, message, 0 if exact_case else re.IGNORECASE) is not None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_keeps_kohya_and_refuses_diffusers_and_peft(built, tmp_path, name):
    item = built(name)
    out = tmp_path / "kohya.safetensors"
    loratool.convert(item.lora, "kohya", out)
    before, after = load_file(str(item.lora)), load_file(str(out))
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    for target in ("diffusers", "peft"):
        dest = tmp_path / target
        with pytest.raises(ConversionError) as caught:
            loratool.convert(item.lora, target, dest)
        message = str(caught.value)
        assert names_kind(message, item.config.algo, exact_case=True), (target, message)
        assert not dest.exists()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_combine_and_resize_refuse_naming_the_kind(built, tmp_path, name):
    """Neither has low-rank factors to stack or cut in a rotation."""
    item = built(name)
    for call in (
        lambda out: loratool.combine([item.lora, item.lora], out),
        lambda out: loratool.resize(item.lora, out, rank=2),
    ):
        out = tmp_path / "out.safetensors"
        with pytest.raises(LoratoolError) as caught:
            call(out)
        message = str(caught.value)
        assert names_kind(message, item.config.algo, exact_case=False), message
        assert not out.exists()


@pytest.mark.parametrize("name", ["diag-oft", "boft"])
def test_a_negative_strength_is_refused_naming_the_kind(built, tmp_path, name):
    """m R + (1 - m) I with m < 0 is no rotation and no undo: refused, nothing written."""
    item = built(name)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(LoratoolError) as caught:
        loratool.merge(item.base, [item.lora], out, weights=[-1.0], device="cpu")
    assert names_kind(str(caught.value), item.config.algo, exact_case=True) and "negative" in str(caught.value)
    assert not out.exists()
