"""Architecture tables checked against the reference implementations.

The tables under `loratool/archs/tables/` are generated from diffusers/transformers models; here they
are checked against a fresh generation, against diffusers' own single-file (LDM/sgm/OpenCLIP/BFL)
converters, against diffusers' kohya -> diffusers LoRA converters, and against tiny transformers
models for the HF family detection. Everything runs offline on the CPU (meta device where possible).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from loratool.archs import Architecture, architectures, catalog, detect, get_architecture, kohya_flat
from loratool.archs import generate as gen
from loratool.archs.families._build import is_norm, table_modules
from loratool.archs.families.sd1 import SD1_UNET
from loratool.archs.families.sd2 import SD2_UNET
from loratool.archs.families.sdxl import SDXL_UNET
from loratool.archs.hf import HF_FAMILIES, HFArchitecture, detect_hf
from loratool.archs.locate import Location, locate
from loratool.archs.table import TABLES, level_variants

ARCHS = (
    "sd1",
    "sd2",
    "sdxl",
    "flux1",
    "chroma",
    "sd3",
    "sd3.5-medium",
    "sd3.5-large",
    "qwen_image",
    "qwen_image21",
    "flux2",
    "flux2-klein-4b",
    "flux2-klein-9b",
    "z_image",
    "lumina2",
    "hidream",
    "anima",
    "krea2",
    "wan2.1-t2v-1.3b",
    "wan2.1-vace-1.3b",
    "wan2.1-t2v-14b",
    "wan2.1-vace-14b",
    "wan2.2-i2v-a14b",
    "wan2.1-i2v-14b",
    "wan2.2-ti2v-5b",
    "hunyuan_video",
    "hunyuan_video15",
    "ltx_video",
    "ltx_video-13b",
    "ltx2",
    "ltx2.3",
)


@pytest.fixture(scope="module")
def fresh_tables() -> dict[str, dict]:
    return gen.build_tables()


def arch(name: str) -> Architecture:
    return get_architecture(name)


def modules_of(a: Architecture, component: str):
    return [m for m in a.modules.values() if m.component == component]


# ---------------------------------------------------------------------------------------------------
# The committed tables are what the generator produces today
# ---------------------------------------------------------------------------------------------------
# The library versions a table was generated with: provenance, recorded in the table but not compared.
PROVENANCE = frozenset({"sources"})


def table_differences(name: str, committed: dict, fresh: dict) -> list[str]:
    """What differs between a committed table and a fresh one, row by row, leaving out provenance."""
    found = []
    for key in sorted((set(committed) | set(fresh)) - PROVENANCE):
        old, new = committed.get(key), fresh.get(key)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list) and all("name" in r for r in old + new):
            old_rows, new_rows = {r["name"]: r for r in old}, {r["name"]: r for r in new}
            for row in sorted(old_rows.keys() | new_rows.keys()):
                if row not in new_rows:
                    found.append(f"{name}.{key}: row {row!r} is committed but no longer generated")
                elif row not in old_rows:
                    found.append(f"{name}.{key}: row {row!r} is generated but not committed")
                elif old_rows[row] != new_rows[row]:
                    found.append(f"{name}.{key}: row {row!r} committed {old_rows[row]} generated {new_rows[row]}")
            if not found and [r["name"] for r in old] != [r["name"] for r in new]:
                found.append(f"{name}.{key}: the same rows in another order")
        else:
            found.append(f"{name}.{key}: committed {old!r} generated {new!r}")
    return found


def test_committed_tables_equal_fresh_generation(fresh_tables: dict[str, dict]) -> None:
    committed = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in TABLES.glob("*.json")}
    assert set(committed) == set(fresh_tables) == set(ARCHS)
    found = [line for name in ARCHS for line in table_differences(name, committed[name], fresh_tables[name])]
    assert not found, "regenerate with `python -m loratool.archs.generate`:\n" + "\n".join(found)


def test_the_catalog_is_the_committed_tables() -> None:
    """The catalog lists every table, in detection's order, with its hints and components, and
    every module name each table knows in each scheme, as the tables say (so detection reading the
    catalog decides exactly as asking every table would)."""
    committed = gen.committed_tables()
    expected = catalog.build(committed)
    assert json.loads(catalog.CATALOG.read_text(encoding="utf-8")) == expected, (
        "regenerate with `python -m loratool.archs.generate`"
    )
    assert catalog.dump(expected) == catalog.CATALOG.read_text(encoding="utf-8")
    loaded = catalog.get_catalog()
    assert loaded.names == tuple(a.name for a in committed)
    for scheme in catalog.SCHEMES:
        owners: dict[str, list[str]] = {}
        for arch in committed:
            for name in arch.index(scheme):
                owners.setdefault(name, []).append(arch.name)
        assert loaded.owners[scheme] == {n: tuple(o) for n, o in owners.items()}, scheme


def test_freshness_ignores_library_versions_and_names_a_changed_row() -> None:
    table = json.loads((TABLES / "sd1.json").read_text(encoding="utf-8"))
    bumped = {**table, "sources": {lib: version + ".post9" for lib, version in table["sources"].items()}}
    assert table_differences("sd1", table, bumped) == []

    tampered = json.loads(json.dumps(table))
    row = tampered["modules"][7]
    row["native"] = row.get("native", "") + "_renamed"
    found = table_differences("sd1", tampered, table)
    assert len(found) == 1 and f"row {row['name']!r}" in found[0], found

    dropped = {**table, "modules": table["modules"][:-1]}
    assert table_differences("sd1", dropped, table) == [
        f"sd1.modules: row {table['modules'][-1]['name']!r} is generated but not committed"
    ]
    assert table_differences("sd1", {**table, "title": "x"}, table) == [
        "sd1.title: committed 'x' generated 'Stable Diffusion 1.x'"
    ]


def test_tables_load_and_have_expected_sizes() -> None:
    archs = architectures()
    assert tuple(archs) == ARCHS
    # Independent facts about the models: block counts of the published architectures.
    flux = arch("flux1")
    assert sum(1 for g in flux.fused if g.endswith(".img_attn.qkv")) == 19
    assert sum(1 for g in flux.fused if g.endswith(".linear1")) == 38
    assert sum(1 for g in arch("sdxl").fused.values() if g.component == "text_encoder_2") == 32
    assert sum(1 for g in arch("sd2").fused.values() if g.component == "text_encoder") == 23
    assert not arch("sd1").fused
    sd1_attn = [m for m in arch("sd1").modules if m.endswith(".attn1.to_q")]
    assert len(sd1_attn) == 16  # 6 down + 1 mid + 9 up transformer blocks
    sdxl_attn = [m for m in arch("sdxl").modules if m.endswith(".attn1.to_q")]
    assert len(sdxl_attn) == 70  # down 2x2 + 2x10, mid 10, up 3x10 + 3x2 transformer blocks
    # SD3 Medium and SD3.5 Large: 24 and 38 joint blocks; SD3.5 Medium's second attention in blocks 0-12
    for name, blocks in (("sd3", 24), ("sd3.5-medium", 24), ("sd3.5-large", 38)):
        assert sum(1 for g in arch(name).fused if g.endswith(".x_block.attn.qkv")) == blocks
    assert sum(1 for g in arch("sd3.5-medium").fused if g.endswith(".x_block.attn2.qkv")) == 13
    assert not [g for g in arch("sd3").fused if ".attn2." in g]
    # Chroma: Flux.1's 19 + 38 blocks without their modulations, a 5-layer guidance approximator instead
    chroma = arch("chroma")
    assert sum(1 for g in chroma.fused if g.endswith(".linear1")) == 38
    assert not [m for m in chroma.modules if m.endswith(("norm1.linear", "norm.linear")) or ".time_text_embed." in m]
    assert sum(1 for m in chroma.modules if ".distilled_guidance_layer.layers." in m) == 5 * 2
    # Flux.2 dev / klein 4B / klein 9B: 8 / 5 / 8 double blocks, 48 / 20 / 24 single blocks
    for name, double, single in (("flux2", 8, 48), ("flux2-klein-4b", 5, 20), ("flux2-klein-9b", 8, 24)):
        assert sum(1 for g in arch(name).fused if g.endswith(".img_attn.qkv")) == double
        assert sum(1 for m in arch(name).modules if m.endswith(".attn.to_qkv_mlp_proj")) == single
    # Z-Image and Lumina 2: fused qkv in 30 + 2 + 2 and 26 + 2 + 2 blocks; Lumina 2's k and v are a third of q
    assert sum(1 for g in arch("z_image").fused if g.endswith(".attention.qkv")) == 34
    lumina = arch("lumina2")
    assert sum(1 for g in lumina.fused if g.endswith(".attention.qkv")) == 30
    assert lumina.fused["transformer.layers.0.attention.qkv"].row_sizes(2304, 3840) == [2304, 768, 768]
    # HiDream-I1: 16 double and 32 single blocks of 4 routed experts (+ 1 shared) each
    hidream = arch("hidream")
    assert sum(1 for m in hidream.modules if m.endswith(".ff_i.experts.3.w2")) == 16 + 32
    # Anima: 28 Cosmos blocks and a 6-block LLM adapter
    assert sum(1 for m in arch("anima").modules if m.endswith(".attn2.to_k")) == 28
    assert sum(1 for m in arch("anima").modules if m.startswith("text_conditioner.") and m.endswith(".mlp.0")) == 6


def test_families_are_discovered_and_tables_sorted_by_their_declared_order() -> None:
    """One module per family under archs/families (shared `_` modules skipped), no hand-kept list:
    the generator sorts the families by `order`, each table records it, and run time sorts by it."""
    found = gen.families()
    assert [f.name for f in found] == list(ARCHS)
    orders = [f.order for f in found]
    assert orders == sorted(set(orders))
    assert [a.order for a in architectures().values()] == orders
    committed = {p.stem: json.loads(p.read_text(encoding="utf-8"))["order"] for p in TABLES.glob("*.json")}
    assert committed == {f.name: f.order for f in found}


# A table of a video model's patch embedding: a Conv3d whose weight is (out, in, kt, kh, kw).
CONV3D_ROW = {
    "name": "transformer.patch_embedding",
    "type": "conv",
    "shape": [1536, 16, 1, 2, 2],
    "target": "extra",
    "native": "patch_embedding",
}


def _video_table(tmp_path, rows: list[dict]):
    table = {
        "arch": "video",
        "title": "A video model",
        "order": 99,
        "hints": {},
        "components": [
            {
                "name": "transformer",
                "short": "transformer",
                "kohya": [{"prefix": "lora_unet_", "paths": "native"}],
                "file_prefixes": ["model.diffusion_model."],
                "lora_prefixes": ["diffusion_model."],
            }
        ],
        "fused": [],
        "modules": rows,
    }
    path = tmp_path / "video.json"
    path.write_text(gen.dump(table), encoding="utf-8")
    return path


def test_a_conv3d_row_loads_resolves_and_is_found_in_a_checkpoint(tmp_path) -> None:
    from safetensors.torch import save_file

    from loratool.archs.checkpoint import checkpoint_weights
    from loratool.io.source import open_source

    a = Architecture.load(_video_table(tmp_path, [CONV3D_ROW]))
    spec = a.modules["transformer.patch_embedding"]
    assert (spec.type, spec.shape, a.order) == ("conv", (1536, 16, 1, 2, 2), 99)
    assert a.kohya_index["lora_unet_patch_embedding"] == (spec.name,)
    assert a.native_index["diffusion_model.patch_embedding"] == (spec.name,)
    save_file({"model.diffusion_model.patch_embedding.weight": torch.zeros(8, 4, 1, 2, 2)}, tmp_path / "v.safetensors")
    with open_source(tmp_path / "v.safetensors") as source:
        weights = checkpoint_weights(a, source)
    assert [(w.name, w.type, w.location.key) for w in weights] == [
        (spec.name, "conv", "model.diffusion_model.patch_embedding.weight")
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"shape": [1536, 16, 1, 1, 2, 2]}, "conv with a 6-D shape"),
        ({"type": "linear"}, "linear with a 5-D shape"),
    ],
)
def test_a_row_whose_shape_does_not_fit_its_type_is_refused(tmp_path, change: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Architecture.load(_video_table(tmp_path, [{**CONV3D_ROW, **change}]))


def test_a_table_without_order_is_refused(tmp_path) -> None:
    path = _video_table(tmp_path, [CONV3D_ROW])
    table = json.loads(path.read_text(encoding="utf-8"))
    del table["order"]
    path.write_text(json.dumps(table), encoding="utf-8")
    with pytest.raises(ValueError, match="no integer 'order'"):
        Architecture.load(path)


def test_generator_lists_conv1d_and_conv3d_with_their_weight_shapes() -> None:
    class Video(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embedding = torch.nn.Conv3d(16, 64, kernel_size=(1, 2, 2), stride=(1, 2, 2))
            self.temporal = torch.nn.Conv1d(64, 32, 3)
            self.proj = torch.nn.Linear(32, 8)

    with torch.device("meta"):
        model = Video()
    assert list(table_modules(model)) == [
        ("patch_embedding", "conv", [64, 16, 1, 2, 2]),
        ("temporal", "conv", [32, 64, 3]),
        ("proj", "linear", [8, 32]),
    ]


# ---------------------------------------------------------------------------------------------------
# Single-file (LDM / sgm) UNet names vs diffusers.loaders.single_file_utils
# ---------------------------------------------------------------------------------------------------
UNET_CONFIGS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_native_names_match_diffusers_ldm_converter(name: str) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    a = arch(name)
    unet = modules_of(a, "unet")
    checkpoint: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(unet):
        assert spec.native is not None and spec.native_weight == spec.native + ".weight"
        weight, bias = torch.tensor([float(i)]), torch.tensor([-float(i) - 1])
        checkpoint["model.diffusion_model." + spec.native_weight] = weight
        checkpoint["model.diffusion_model." + spec.native + ".bias"] = bias
        expected[spec.path + ".weight"] = weight
        expected[spec.path + ".bias"] = bias
    # Keys of other components must be ignored by the UNet converter.
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.tensor([-5.0])
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(UNET_CONFIGS[name]))
    assert set(converted) == set(expected)
    wrong = [k for k, v in expected.items() if converted[k] is not v]
    assert not wrong, wrong[:5]


def test_unet_table_has_the_reference_sgm_names() -> None:
    sdxl = arch("sdxl")
    by_native = {m.native: m.name for m in modules_of(sdxl, "unet")}
    # Rules from REFERENCE.md (sgm -> diffusers, layers_per_block = 2).
    assert by_native["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == (
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert by_native["input_blocks.1.0.in_layers.2"] == "unet.down_blocks.0.resnets.0.conv1"
    assert by_native["input_blocks.3.0.op"] == "unet.down_blocks.0.downsamplers.0.conv"
    assert by_native["output_blocks.2.2.conv"] == "unet.up_blocks.0.upsamplers.0.conv"
    assert by_native["middle_block.1.proj_in"] == "unet.mid_block.attentions.0.proj_in"
    assert by_native["middle_block.2.emb_layers.1"] == "unet.mid_block.resnets.1.time_emb_proj"
    assert by_native["label_emb.0.2"] == "unet.add_embedding.linear_2"
    assert by_native["out.2"] == "unet.conv_out"
    sd1 = {m.native: m.name for m in modules_of(arch("sd1"), "unet")}
    assert sd1["output_blocks.2.1.conv"] == "unet.up_blocks.0.upsamplers.0.conv"  # no attention in up block 0
    assert sd1["output_blocks.5.2.conv"] == "unet.up_blocks.1.upsamplers.0.conv"


# ---------------------------------------------------------------------------------------------------
# Text encoders vs diffusers' CLIP / OpenCLIP single-file converters
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "component", "prefix", "remove_prefix"),
    [
        ("sd1", "text_encoder", "cond_stage_model.transformer.", None),
        ("sdxl", "text_encoder", "conditioner.embedders.0.transformer.", None),
        ("flux1", "text_encoder", "text_encoders.clip_l.transformer.", "text_encoders.clip_l.transformer."),
    ],
)
def test_clip_l_native_names_match_diffusers_converter(
    name: str, component: str, prefix: str, remove_prefix: str | None
) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    a = arch(name)
    assert prefix in a.components[component].file_prefixes
    checkpoint, expected = {}, {}
    for i, spec in enumerate(modules_of(a, component)):
        marker = torch.tensor([float(i)])
        checkpoint[prefix + spec.native_weight] = marker
        expected[spec.path + ".weight"] = marker
    checkpoint["model.diffusion_model.out.2.weight"] = torch.tensor([-1.0])
    converted = convert_ldm_clip_checkpoint(checkpoint, remove_prefix=remove_prefix)
    assert set(converted) == set(expected)
    assert all(converted[k] is v for k, v in expected.items())
    assert len(expected) == 99  # 12 layers x (6 linears + 2 LayerNorms) + 2 embeddings + final LayerNorm
    assert sum(1 for spec in modules_of(a, component) if spec.type == "norm") == 25


def _rows_marker(marker: int, rows: int, cols: int = 1) -> torch.Tensor:
    """A (rows, cols) int64 tensor whose every row says which marker and which row it is."""
    return (torch.arange(rows, dtype=torch.int64) + marker * 1_000_000).unsqueeze(1).expand(rows, cols).contiguous()


@pytest.mark.parametrize(
    ("name", "prefix", "hidden"),
    [("sd2", "cond_stage_model.model.", 1024), ("sdxl", "conditioner.embedders.1.model.", 1280)],
)
def test_openclip_native_names_and_fused_rows_match_diffusers_converter(name: str, prefix: str, hidden: int) -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    a = arch(name)
    component = "text_encoder_2" if name == "sdxl" else "text_encoder"
    assert a.components[component].file_prefixes == (prefix,)
    checkpoint: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    marker = 0
    for spec in modules_of(a, component):
        if spec.fused is not None:
            continue
        marker += 1
        if spec.transposed:
            # Stored (in, out); diffusers transposes it into the Linear's (out, in).
            out_features, in_features = spec.shape
            stored = torch.arange(in_features * 3, dtype=torch.int64).reshape(in_features, 3) + marker * 1_000_000
            checkpoint[prefix + spec.native_weight] = stored
            expected[spec.path + ".weight"] = stored.T
        else:
            checkpoint[prefix + spec.native_weight] = torch.tensor([marker])
            expected[spec.path + ".weight"] = checkpoint[prefix + spec.native_weight]
            if spec.type in ("linear", "norm"):
                checkpoint[prefix + spec.native + ".bias"] = torch.tensor([-marker])
                expected[spec.path + ".bias"] = checkpoint[prefix + spec.native + ".bias"]
    norms = {spec.native for spec in modules_of(a, component) if spec.type == "norm"}
    layers = len([g for g in a.fused.values() if g.component == component])
    assert norms == {"ln_final"} | {f"transformer.resblocks.{i}.ln_{j}" for i in range(layers) for j in (1, 2)}
    groups = [g for g in a.fused.values() if g.component == component]
    assert groups
    for group in groups:
        marker += 1
        parts = [a.modules[p] for p in group.parts]
        assert [p.part for p in parts] == [0, 1, 2]
        assert [p.path.rsplit(".", 1)[1] for p in parts] == ["q_proj", "k_proj", "v_proj"]
        in_features = parts[0].shape[1]
        out_features = sum(p.shape[0] for p in parts)
        assert in_features == hidden and out_features == 3 * hidden
        fused = _rows_marker(marker, out_features)
        bias = fused[:, 0].clone()
        checkpoint[prefix + group.weight] = fused
        checkpoint[prefix + group.weight.replace("in_proj_weight", "in_proj_bias")] = bias
        start = 0
        for spec, rows in zip(parts, group.row_sizes(in_features, out_features), strict=True):
            expected[spec.path + ".weight"] = fused[start : start + rows]
            expected[spec.path + ".bias"] = bias[start : start + rows]
            start += rows
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))
    converted = convert_open_clip_checkpoint(text_model, dict(checkpoint), prefix=prefix)
    assert set(converted) == set(expected)
    bad = [k for k, v in expected.items() if not torch.equal(converted[k], v)]
    assert not bad, bad[:5]


# ---------------------------------------------------------------------------------------------------
# Flux (BFL) names vs diffusers' Flux single-file converter
# ---------------------------------------------------------------------------------------------------
def test_flux_native_names_fused_rows_and_swapped_halves_match_diffusers_converter() -> None:
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    a = arch("flux1")
    prefix = "model.diffusion_model."
    assert prefix in a.components["transformer"].file_prefixes
    checkpoint: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    marker = 0
    for spec in modules_of(a, "transformer"):
        if spec.fused is not None:
            continue
        marker += 1
        rows = spec.shape[0]
        if spec.type == "norm":  # q/k RMSNorms: BFL's `scale`, no bias
            assert spec.native_weight == spec.native + ".scale"
            checkpoint[prefix + spec.native_weight] = expected[spec.path + ".weight"] = _rows_marker(marker, rows)[:, 0]
            continue
        weight = _rows_marker(marker, rows)
        checkpoint[prefix + spec.native_weight] = weight
        checkpoint[prefix + spec.native + ".bias"] = weight[:, 0].clone()
        if spec.rows == "swap_halves":
            half = rows // 2
            expected[spec.path + ".weight"] = torch.cat([weight[half:], weight[:half]])
        else:
            assert spec.rows is None
            expected[spec.path + ".weight"] = weight
    assert a.modules["transformer.norm_out.linear"].rows == "swap_halves"
    sizes_seen = set()
    for group in a.fused.values():
        if group.component != "transformer":
            continue
        marker += 1
        parts = [a.modules[p] for p in group.parts]
        in_features = parts[0].shape[1]
        out_features = sum(p.shape[0] for p in parts)
        fused = _rows_marker(marker, out_features)
        checkpoint[prefix + group.weight] = fused
        checkpoint[prefix + group.weight[: -len("weight")] + "bias"] = fused[:, 0].clone()
        start = 0
        sizes = group.row_sizes(in_features, out_features)
        sizes_seen.add(tuple(sizes))
        for spec, rows in zip(parts, sizes, strict=True):
            assert spec.shape[0] == rows
            expected[spec.path + ".weight"] = fused[start : start + rows]
            start += rows
    assert sizes_seen == {(3072, 3072, 3072), (3072, 3072, 3072, 12288)}
    # The converter needs every q/k RMSNorm scale: the table's norm rows must name all of them.
    assert sum(1 for spec in modules_of(a, "transformer") if spec.type == "norm") == 19 * 4 + 38 * 2

    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    weights = {k: v for k, v in converted.items() if k.endswith(".weight")}
    assert set(weights) == set(expected)
    bad = [k for k, v in expected.items() if not torch.equal(weights[k], v)]
    assert not bad, bad[:5]


# ---------------------------------------------------------------------------------------------------
# kohya names
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_every_kohya_name_round_trips_without_collisions(name: str) -> None:
    a = arch(name)
    index = a.kohya_index
    seen: dict[str, str] = {}
    for spec in a.modules.values():
        naming = a.components[spec.component].kohya[0]
        if naming.paths == "native" and spec.native is None:
            assert spec.fused is not None
            with pytest.raises(KeyError):
                a.kohya_name(spec.name)
            group = a.fused[spec.fused]
            assert index[naming.prefix + kohya_flat(group.native)] == group.parts
            continue
        kname = a.kohya_name(spec.name)
        assert kname.startswith(naming.prefix) and "." not in kname
        assert kname not in seen, (kname, seen.get(kname), spec.name)
        seen[kname] = spec.name
        assert index[kname] == (spec.name,)
    # Every module is reachable from some kohya name (directly or through its fused group).
    reachable = {t for targets in index.values() for t in targets}
    assert reachable == set(a.modules)


KOHYA_SPOT = [
    (
        "hunyuan_video",
        "lora_unet_single_blocks_39_linear1",
        tuple(
            f"transformer.single_transformer_blocks.39.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        ),
    ),
    (
        "hunyuan_video15",
        "lora_unet_double_blocks_53_txt_attn_v",
        ("transformer.transformer_blocks.53.attn.add_v_proj",),
    ),
    ("wan2.1-t2v-14b", "lora_unet_blocks_0_self_attn_q", ("transformer.blocks.0.attn1.to_q",)),
    ("wan2.1-i2v-14b", "lora_unet_blocks_39_cross_attn_k_img", ("transformer.blocks.39.attn2.add_k_proj",)),
    (
        "ltx2",
        "lora_unet_transformer_blocks_47_video_to_audio_attn_to_k",
        ("transformer.transformer_blocks.47.video_to_audio_attn.to_k",),
    ),
    ("ltx_video-13b", "lora_unet_adaln_single_linear", ("transformer.time_embed.linear",)),
    ("ltx2.3", "lora_unet_audio_prompt_adaln_single_linear", ("transformer.audio_prompt_adaln.linear",)),
    ("krea2", "lora_unet_blocks_27_attn_wq", ("transformer.transformer_blocks.27.attn.to_q",)),
    ("krea2", "lora_unet_txtfusion_refiner_blocks_1_mlp_down", ("transformer.text_fusion.refiner_blocks.1.ff.down",)),
    (
        "qwen_image21",
        "lora_unet_transformer_blocks_0_img_mlp_gate_layer",
        ("transformer.transformer_blocks.0.img_mlp.gate_layer",),
    ),
    (
        "qwen_image21",
        "lora_unet_transformer_blocks_31_img_mlp_gate_up",
        ("transformer.transformer_blocks.31.img_mlp.gate_layer", "transformer.transformer_blocks.31.img_mlp.proj"),
    ),
    (
        "flux2",
        "lora_unet_double_blocks_7_img_attn_qkv",
        tuple(f"transformer.transformer_blocks.7.attn.to_{p}" for p in "qkv"),
    ),
    ("flux2", "lora_unet_single_blocks_47_linear1", ("transformer.single_transformer_blocks.47.attn.to_qkv_mlp_proj",)),
    (
        "hidream",
        "lora_unet_double_stream_blocks_0_block_attn1_to_q",
        ("transformer.double_stream_blocks.0.block.attn1.to_q",),
    ),
    (
        "hidream",
        "lora_unet_single_stream_blocks_31_block_ff_i_experts_3_w2",
        ("transformer.single_stream_blocks.31.block.ff_i.experts.3.w2",),
    ),
    ("lumina2", "lora_unet_layers_0_attention_qkv", tuple(f"transformer.layers.0.attn.to_{p}" for p in "qkv")),
    ("lumina2", "lora_unet_noise_refiner_0_feed_forward_w2", ("transformer.noise_refiner.0.feed_forward.linear_2",)),
    ("z_image", "lora_unet_layers_29_attention_to_q", ("transformer.layers.29.attention.to_q",)),
    ("z_image", "lora_unet_layers_0_attention_qkv", tuple(f"transformer.layers.0.attention.to_{p}" for p in "qkv")),
    ("z_image", "lora_unet_layers_0_attention_out", ("transformer.layers.0.attention.to_out.0",)),
    ("anima", "lora_unet_blocks_27_cross_attn_k_proj", ("transformer.transformer_blocks.27.attn2.to_k",)),
    ("anima", "lora_unet_llm_adapter_blocks_5_mlp_0", ("text_conditioner.blocks.5.mlp.0",)),
    (
        "chroma",
        "lora_unet_distilled_guidance_layer_layers_4_out_layer",
        ("transformer.distilled_guidance_layer.layers.4.linear_2",),
    ),
    (
        "chroma",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        ("text_encoder.encoder.block.0.layer.0.SelfAttention.q",),
    ),
    (
        "chroma",
        "lora_te1_encoder_block_0_layer_0_SelfAttention_q",
        ("text_encoder.encoder.block.0.layer.0.SelfAttention.q",),
    ),
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", None),
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0", None),
    ("sd1", "lora_unet_mid_block_attentions_0_proj_in", None),
    ("sd1", "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2", None),
    ("sd1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut", None),
    ("sd1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", None),
    ("sd1", "lora_te_text_model_encoder_layers_11_mlp_fc1", None),
    ("sd2", "lora_te_text_model_encoder_layers_22_self_attn_q_proj", None),
    (
        "sdxl",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",),
    ),
    (
        "sdxl",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj",
        ("unet.up_blocks.0.attentions.0.transformer_blocks.9.ff.net.0.proj",),
    ),
    (
        "sdxl",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
        ("unet.mid_block.attentions.0.transformer_blocks.9.attn2.to_k",),
    ),
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_2", ("unet.down_blocks.0.resnets.0.conv1",)),
    ("sdxl", "lora_unet_input_blocks_3_0_op", ("unet.down_blocks.0.downsamplers.0.conv",)),
    ("sdxl", "lora_unet_output_blocks_2_2_conv", ("unet.up_blocks.0.upsamplers.0.conv",)),
    # Some SDXL LoRAs use diffusers paths with the same prefix.
    (
        "sdxl",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",),
    ),
    (
        "sdxl",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",),
    ),
    ("sdxl", "lora_te1_text_model_encoder_layers_0_mlp_fc2", ("text_encoder.text_model.encoder.layers.0.mlp.fc2",)),
    (
        "flux1",
        "lora_unet_double_blocks_18_img_attn_qkv",
        tuple(f"transformer.transformer_blocks.18.attn.to_{x}" for x in "qkv"),
    ),
    (
        "flux1",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        tuple(f"transformer.transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"),
    ),
    (
        "flux1",
        "lora_unet_single_blocks_37_linear1",
        (
            "transformer.single_transformer_blocks.37.attn.to_q",
            "transformer.single_transformer_blocks.37.attn.to_k",
            "transformer.single_transformer_blocks.37.attn.to_v",
            "transformer.single_transformer_blocks.37.proj_mlp",
        ),
    ),
    ("flux1", "lora_unet_single_blocks_0_linear2", ("transformer.single_transformer_blocks.0.proj_out",)),
    ("flux1", "lora_unet_double_blocks_3_txt_mod_lin", ("transformer.transformer_blocks.3.norm1_context.linear",)),
    ("flux1", "lora_unet_final_layer_adaLN_modulation_1", ("transformer.norm_out.linear",)),
    ("flux1", "lora_unet_img_in", ("transformer.x_embedder",)),
    (
        "flux1",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",),
    ),
    (
        "flux1",
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
        ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj",),
    ),
    # Normalization layers (LyCORIS's norm algorithm: `<name>.w_norm` / `.b_norm`).
    ("sd1", "lora_unet_down_blocks_0_resnets_0_norm1", None),
    ("sd1", "lora_unet_conv_norm_out", None),
    ("sd1", "lora_unet_mid_block_attentions_0_transformer_blocks_0_norm3", None),
    ("sd1", "lora_te_text_model_encoder_layers_0_layer_norm1", None),
    ("sd1", "lora_te_text_model_final_layer_norm", None),
    ("sd2", "lora_te_text_model_encoder_layers_22_layer_norm2", None),
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_0", ("unet.down_blocks.0.resnets.0.norm1",)),
    ("sdxl", "lora_unet_output_blocks_8_0_out_layers_0", ("unet.up_blocks.2.resnets.2.norm2",)),
    ("sdxl", "lora_unet_middle_block_1_norm", ("unet.mid_block.attentions.0.norm",)),
    (
        "sdxl",
        "lora_unet_input_blocks_7_1_transformer_blocks_9_norm2",
        ("unet.down_blocks.2.attentions.0.transformer_blocks.9.norm2",),
    ),
    ("sdxl", "lora_unet_out_0", ("unet.conv_norm_out",)),
    ("sdxl", "lora_unet_down_blocks_0_resnets_1_norm2", ("unet.down_blocks.0.resnets.1.norm2",)),
    (
        "sdxl",
        "lora_te2_text_model_encoder_layers_31_layer_norm1",
        ("text_encoder_2.text_model.encoder.layers.31.layer_norm1",),
    ),
    ("sdxl", "lora_te2_text_model_final_layer_norm", ("text_encoder_2.text_model.final_layer_norm",)),
    ("flux1", "lora_unet_double_blocks_0_img_attn_norm_query_norm", ("transformer.transformer_blocks.0.attn.norm_q",)),
    (
        "flux1",
        "lora_unet_double_blocks_18_txt_attn_norm_key_norm",
        ("transformer.transformer_blocks.18.attn.norm_added_k",),
    ),
    ("flux1", "lora_unet_single_blocks_37_norm_key_norm", ("transformer.single_transformer_blocks.37.attn.norm_k",)),
    (
        "flux1",
        "lora_transformer_transformer_blocks_0_attn_norm_added_q",
        ("transformer.transformer_blocks.0.attn.norm_added_q",),
    ),
    ("flux1", "lora_te3_encoder_block_23_layer_1_layer_norm", ("text_encoder_2.encoder.block.23.layer.1.layer_norm",)),
    ("flux1", "lora_te3_encoder_final_layer_norm", ("text_encoder_2.encoder.final_layer_norm",)),
]


@pytest.mark.parametrize(("name", "kohya", "targets"), KOHYA_SPOT)
def test_known_real_kohya_names(name: str, kohya: str, targets: tuple[str, ...] | None) -> None:
    index = arch(name).kohya_index
    assert kohya in index
    if targets is None:  # SD1/SD2: kohya names are the diffusers path flattened
        (target,) = index[kohya]
        assert kohya_flat(target.split(".", 1)[1]) == kohya.split("_", 2)[2]
    else:
        assert index[kohya] == targets


SD3_TEXT = {"text_encoder": 12 * 2 + 1, "text_encoder_2": 32 * 2 + 1, "text_encoder_3": 24 * 2 + 1}


def test_norm_rows() -> None:
    """Every normalization layer with a learned weight is a row of its own: 1-D, never a default target."""
    # Independent counts from the block structure: 2 GroupNorms per ResNet, a GroupNorm per attention,
    # 3 LayerNorms per transformer block, conv_norm_out; CLIP 2 per layer + final; T5 2 per block + final.
    expected = {
        "sd1": {"unet": 22 * 2 + 16 + 16 * 3 + 1, "text_encoder": 12 * 2 + 1},
        "sd2": {"unet": 22 * 2 + 16 + 16 * 3 + 1, "text_encoder": 23 * 2 + 1},
        "sdxl": {"unet": 17 * 2 + 11 + 70 * 3 + 1, "text_encoder": 12 * 2 + 1, "text_encoder_2": 32 * 2 + 1},
        # Flux: only the q/k RMSNorms carry weights (its LayerNorms are modulated, without affine).
        "flux1": {"transformer": 19 * 4 + 38 * 2, "text_encoder": 12 * 2 + 1, "text_encoder_2": 24 * 2 + 1},
        # SD3: modulated LayerNorms only; SD3.5's q/k RMSNorms of both streams, 4 per block, plus SD3.5
        # Medium's attn2 q/k in blocks 0-12.
        "sd3": {"transformer": 0, **SD3_TEXT},
        "sd3.5-medium": {"transformer": 24 * 4 + 13 * 2, **SD3_TEXT},
        "sd3.5-large": {"transformer": 38 * 4, **SD3_TEXT},
        # Qwen-Image: q/k RMSNorms of both streams in its 60 blocks, and the text input's RMSNorm.
        "qwen_image": {"transformer": 60 * 4 + 1},
        # Chroma: Flux.1's q/k norms, and the approximator's 5 RMSNorms; T5 only.
        "chroma": {"transformer": 19 * 4 + 38 * 2 + 5, "text_encoder": 24 * 2 + 1},
        # Flux.2: only the q/k RMSNorms (4 per double block, 2 per single block).
        "flux2": {"transformer": 8 * 4 + 48 * 2},
        "flux2-klein-4b": {"transformer": 5 * 4 + 20 * 2},
        "flux2-klein-9b": {"transformer": 8 * 4 + 24 * 2},
        # Z-Image and Lumina 2: 6 norms in each of 34 / 30 blocks (two attention norms, two MLP norms,
        # q/k), and the caption embedder's RMSNorm.
        "z_image": {"transformer": 34 * 6 + 1},
        "lumina2": {"transformer": 30 * 6 + 1},
        # HiDream: q/k RMSNorms, of both streams in the 16 double blocks.
        "hidream": {"transformer": 16 * 4 + 32 * 2},
        # Anima: the timestep norm and 4 q/k norms per block; the adapter's 7 per block and a final one.
        "anima": {"transformer": 1 + 28 * 4, "text_conditioner": 6 * 7 + 1},
        # Qwen-Image 2.1: q/k RMSNorms of its 32 single-stream blocks and the text input's norm.
        "qwen_image21": {"transformer": 32 * 2 + 1},
        # Krea 2: pre/post norms and q/k norms of 28 blocks and 4 text-fusion blocks, the text input's
        # norm and the final norm.
        "krea2": {"transformer": 28 * 4 + 4 * 4 + 2},
        # Wan: q/k norms of both attentions and norm3 in every block (VACE blocks too); Wan 2.1 I2V adds
        # the image attention's norm_k_img per block and img_emb's two LayerNorms.
        "wan2.1-t2v-1.3b": {"transformer": 30 * 5},
        "wan2.1-vace-1.3b": {"transformer": (30 + 15) * 5},
        "wan2.1-t2v-14b": {"transformer": 40 * 5},
        "wan2.1-vace-14b": {"transformer": (40 + 8) * 5},
        "wan2.2-i2v-a14b": {"transformer": 40 * 5},
        "wan2.1-i2v-14b": {"transformer": 40 * 6 + 2},
        "wan2.2-ti2v-5b": {"transformer": 30 * 5},
        # LTX-Video: q/k norms of attn1 and attn2; LTX-2: of its 6 attentions (video, audio, cross-modal).
        # HunyuanVideo: its 2 token-refiner blocks' two norms, q/k norms of both streams in 20 double
        # blocks and of 40 single blocks; 1.5: 54 double blocks, the refiner, the image and ByT5 projections.
        "hunyuan_video": {"transformer": 2 * 2 + 20 * 4 + 40 * 2},
        "hunyuan_video15": {"transformer": 54 * 4 + 2 * 2 + 2 + 1},
        "ltx_video": {"transformer": 28 * 4},
        "ltx_video-13b": {"transformer": 48 * 4},
        "ltx2": {"transformer": 48 * 6 * 2},
        "ltx2.3": {"transformer": 48 * 6 * 2},
    }
    for name in ARCHS:
        a = arch(name)
        norms = [m for m in a.modules.values() if m.type == "norm"]
        counts = {c: sum(1 for m in norms if m.component == c) for c in a.components}
        assert counts == expected[name], name
        assert all(m.target == "norm" and len(m.shape) == 1 and m.native and m.fused is None for m in norms)
        assert all(m.type == "norm" for m in a.modules.values() if m.target == "norm")
    sd1 = arch("sd1")
    assert sd1.modules["unet.down_blocks.1.resnets.0.norm1"].shape == (320,)
    assert sd1.modules["unet.down_blocks.1.resnets.0.norm2"].shape == (640,)
    flux = arch("flux1")
    assert flux.modules["transformer.transformer_blocks.0.attn.norm_q"].shape == (128,)
    assert not any(".norm1.norm" in m or m.startswith("transformer.norm_out.norm") for m in flux.modules)


@pytest.mark.parametrize(
    ("name", "target", "native"),
    [
        ("sd1", "unet.down_blocks.0.resnets.0.norm1", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"),
        ("sd1", "unet.up_blocks.3.resnets.2.norm2", "model.diffusion_model.output_blocks.11.0.out_layers.0.weight"),
        ("sd1", "unet.conv_norm_out", "model.diffusion_model.out.0.weight"),
        ("sd1", "unet.mid_block.attentions.0.norm", "model.diffusion_model.middle_block.1.norm.weight"),
        (
            "sd1",
            "unet.up_blocks.1.attentions.2.transformer_blocks.0.norm1",
            "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.norm1.weight",
        ),
        (
            "sd1",
            "text_encoder.text_model.final_layer_norm",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        ),
        ("sd2", "text_encoder.text_model.final_layer_norm", "cond_stage_model.model.ln_final.weight"),
        (
            "sd2",
            "text_encoder.text_model.encoder.layers.3.layer_norm1",
            "cond_stage_model.model.transformer.resblocks.3.ln_1.weight",
        ),
        (
            "sdxl",
            "text_encoder_2.text_model.encoder.layers.3.layer_norm2",
            "conditioner.embedders.1.model.transformer.resblocks.3.ln_2.weight",
        ),
        (
            "flux1",
            "transformer.transformer_blocks.2.attn.norm_added_q",
            "double_blocks.2.txt_attn.norm.query_norm.scale",
        ),
        ("flux1", "transformer.single_transformer_blocks.5.attn.norm_k", "single_blocks.5.norm.key_norm.scale"),
        ("flux1", "text_encoder_2.encoder.block.0.layer.0.layer_norm", "encoder.block.0.layer.0.layer_norm.weight"),
    ],
)
def test_locate_norm_weights(name: str, target: str, native: str) -> None:
    a = arch(name)
    never = lambda k: pytest.fail(f"no shape needed for {k}")  # noqa: E731
    assert locate(a, (target,), {native}, never) == [Location(native)]
    assert locate(a, (target,), {target + ".weight"}, never) == [Location(target + ".weight")]
    assert a.native_index[a.components[a.modules[target].component].lora_prefixes[0] + a.modules[target].native] == (
        target,
    )


def test_checkpoint_weights_leave_norms_out(tmp_path) -> None:
    """Extract (checkpoint_weights) and base detection (checkpoint_architecture) see only what a LoRA
    factors: a single file with every SD1 weight, norms included, gives the same list as without them."""
    from safetensors.torch import save_file

    from loratool.archs.checkpoint import checkpoint_architecture, checkpoint_weights
    from loratool.io.source import open_source

    a = arch("sd1")
    ndim = {"linear": 2, "conv": 4, "embedding": 2, "norm": 1}
    tensors = {}
    for spec in a.modules.values():
        prefix = a.components[spec.component].file_prefixes[0]
        tensors[prefix + spec.native_weight] = torch.zeros((1,) * ndim[spec.type])
    save_file(tensors, tmp_path / "sd1.safetensors")
    with open_source(tmp_path / "sd1.safetensors") as source:
        assert checkpoint_architecture(source).name == "sd1"
        weights = checkpoint_weights(a, source)
    assert {w.name for w in weights} == {m.name for m in a.modules.values() if m.type != "norm"}
    assert "norm" not in {w.type for w in weights} | {w.target for w in weights}


def test_detect_norm_only_names() -> None:
    """A file of norm modules alone still names its architecture (SD1 and SD2 tie on the UNet, as always)."""
    names = [arch("sdxl").kohya_name(m.name) for m in arch("sdxl").modules.values() if m.type == "norm"]
    assert detect(names, "kohya", {}).arch.name == "sdxl"
    flux = [arch("flux1").kohya_name(m.name) for m in arch("flux1").modules.values() if m.type == "norm"]
    assert detect(flux, "kohya", {}).arch.name == "flux1"
    sd1 = [arch("sd1").kohya_name(m.name) for m in arch("sd1").modules.values() if m.type == "norm"]
    found = detect(sd1, "kohya", {})
    assert found.arch.name == "sd1" and set(found.resolved) == set(sd1)


def test_kohya_names_of_other_architectures_do_not_resolve() -> None:
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" not in arch("sd1").kohya_index
    assert "lora_unet_double_blocks_0_img_attn_qkv" not in arch("sdxl").kohya_index
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" not in arch("flux1").kohya_index
    assert "lora_te_text_model_encoder_layers_12_self_attn_q_proj" not in arch("sd1").kohya_index


# ---------------------------------------------------------------------------------------------------
# diffusers' kohya -> diffusers converters as an oracle for our kohya index
# ---------------------------------------------------------------------------------------------------
BIG = 100_000


def _kohya_state_dict(
    a: Architecture, keep, rank: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, ...]], dict[str, int]]:
    """kohya tensors for the kept modules: down filled with the name's number, up rows numbered."""
    names: dict[str, tuple[str, ...]] = {}
    for spec in a.modules.values():
        if keep(spec) and not (spec.native is None and a.components[spec.component].kohya[0].paths == "native"):
            names[a.kohya_name(spec.name)] = (spec.name,)
    for group in a.fused.values():
        naming = a.components[group.component].kohya[0]
        if naming.paths == "native" and keep(a.modules[group.parts[0]]):
            names[naming.prefix + kohya_flat(group.native)] = group.parts
    sd: dict[str, torch.Tensor] = {}
    number: dict[str, int] = {}
    for i, (kname, targets) in enumerate(names.items(), start=1):
        specs = [a.modules[t] for t in targets]
        out_features = sum(s.shape[0] for s in specs)
        in_features = specs[0].shape[1]
        conv = specs[0].type == "conv"
        down = torch.full((rank, in_features, *((1, 1) if conv else ())), float(i), dtype=torch.float64)
        up = (torch.arange(out_features, dtype=torch.float64) + i * BIG).unsqueeze(1).expand(out_features, rank)
        up = up.contiguous().reshape(out_features, rank, *((1, 1) if conv else ()))
        sd[kname + ".lora_down.weight"] = down
        sd[kname + ".lora_up.weight"] = up
        sd[kname + ".alpha"] = torch.tensor(float(rank), dtype=torch.float64)
        number[kname] = i
    return sd, names, number


def _norm(path: str) -> str:
    """Canonical and diffusers text-encoder paths may differ only in CLIP's `text_model.` level."""
    return path.replace(".text_model.", ".")


def _peft_modules(converted: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    unet = {k: v for k, v in converted.items() if k.startswith("unet.")}
    te = {k: v for k, v in converted.items() if k.startswith("text_encoder")}
    transformer = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    assert len(unet) + len(te) + len(transformer) == len(converted)
    peft = {**(convert_unet_state_dict_to_peft(unet) if unet else {}), **transformer}
    if te:
        peft.update(convert_state_dict_to_peft(te))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft.items():
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                modules.setdefault(_norm(key[: -len(suffix)]), {})[suffix[1:7]] = value
    return modules


def _check_against_oracle(a: Architecture, converted, names, number, sd) -> None:
    modules = _peft_modules(converted)
    expected_targets = {_norm(t): t for targets in names.values() for t in targets}
    assert set(modules) == set(expected_targets)
    for kname, targets in names.items():
        up = sd[kname + ".lora_up.weight"]
        specs = [a.modules[t] for t in targets]
        if len(targets) > 1:
            group = a.fused_group(targets)
            assert group is not None
            sizes = group.row_sizes(specs[0].shape[1], up.shape[0])
        else:
            sizes = [up.shape[0]]
        start = 0
        for target, rows in zip(targets, sizes, strict=True):
            got = modules[_norm(target)]
            assert torch.all(got["lora_A"] == number[kname]), (kname, target)
            assert torch.equal(got["lora_B"].double().reshape(rows, -1), up[start : start + rows].reshape(rows, -1)), (
                kname,
                target,
            )
            start += rows


def test_sd1_kohya_names_match_diffusers_conversion() -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    a = arch("sd1")
    sd, names, number = _kohya_state_dict(a, lambda s: s.target == "default")
    assert len(names) == 192 + 72
    converted, _alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(sd))
    _check_against_oracle(a, converted, names, number, sd)


def test_sdxl_kohya_names_match_diffusers_conversion() -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    a = arch("sdxl")
    sd, names, number = _kohya_state_dict(a, lambda s: s.target == "default")
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_te2_") for n in names)
    converted, _alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
        dict(sd), unet_config=SimpleNamespace(layers_per_block=2)
    )
    _check_against_oracle(a, converted, names, number, sd)


def test_flux_kohya_names_match_diffusers_conversion() -> None:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    a = arch("flux1")
    # diffusers drops kohya's T5 (lora_te3_) modules, so the oracle covers the transformer and CLIP-L.
    sd, names, number = _kohya_state_dict(a, lambda s: s.target == "default" and s.component != "text_encoder_2", 2)
    assert "lora_unet_single_blocks_37_linear1" in names
    assert "lora_unet_double_blocks_18_txt_attn_qkv" in names
    converted, _alphas = FluxLoraLoaderMixin.lora_state_dict(dict(sd), return_alphas=True)
    _check_against_oracle(a, converted, names, number, sd)


# ---------------------------------------------------------------------------------------------------
# Fused groups, row sizes, optional levels
# ---------------------------------------------------------------------------------------------------
def test_fused_group_lookup() -> None:
    flux = arch("flux1")
    group = flux.fused["transformer.single_blocks.3.linear1"]
    assert flux.fused_group(group.parts) is group
    assert flux.fused_group(tuple(reversed(group.parts))) is None
    assert flux.fused_group(group.parts[:3]) is None
    assert flux.fused_group(group.parts[:1]) is None
    assert flux.fused_group(("transformer.single_transformer_blocks.3.proj_out",)) is None
    qkv = flux.fused["transformer.double_blocks.0.txt_attn.qkv"]
    assert qkv.parts == tuple(f"transformer.transformer_blocks.0.attn.add_{x}_proj" for x in "qkv")
    assert flux.fused_group(qkv.parts) is qkv
    # parts of different groups do not form a group
    other = flux.fused["transformer.double_blocks.1.txt_attn.qkv"]
    assert flux.fused_group((qkv.parts[0], other.parts[1], other.parts[2])) is None

    sdxl = arch("sdxl")
    in_proj = sdxl.fused["text_encoder_2.transformer.resblocks.31.attn.in_proj"]
    assert in_proj.weight == "transformer.resblocks.31.attn.in_proj_weight"
    assert in_proj.parts == tuple(f"text_encoder_2.text_model.encoder.layers.31.self_attn.{x}_proj" for x in "qkv")
    assert sdxl.fused_group(in_proj.parts) is in_proj
    for i, part in enumerate(in_proj.parts):
        assert sdxl.modules[part].fused == in_proj.name and sdxl.modules[part].part == i


def test_row_sizes_come_from_tensors() -> None:
    flux = arch("flux1")
    linear1 = flux.fused["transformer.single_blocks.0.linear1"]
    assert linear1.sizes == ("in", "in", "in", "rest")
    assert linear1.row_sizes(5, 26) == [5, 5, 5, 11]
    assert linear1.row_sizes(3072, 21504) == [3072, 3072, 3072, 12288]
    assert linear1.row_sizes(64, 64 * 3 + 7) == [64, 64, 64, 7]
    qkv = flux.fused["transformer.double_blocks.0.img_attn.qkv"]
    assert qkv.row_sizes(9, 27) == [9, 9, 9]
    in_proj = arch("sd2").fused["text_encoder.transformer.resblocks.0.attn.in_proj"]
    assert in_proj.row_sizes(7, 21) == [7, 7, 7]
    # Table shapes agree with the row sizes for every fused weight.
    for name in ARCHS:
        a = arch(name)
        for group in a.fused.values():
            specs = [a.modules[p] for p in group.parts]
            assert group.row_sizes(specs[0].shape[1], sum(s.shape[0] for s in specs)) == [s.shape[0] for s in specs]


def test_level_variants_for_clip_text_model() -> None:
    assert level_variants("text_model.encoder.layers.0.mlp.fc1", ("text_model.",)) == [
        "text_model.encoder.layers.0.mlp.fc1",
        "encoder.layers.0.mlp.fc1",
    ]
    assert level_variants("encoder.layers.0.mlp.fc1", ("text_model.",)) == ["encoder.layers.0.mlp.fc1"]
    assert level_variants("text_model.encoder.layers.0.mlp.fc1", ()) == ["text_model.encoder.layers.0.mlp.fc1"]
    sd1 = arch("sd1")
    target = ("text_encoder.text_model.encoder.layers.3.self_attn.v_proj",)
    assert sd1.path_index["text_encoder.text_model.encoder.layers.3.self_attn.v_proj"] == target
    assert sd1.path_index["text_encoder.encoder.layers.3.self_attn.v_proj"] == target
    # CLIPTextModelWithProjection keeps the level: no optional variant for SDXL's second encoder.
    sdxl = arch("sdxl")
    assert "text_encoder_2.text_model.encoder.layers.3.self_attn.v_proj" in sdxl.path_index
    assert "text_encoder_2.encoder.layers.3.self_attn.v_proj" not in sdxl.path_index
    assert "text_encoder.encoder.layers.3.self_attn.v_proj" in sdxl.path_index


def test_path_index_matches_module_names_of_tiny_reference_models() -> None:
    """The diffusers/PEFT names real (narrow) models use resolve through the tables."""
    from tiny_models import clip_config, clip_text_model, sd15_unet
    from transformers import CLIPTextModelWithProjection

    def linear_paths(model) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or is_norm(m)]

    with torch.device("meta"):
        unet = sd15_unet()
        clip = clip_text_model()
        clip2 = CLIPTextModelWithProjection(clip_config())
    sd1 = arch("sd1").path_index
    assert any(p.endswith(".norm1") for p in linear_paths(unet)) and any("layer_norm" in p for p in linear_paths(clip))
    assert [p for p in linear_paths(unet) if "unet." + p not in sd1] == []
    assert [p for p in linear_paths(clip) if "text_encoder." + p not in sd1] == []
    sdxl = arch("sdxl").path_index
    assert [p for p in linear_paths(clip2) if "text_encoder_2." + p not in sdxl] == []


# ---------------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------------
def _kohya_names(name: str, keep=lambda s: s.target == "default") -> list[str]:
    a = arch(name)
    out = []
    for spec in a.modules.values():
        if keep(spec):
            try:
                out.append(a.kohya_name(spec.name))
            except KeyError:
                out.append(a.components[spec.component].kohya[0].prefix + kohya_flat(a.fused[spec.fused].native))
    return list(dict.fromkeys(out))


def test_detect_sd1_names_and_sd2_tie_breaks() -> None:
    names = _kohya_names("sd1")
    found = detect(names, "kohya", {})
    assert found.arch.name == "sd1"
    assert set(found.resolved) == set(names)
    assert found.resolved["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    )
    # SD2 has every SD1 name: metadata decides.
    assert dict(found.scores)["sd2"] == len(names)
    assert detect(names, "kohya", {"ss_base_model_version": "sd_v2_768_v"}).arch.name == "sd2"
    assert detect(names, "kohya", {"ss_base_model_version": "sd_v1"}).arch.name == "sd1"
    assert detect(names, "kohya", {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}).arch.name == "sd2"

    # Full-size shapes implied by the factors decide next: SD2 cross-attention reads 1024-wide text.
    sd2 = arch("sd2")

    def implied(width: int):
        def shape(n: str) -> tuple[int, ...] | None:
            if n.endswith(("attn2_to_k", "attn2_to_v")):
                return (sd2.modules[sd2.kohya_index[n][0]].shape[0], width)
            return None

        return shape

    assert detect(names, "kohya", {}, implied(1024)).arch.name == "sd2"
    found = detect(names, "kohya", {}, implied(768))
    assert found.arch.name == "sd1" and "sd2 has these names at other widths" in found.reason


def test_detect_sdxl_and_flux() -> None:
    names = _kohya_names("sdxl")
    found = detect([*names, "lora_unet_not_a_module"], "kohya", {})
    assert found.arch.name == "sdxl"
    assert "lora_unet_not_a_module" not in found.resolved
    assert found.resolved["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"] == (
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
    )
    # Attention-only SDXL LoRA (the common case).
    unet_only = [n for n in names if n.startswith("lora_unet_")]
    assert detect(unet_only, "kohya", {}).arch.name == "sdxl"

    flux_names = _kohya_names("flux1", lambda s: s.component == "transformer" and s.target == "default")
    found = detect(flux_names, "kohya", {})
    assert found.arch.name == "flux1"
    assert len(found.resolved["lora_unet_single_blocks_0_linear1"]) == 4
    # BFL single-file names (scheme "native") and diffusers paths.
    assert detect(["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"], "native", {}).arch.name == "flux1"
    paths = [f"transformer.transformer_blocks.{i}.attn.to_q" for i in range(19)]
    assert detect(paths, "diffusers", {}).arch.name == "flux1"
    assert detect(["nothing.here"], "kohya", {}).arch is None


def _hf_models() -> dict[str, object]:
    import transformers as tf

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=0)
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **ids)
    encoder = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    seq2seq = dict(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**small, num_key_value_heads=2)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=2)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**small, num_key_value_heads=2, head_dim=8)),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**small)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**small)),
        "gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, **ids)
        ),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small)),
        "falcon": lambda: tf.FalconForCausalLM(
            tf.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids)
        ),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, **ids)),
        "opt": lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=64,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=32,
                **ids,
            )
        ),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(**seq2seq, **ids)),
        "whisper": lambda: tf.WhisperForConditionalGeneration(
            tf.WhisperConfig(**seq2seq, num_mel_bins=8, max_source_positions=16, max_target_positions=16, **ids)
        ),
        "gptj": lambda: tf.GPTJForCausalLM(
            tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, **ids)
        ),
        "mpt": lambda: tf.MptForCausalLM(tf.MptConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4)),
        "distilbert": lambda: tf.DistilBertModel(
            tf.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        ),
        "deberta-v2": lambda: tf.DebertaV2Model(tf.DebertaV2Config(**encoder)),
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(**encoder)),
        "electra": lambda: tf.ElectraModel(tf.ElectraConfig(**encoder, embedding_size=32)),
        "t5": lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, decoder_start_token_id=0, **ids
            )
        ),
    }


HF_EXPECTED_FAMILY = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "llama",
    "phi": "phi",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "bloom": "falcon",
    "opt": "opt",
    "t5": "t5",
    "bart": "bart",
    "whisper": "bart",
    "gptj": "gptj",
    "mpt": "mpt",
    "distilbert": "distilbert",
    "deberta-v2": "deberta-v2",
    "roberta": "bert",
    "electra": "bert",
}


@pytest.fixture(scope="module")
def hf_paths() -> dict[str, list[str]]:
    from transformers.pytorch_utils import Conv1D

    out = {}
    for model_type, build in _hf_models().items():
        with torch.device("meta"):
            model = build()
        assert model.config.model_type == model_type
        out[model_type] = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        assert out[model_type]
    return out


@pytest.mark.parametrize("model_type", sorted(HF_EXPECTED_FAMILY))
def test_detect_hf_family_from_tiny_transformers_models(model_type: str, hf_paths: dict[str, list[str]]) -> None:
    paths = hf_paths[model_type]
    found = detect_hf(paths)
    assert found is not None
    assert found.family is not None and found.family.model_type == HF_EXPECTED_FAMILY[model_type]
    assert found.name == model_type or model_type in found.family.same_names
    assert model_type in found.candidates
    # Through the generic detector: no diffusion table explains these paths.
    via_detect = detect(paths, "diffusers", {})
    assert isinstance(via_detect.arch, HFArchitecture)
    assert via_detect.arch.family is found.family
    assert via_detect.resolved == {p: (p,) for p in paths}


@pytest.mark.parametrize("model_type", ["opt", "bart", "gptj", "distilbert"])
def test_an_adapter_on_a_few_module_types_keeps_its_family(model_type: str, hf_paths: dict[str, list[str]]) -> None:
    """PEFT's default targets are often only q and v (OPT: q_proj, v_proj): paths that also fit
    Llama's patterns go to the family whose patterns say more of them."""
    leaves = {"opt": ("q_proj", "v_proj"), "bart": ("q_proj", "v_proj"), "gptj": ("q_proj", "v_proj")}
    wanted = leaves.get(model_type, ("q_lin", "v_lin"))
    paths = [p for p in hf_paths[model_type] if p.rsplit(".", 1)[-1] in wanted]
    assert paths
    found = detect_hf(paths)
    assert found.family.model_type == HF_EXPECTED_FAMILY[model_type]


def test_the_model_name_picks_between_families_that_fit_equally(hf_paths: dict[str, list[str]]) -> None:
    opt_qv = [p for p in hf_paths["opt"] if p.endswith(("q_proj", "v_proj"))]
    assert detect_hf(opt_qv, name_hint="facebook/opt-350m").name == "opt"
    encoder_only = [p for p in hf_paths["bart"] if ".encoder." in p]
    assert detect_hf(encoder_only, name_hint="openai/whisper-tiny").name == "whisper"


def test_detect_hf_config_and_name_hints(hf_paths: dict[str, list[str]]) -> None:
    llama_like = hf_paths["qwen2"]
    found = detect_hf(llama_like, config={"model_type": "qwen2"})
    assert (found.name, found.source) == ("qwen2", "config")
    assert found.family.model_type == "llama"
    found = detect_hf([], config={"model_type": "mamba"})
    assert found.name == "mamba" and found.family is None and found.candidates == ["mamba"]
    found = detect_hf(llama_like, name_hint="Qwen/Qwen2-0.5B")
    assert (found.name, found.source) == ("qwen2", "name")
    assert detect_hf(llama_like, name_hint="mistralai/Mistral-7B-v0.1").name == "mistral"
    assert detect_hf(llama_like, name_hint="google/gemma-2-9b").name == "gemma2"
    assert detect_hf(llama_like, name_hint="meta-llama/Llama-3.1-8B").name == "llama"
    assert detect_hf(llama_like, name_hint="someone/unrelated").name == "llama"
    assert detect(llama_like, "diffusers", {}, hf_name_hint="Qwen/Qwen2-0.5B").arch.name == "qwen2"
    assert detect_hf(["foo.bar"]) is None
    assert {f.model_type for f in HF_FAMILIES} >= set(HF_EXPECTED_FAMILY.values())


# ---------------------------------------------------------------------------------------------------
# locate: canonical module -> base checkpoint key (+ row slice)
# ---------------------------------------------------------------------------------------------------
def _single_file_keys(a: Architecture) -> set[str]:
    keys = set()
    for spec in a.modules.values():
        prefix = a.components[spec.component].file_prefixes[0]
        if spec.native_weight is not None:
            keys.add(prefix + spec.native_weight)
            if not spec.transposed:
                keys.add(prefix + spec.native + ".bias")
    for group in a.fused.values():
        keys.add(a.components[group.component].file_prefixes[0] + group.weight)
    return keys


def test_locate_sdxl_single_file_with_fused_openclip_rows() -> None:
    a = arch("sdxl")
    keys = _single_file_keys(a)
    d = 7  # a non-standard width: rows must come from the shape, not from 1280
    calls = []

    def shape_of(key: str) -> tuple[int, ...]:
        calls.append(key)
        assert key.endswith("in_proj_weight")
        return (3 * d, d)

    in_proj = "conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"
    layer = "text_encoder_2.text_model.encoder.layers.5.self_attn."
    assert locate(a, (layer + "q_proj",), keys, shape_of) == [Location(in_proj, (0, d), fused_rows=3 * d)]
    assert locate(a, (layer + "k_proj",), keys, shape_of) == [Location(in_proj, (d, 2 * d), fused_rows=3 * d)]
    assert locate(a, (layer + "v_proj",), keys, shape_of) == [Location(in_proj, (2 * d, 3 * d), fused_rows=3 * d)]
    assert locate(a, a.fused["text_encoder_2.transformer.resblocks.5.attn.in_proj"].parts, keys, shape_of) == [
        Location(in_proj, (0, d), fused_rows=3 * d),
        Location(in_proj, (d, 2 * d), fused_rows=3 * d),
        Location(in_proj, (2 * d, 3 * d), fused_rows=3 * d),
    ]
    assert calls
    assert locate(a, (layer + "out_proj",), keys, shape_of) == [
        Location("conditioner.embedders.1.model.transformer.resblocks.5.attn.out_proj.weight")
    ]
    assert locate(a, ("text_encoder_2.text_model.encoder.layers.5.mlp.fc1",), keys, shape_of) == [
        Location("conditioner.embedders.1.model.transformer.resblocks.5.mlp.c_fc.weight")
    ]
    assert locate(a, ("text_encoder_2.text_projection",), keys, shape_of) == [
        Location("conditioner.embedders.1.model.text_projection", transposed=True)
    ]
    assert locate(a, ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",), keys, shape_of) == [
        Location("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    ]
    assert locate(a, ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",), keys, shape_of) == [
        Location("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")
    ]
    # Every module of the table is found, and no two unfused modules share a key.
    found = {t: locate(a, (t,), keys, lambda k: (3 * d, d)) for t in a.modules}
    assert all(v is not None for v in found.values())
    plain = [v[0].key for v in found.values() if v[0].rows is None]
    assert len(plain) == len(set(plain))
    # Missing keys: None (also when only one of several targets is missing).
    assert locate(a, (layer + "q_proj",), set(), shape_of) is None
    partial = keys - {"conditioner.embedders.1.model.transformer.resblocks.5.attn.out_proj.weight"}
    assert locate(a, (layer + "q_proj", layer + "out_proj"), partial, shape_of) is None


def test_locate_flux_single_file_linear1_rows_and_swapped_final_modulation() -> None:
    a = arch("flux1")
    keys = {k for k in _single_file_keys(a) if not k.startswith("text_model.") and ".block." not in k}
    hidden, mlp = 5, 11

    def shape_of(key: str) -> tuple[int, ...]:
        if key.endswith("linear1.weight"):
            return (3 * hidden + mlp, hidden)
        if key.endswith("qkv.weight"):
            return (3 * hidden, hidden)
        raise AssertionError(key)

    group = a.fused["transformer.single_blocks.2.linear1"]
    assert locate(a, group.parts, keys, shape_of) == [
        Location("single_blocks.2.linear1.weight", (0, 5), fused_rows=26),
        Location("single_blocks.2.linear1.weight", (5, 10), fused_rows=26),
        Location("single_blocks.2.linear1.weight", (10, 15), fused_rows=26),
        Location("single_blocks.2.linear1.weight", (15, 26), fused_rows=26),
    ]
    assert locate(a, ("transformer.transformer_blocks.4.attn.add_v_proj",), keys, shape_of) == [
        Location("double_blocks.4.txt_attn.qkv.weight", (10, 15), fused_rows=15)
    ]
    assert locate(a, ("transformer.norm_out.linear",), keys, shape_of) == [
        Location("final_layer.adaLN_modulation.1.weight", native_rows=True)
    ]
    assert locate(a, ("transformer.single_transformer_blocks.2.proj_out",), keys, shape_of) == [
        Location("single_blocks.2.linear2.weight")
    ]
    # ComfyUI-style prefix on the base keys.
    prefixed = {"model.diffusion_model." + k for k in keys}
    assert locate(a, group.parts[3:], prefixed, shape_of) == [
        Location("model.diffusion_model.single_blocks.2.linear1.weight", (15, 26), fused_rows=26)
    ]
    assert locate(a, group.parts, {"single_blocks.3.linear1.weight"}, shape_of) is None


def test_locate_diffusers_folder_keys() -> None:
    a = arch("sd1")
    unet_path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    te = "text_encoder.text_model.encoder.layers.2.self_attn.q_proj"
    keys = {unet_path + ".weight", "text_encoder.encoder.layers.2.self_attn.q_proj.weight"}
    never = lambda k: pytest.fail(f"no shape needed for {k}")  # noqa: E731
    assert locate(a, (unet_path,), keys, never) == [Location(unet_path + ".weight")]
    assert locate(a, (te,), keys, never) == [Location("text_encoder.encoder.layers.2.self_attn.q_proj.weight")]
    older = {te + ".weight"}
    assert locate(a, (te,), older, never) == [Location(te + ".weight")]
    assert locate(a, (te,), {unet_path + ".weight"}, never) is None
    # SDXL second encoder in a diffusers folder, fused in single files but separate here.
    sdxl = arch("sdxl")
    q = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    assert locate(sdxl, (q,), {q + ".weight"}, never) == [Location(q + ".weight")]


def test_locate_hf_keys_with_and_without_model_prefix() -> None:
    family = next(f for f in HF_FAMILIES if f.model_type == "llama")
    hf = HFArchitecture("llama", family, "keys")
    never = lambda k: pytest.fail(f"no shape needed for {k}")  # noqa: E731
    target = "model.layers.0.self_attn.q_proj"
    assert locate(hf, (target,), {"model.layers.0.self_attn.q_proj.weight"}, never) == [
        Location("model.layers.0.self_attn.q_proj.weight")
    ]
    assert locate(hf, (target,), {"layers.0.self_attn.q_proj.weight"}, never) == [
        Location("layers.0.self_attn.q_proj.weight")
    ]
    assert locate(hf, ("layers.1.mlp.up_proj",), {"model.layers.1.mlp.up_proj.weight"}, never) == [
        Location("model.layers.1.mlp.up_proj.weight")
    ]
    both = {"model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight"}
    assert locate(hf, (target,), both, never) == [Location("model.layers.0.self_attn.q_proj.weight")]
    assert locate(hf, (target,), {"model.layers.1.self_attn.q_proj.weight"}, never) is None
    assert locate(hf, (target, "model.layers.0.self_attn.k_proj"), {target + ".weight"}, never) is None
