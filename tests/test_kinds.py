"""Adapter-kind math against the real lycoris-lora forward pass (the truth, per REFERENCE section 3).

Networks of every algorithm are built with lycoris-lora on a small model, their parameters randomized,
saved with lycoris' own `save_weights`, read back through loratool's codecs, and each module's
`scale * delta` is compared with the weight change the wrapped model actually applies.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loratool
from loratool.kinds import KINDS

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 36)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc1(x), self.conv(y)


CASES = [
    ("locon", {}, "lora"),
    ("locon", {"use_tucker": True}, "lora"),
    ("loha", {}, "loha"),
    ("loha", {"use_tucker": True}, "loha"),
    ("lokr", {}, "lokr"),
    ("lokr", {"decompose_both": True, "factor": 4}, "lokr"),
    ("lokr", {"use_tucker": True, "decompose_both": True, "factor": 2}, "lokr"),
]


def applied_deltas(net: Net, wrapped: Net) -> dict[str, torch.Tensor]:
    """The weight change the wrapped model applies, recovered from its outputs."""
    with torch.no_grad():
        eye = torch.eye(24)
        fc_delta = (wrapped.fc1(eye) - net.fc1(eye)).T  # rows of the identity give W^T
        # A conv is linear in its input: probe it with one-hot images to read off its kernel.
        probes = torch.eye(6 * 5 * 5).reshape(-1, 6, 5, 5)
        conv_out = wrapped.conv(probes) - net.conv(probes)
    return {"fc1": fc_delta, "conv_out": conv_out, "probes": probes}


@pytest.mark.parametrize(("algo", "options", "kind"), CASES, ids=[f"{a}-{'-'.join(o) or 'plain'}" for a, o, _ in CASES])
def test_lycoris_forward_matches_kind_delta(tmp_path, algo, options, kind):
    torch.manual_seed(0)
    net = Net()
    wrapped = copy.deepcopy(net)
    lycoris.LycorisNetwork.apply_preset({"target_name": ["fc1", "conv"]})
    network = lycoris.create_lycoris(
        wrapped, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, algo=algo, **options
    )
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    expected = applied_deltas(net, wrapped)

    with loratool.load_adapter(path) as adapter:
        assert adapter.format == "lycoris"
        modules = {m.name.removeprefix("lycoris_"): m for m in adapter.modules.values()}
        assert set(modules) == {"fc1", "conv"}
        for m in modules.values():
            assert m.kind is KINDS[kind]
            assert m.problem is None
        fc = modules["fc1"]
        fc_delta = fc.scale * fc.kind.delta(adapter.tensors(fc))
        torch.testing.assert_close(fc_delta.reshape(36, 24), expected["fc1"], rtol=1e-4, atol=1e-5)

        conv = modules["conv"]
        kernel = (conv.scale * conv.kind.delta(adapter.tensors(conv))).reshape(8, 6, 3, 3)
        ours = F.conv2d(expected["probes"], kernel, padding=1)
        torch.testing.assert_close(ours, expected["conv_out"], rtol=1e-4, atol=1e-5)


def test_lokr_full_factors_scale_is_one_in_lycoris_files():
    """LyCORIS forces scale 1 when both LoKr factors are full, whatever alpha says."""
    lokr = KINDS["lokr"]
    shapes = {"w1": (4, 4), "w2": (8, 8)}
    assert lokr.rank(shapes) is None
    assert lokr.scale(16.0, shapes) == 1.0
    # PEFT's LoKr keeps alpha / r with r from its config.
    assert lokr.scale(16.0, shapes, declared_rank=4) == 4.0


def test_lora_tucker_mid_equals_composed_convs():
    """down (1x1) -> mid (kxk) -> up (1x1) as three convs equals one conv with the rebuilt kernel."""
    torch.manual_seed(1)
    down, mid, up = torch.randn(3, 5, 1, 1), torch.randn(3, 3, 3, 3), torch.randn(7, 3, 1, 1)
    x = torch.randn(2, 5, 6, 6)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    kernel = KINDS["lora"].delta({"down": down, "mid": mid, "up": up})
    assert kernel.shape == (7, 5, 3, 3)
    torch.testing.assert_close(F.conv2d(x, kernel, padding=1), composed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("conv", "kernel"),
    [(F.conv3d, (2, 3, 3)), (F.conv1d, (3,))],
    ids=["conv3d", "conv1d"],
)
def test_lora_on_3d_and_1d_convs(conv, kernel):
    """Video models' Conv3d patch embeddings (and Conv1d): down (r, in, *kernel), up (out, r, 1, ..);
    the update is the explicit sum over the rank and equals the two convs composed."""
    torch.manual_seed(2)
    ones = (1,) * len(kernel)
    down, up = torch.randn(3, 5, *kernel), torch.randn(7, 3, *ones)
    lora = KINDS["lora"]
    shapes = {"down": tuple(down.shape), "up": tuple(up.shape)}
    assert lora.check(shapes) is None
    assert lora.rank(shapes) == 3
    assert lora.weight_shape(shapes) == (7, 5, *kernel)
    delta = lora.delta({"down": down, "up": up})
    assert delta.shape == (7, 5, *kernel)
    explicit = torch.einsum("or,ri...->oi...", up.flatten(1), down)
    torch.testing.assert_close(delta, explicit)
    x = torch.randn(2, 5, *(k + 3 for k in kernel))
    torch.testing.assert_close(conv(x, delta), conv(conv(x, down), up), rtol=1e-4, atol=1e-4)
    # A 2-D up (some writers flatten the 1x1x1 kernel away) gives the same update.
    flat = lora.delta({"down": down, "up": up.flatten(1)})
    torch.testing.assert_close(flat, delta)


@pytest.mark.parametrize(
    ("kind", "shapes", "problem"),
    [
        ("lora", {"down": (4, 8), "up": (16, 3)}, "columns"),
        ("lora", {"down": (4, 8, 3, 3), "up": (16, 4, 3, 3)}, "1x1"),
        ("lora", {"down": (4, 8, 2, 3, 3), "up": (16, 4, 1, 3, 1)}, "1x1x1"),
        ("lora", {"down": (4, 8, 2, 3, 3), "up": (16, 4, 1, 1)}, "same dimension"),
        ("lora", {"down": (4, 8, 1, 1, 1, 1), "up": (16, 4)}, "3-D to 5-D"),
        ("lora", {"down": (4, 8, 1, 1, 1), "up": (16, 4, 1, 1, 1), "mid": (4, 4, 3, 3)}, "1x1 conv"),
        ("lora", {"down": (4, 8, 1, 1), "up": (16, 4, 1, 1), "mid": (3, 3, 3, 3)}, "mid"),
        ("loha", {"w1a": (16, 4), "w1b": (4, 8), "w2a": (16, 4), "w2b": (4, 9)}, "different shapes"),
        ("lokr", {"w1a": (4, 2), "w1b": (3, 4), "w2": (4, 4)}, "do not multiply"),
    ],
)
def test_inconsistent_shapes_are_explained(kind, shapes, problem):
    message = KINDS[kind].check(shapes)
    assert message is not None and problem in message


def test_missing_roles():
    assert KINDS["lora"].missing({"down"}) == ["up"]
    assert KINDS["loha"].missing({"w1a", "w1b", "w2a", "w2b", "t1"}) == ["t2"]
    assert KINDS["lokr"].missing({"w1", "w2a"}) == ["w2b"]
    assert KINDS["lokr"].missing({"w1a", "w1b", "w2"}) == []


def test_a_kernel_is_any_conv_axis_larger_than_one() -> None:
    """LoCon's conv rank applies to 2-D and 3-D kernels alike; 1x1 and 1x1x1 convs are matrices."""
    from loratool.kinds.base import has_kernel

    assert has_kernel((8, 4, 3, 3)) and has_kernel((8, 4, 1, 2, 2)) and has_kernel((8, 4, 3))
    assert not has_kernel((8, 4, 1, 1)) and not has_kernel((8, 4, 1, 1, 1)) and not has_kernel((8, 4))


def test_glora_on_a_conv3d_maps_input_channels_at_every_tap() -> None:
    """GLoRA's W @ a1 @ a2 + b1 @ b2 on a Conv3d weight (out, in, kt, kh, kw): the 1x1x1 a1/a2 act on
    the input channels at each kernel position, b2 carries the kernel."""
    from loratool.kinds import KINDS

    glora = KINDS["glora"]
    g = torch.Generator().manual_seed(3)
    out, inp, r, kernel = 6, 4, 2, (2, 3, 3)
    weight = torch.randn(out, inp, *kernel, generator=g)
    tensors = {
        "a1": torch.randn(inp, r, 1, 1, 1, generator=g),
        "a2": torch.randn(r, inp, 1, 1, 1, generator=g),
        "b1": torch.randn(out, r, 1, 1, 1, generator=g),
        "b2": torch.randn(r, inp, *kernel, generator=g),
    }
    shapes = {role: tuple(t.shape) for role, t in tensors.items()}
    assert glora.check(shapes) is None
    assert glora.weight_shape(shapes) == (out, inp, *kernel)
    a = tensors["a1"].flatten(1) @ tensors["a2"].flatten(1)  # (in, in)
    mapped = torch.einsum("oituv,ij->ojtuv", weight, a)
    low = (tensors["b1"].flatten(1) @ tensors["b2"].flatten(1)).reshape(weight.shape)
    torch.testing.assert_close(glora.delta(tensors, weight), mapped + low)
    assert glora.check({**shapes, "a1": (inp, r, 1, 3, 1)}) == "a1, a2 and b1 must be 1x1 convs"
