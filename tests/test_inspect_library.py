"""`inspect` over a library: many paths and folders, JSON Lines, a scan that survives bad files, and
the header-only mode, whose answers must be the full inspect's wherever they need no tensor values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_merge_lycoris import build as build_lycoris

from loratool import api
from loratool.cli import main
from loratool.io.safetensors_file import PAGE, SafetensorsFile
from loratool.io.source import open_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LORA_FIXTURES = [*sorted(p.name for p in FIXTURES.glob("*.safetensors")), "peft_llama"]
KINDS = ("loha-tucker", "lokr", "locon-tucker", "mixed", "ia3", "glora", "dora", "norm")
# Findings a header shows: these must come out of a header-only inspect exactly as out of a full one.
HEADER_CODES = {
    "unknown-architecture",
    "orphan-tensor",
    "unknown-key",
    "alpha-missing",
    "alpha-precision",
    "scale-unusual",
    "dtype-mixed",
    "metadata-mismatch",
    "shape-mismatch",
    "broken-module",
}
MODULE_FIELDS = ("name", "targets", "component", "kind", "rank", "alpha", "alpha_source", "scale", "dtype", "shape")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    """Every fixture we ship, and a file of each LyCORIS kind saved by lycoris-lora itself."""
    root = tmp_path_factory.mktemp("kinds")
    made = []
    for kind in KINDS:
        (root / kind).mkdir()
        made.append(build_lycoris(kind, root / kind)[2])
    return [FIXTURES / name for name in LORA_FIXTURES] + made


def _findings(report: api.InspectReport) -> set[tuple[str, str | None, str, str]]:
    return {(f.code, f.module, f.severity, f.message) for f in report.findings}


def test_header_only_answers_what_the_full_inspect_answers(adapters):
    for path in adapters:
        full, fast = api.inspect(path), api.inspect(path, header_only=True)
        assert fast.header_only and not full.header_only
        assert (fast.format, fast.variant, fast.architecture, fast.architecture_reason) == (
            full.format,
            full.variant,
            full.architecture,
            full.architecture_reason,
        ), path.name
        assert fast.metadata == full.metadata and fast.config == full.config
        for mine, theirs in zip(fast.modules, full.modules, strict=True):
            assert [getattr(mine, f) for f in MODULE_FIELDS] == [getattr(theirs, f) for f in MODULE_FIELDS], path.name
            assert mine.dw_norm is None and mine.singular_values is None
        summary = {k: v for k, v in full.summary.items() if k != "findings"}
        assert {k: v for k, v in fast.summary.items() if k != "findings"} == summary, path.name
        expected = {f for f in _findings(full) if f[0] in HEADER_CODES}
        assert _findings(fast) == expected, path.name


def test_header_only_reads_no_tensor_values(adapters, monkeypatch):
    """Only the one-value tensors that hold settings are read: at most one page (what the system
    reads for any read) per setting, however large the factors are, and no tensor is ever loaded."""
    read: list[int] = []
    original = SafetensorsFile.read_span

    def counted(self, offset, size, what="tensor data"):
        read.append(size)
        return original(self, offset, size, what)

    def refused(*args, **kwargs):
        raise AssertionError("a header-only inspect loaded a tensor")

    monkeypatch.setattr(SafetensorsFile, "read_span", counted)
    monkeypatch.setattr(SafetensorsFile, "load", refused)
    for path in adapters:
        with open_source(path) as source:
            settings = sum(1 for key in source if source.info(key).numel == 1)  # alphas, IA3's on_input flags
        read.clear()
        api.inspect(path, header_only=True)
        assert all(size <= PAGE for size in read), path.name
        assert len(read) <= settings, path.name


def _library(root: Path, adapters: list[Path]) -> Path:
    """A folder as people keep them: files at several depths, a PEFT adapter folder, a hidden
    file, something that is not a LoRA and a truncated download."""
    library = root / "library"
    (library / "sd15" / "styles").mkdir(parents=True)
    (library / "llm").mkdir()
    shutil.copy(FIXTURES / "kohya_sd15.safetensors", library / "sd15" / "a.safetensors")
    shutil.copy(FIXTURES / "lycoris_loha.safetensors", library / "sd15" / "styles" / "b.safetensors")
    shutil.copy(FIXTURES / "flux_comfyui.safetensors", library / "c.safetensors")
    shutil.copytree(FIXTURES / "peft_llama", library / "llm" / "adapter")
    data = (FIXTURES / "kohya_sdxl.safetensors").read_bytes()
    (library / "sd15" / "broken.safetensors").write_bytes(data[: len(data) // 2])
    (library / ".hidden.safetensors").write_bytes(b"not even a header")
    (library / "notes.txt").write_text("not an adapter")
    return library


def test_a_folder_is_scanned_recursively_in_name_order(tmp_path, adapters):
    library = _library(tmp_path, adapters)
    found = [Path(s.path).relative_to(library).as_posix() for s in api.inspect_each([library], header_only=True)]
    assert found == [
        "c.safetensors",
        "llm/adapter",
        "sd15/a.safetensors",
        "sd15/broken.safetensors",
        "sd15/styles/b.safetensors",
    ]


def test_json_lines_one_per_file_and_the_scan_goes_on_past_bad_files(tmp_path, adapters):
    library = _library(tmp_path, adapters)
    missing = tmp_path / "gone.safetensors"
    result = CliRunner().invoke(main, ["inspect", str(library), str(missing), "--header-only", "--json"])
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6
    by_name = {Path(line["path"]).name: line for line in lines}
    assert "not a valid safetensors file" in by_name["broken.safetensors"]["error"]
    assert "no such file" in by_name["gone.safetensors"]["error"]
    assert by_name["a.safetensors"]["architecture"] == "sd1" and by_name["adapter"]["format"] == "peft"
    assert by_name["b.safetensors"]["summary"]["kinds"] == {"loha": 22}
    assert all(line["header_only"] for line in lines if "error" not in line)
    # stderr: one line per failure and a closing count, never a traceback
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("loratool: error: ") for e in errors)
    assert errors[-1] == "loratool: error: 6 files inspected: 2 could not be read"


def test_the_same_answers_from_a_folder_as_file_by_file(tmp_path, adapters):
    library = _library(tmp_path, adapters)
    scanned = {s.path: s.report for s in api.inspect_each([library]) if s.report is not None}
    for path, report in scanned.items():
        alone = api.inspect(path)
        assert report.to_json() == alone.to_json()


def test_text_mode_prints_a_line_per_file(tmp_path):
    one, two = FIXTURES / "kohya_sd15.safetensors", FIXTURES / "kohya_flux.safetensors"
    result = CliRunner().invoke(main, ["inspect", str(one), str(two), "--header-only"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == [
        f"{one}: kohya; sd1; 49 modules; rank 4 (45), 2 (4); alpha 4 (39), 2 (6), 1 (4); F16; 0 errors, 0 warnings",
        f"{two}: kohya; flux1; 38 modules; rank 4; alpha 4; BF16; 0 errors, 0 warnings",
    ]
    full = CliRunner().invoke(main, ["inspect", str(one), str(two), "--keys", "--quiet"])
    assert full.exit_code == 0 and full.stdout.count("format ") == 2 and "‖ΔW‖" in full.stdout


def test_one_file_is_one_json_line(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(FIXTURES / "kohya_sdxl.safetensors"), "--json"])
    assert result.exit_code == 0
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["architecture"] == "sdxl"


def test_strict_over_a_scan_exits_1_on_error_findings(tmp_path):
    library = tmp_path / "lib"
    library.mkdir()
    shutil.copy(FIXTURES / "kohya_sd15.safetensors", library / "fine.safetensors")
    assert CliRunner().invoke(main, ["inspect", str(library), "--strict", "--header-only"]).exit_code == 0
    tensors = load_file(FIXTURES / "kohya_sd15.safetensors")
    up = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    tensors[up] = tensors[up][:, :-1].contiguous()  # one rank short of its down: factors that cannot go together
    save_file(tensors, library / "mismatched.safetensors")
    for mode in ([], ["--header-only"]):
        result = CliRunner().invoke(main, ["inspect", str(library), "--strict", *mode])
        assert result.exit_code == 1, result.output
        assert "mismatched.safetensors" in result.stdout and "1 errors" in result.stdout
        assert result.stderr.strip() == "loratool: error: 2 files inspected: 1 with error-level findings"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--header-only", "--base", "x.safetensors"], "cannot check them against --base"),
        (["--plot", "out.png"], "--plot draws one file's report"),
    ],
)
def test_refusals(tmp_path, args, message):
    paths = [str(FIXTURES / "kohya_sd15.safetensors"), str(FIXTURES / "kohya_flux.safetensors")]
    if "--base" in args:
        paths = paths[:1]
    result = CliRunner().invoke(main, ["inspect", *paths, *args])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_an_empty_folder_is_said_and_others_still_scanned(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["inspect", str(empty), str(FIXTURES / "kohya_sd15.safetensors"), "--json"])
    assert result.exit_code == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert "no .safetensors LoRA files or PEFT adapter folders in this folder" in first["error"]
    assert second["architecture"] == "sd1"
