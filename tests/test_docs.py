"""Docs that cannot drift: generated sections are current, README's commands are marked for CI, and
the benchmark script still runs (at a tiny size; its numbers are not checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_formats_doc_matches_the_architecture_tables():
    result = subprocess.run(
        [sys.executable, "docs/make_formats.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_marks_exactly_one_install_and_one_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("<!-- ci:install -->") == 1
    assert readme.count("<!-- ci:test -->") == 1
    install = readme.split("<!-- ci:install -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert "pip install" in install and "loratool inspect fixtures/" in install
    fixture = install.split("loratool inspect ", 1)[1].split()[0]
    assert (ROOT / fixture).exists()


def test_every_doc_linked_from_readme_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for link in (
        "docs/inspect.md",
        "docs/convert.md",
        "docs/merge.md",
        "docs/extract.md",
        "docs/formats.md",
        "docs/architecture.md",
        "docs/benchmarks.md",
        "docs/kinds.md",
        "docs/errors.md",
        "docs/index.md",
        "docs/cookbook.md",
        "docs/api.md",
        "docs/combine.md",
        "docs/resize.md",
        "docs/make_examples.py",
    ):
        assert f"({link})" in readme
        assert (ROOT / link).is_file()


def test_errors_doc_lists_every_exit_code_and_error_family():
    from loratool import errors

    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert codes == {1, 2, 130, 141, 143}
    for code in {0, *codes}:
        assert f"\n| {code} |" in doc, code
    families = {errors.LoratoolError}
    while True:
        more = {sub for cls in families for sub in cls.__subclasses__()} - families
        if not more:
            break
        families |= more
    for cls in families - {errors.LoratoolError}:
        assert f"(`{cls.__name__}`, exit {cls.exit_code})" in doc, cls.__name__


def run_benchmark(script: str, tmp_path) -> str:
    """A benchmark at a tiny size: it must run; its numbers are not checked here."""
    result = subprocess.run(
        [sys.executable, script, "--size-mb", "2", "--repeat", "1", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_inspect_benchmark_runs(tmp_path):
    stdout = run_benchmark("benchmarks/inspect.py", tmp_path)
    assert "ratio inspect / read:" in stdout
    assert "0 findings" in stdout


def test_convert_benchmark_runs(tmp_path):
    assert run_benchmark("benchmarks/convert.py", tmp_path).count("ratio") == 2


def test_merge_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/merge.py", "--tiny", "--no-peft", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ratio merge / read+write") == 2


def test_merge_video_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/merge_video.py", "--tiny", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ratio merge / copy" in result.stdout


def test_extract_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/extract.py", "--tiny", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("x the optimum") == 2
    assert "ratio extract / read both" in result.stdout


@pytest.mark.parametrize("command", ["inspect", "convert", "combine", "resize"])
def test_readme_examples_run(tmp_path, command):
    """The inspect, convert, combine and resize examples in README work as shown (run from a scratch
    dir against the fixtures)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(f"### `loratool {command}", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    for command in commands:
        args = command.split()[1:]
        args = [str(ROOT / a) if a.startswith("fixtures/") else a for a in args]
        result = subprocess.run(
            [sys.executable, "-m", "loratool.cli", *args], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (command, result.stderr)


COMMANDS = ("inspect", "convert", "merge", "combine", "extract", "resize")


def test_doc_examples_are_current():
    """Every `<!-- example -->` block in the docs is what its commands print today."""
    result = subprocess.run(
        [sys.executable, "docs/make_examples.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_make_examples_notices_a_stale_block(tmp_path, monkeypatch):
    """The check above can fail: a block whose output differs from what the command prints is
    rewritten (and so would be reported by --check)."""
    sys.path.insert(0, str(ROOT / "docs"))
    import make_examples

    stand_ins = tmp_path / "stand_ins"
    stand_ins.mkdir()
    page = "<!-- example -->\n```console\n$ loratool --version\nloratool, version 0.0.0\n```\n"
    rendered = make_examples.render_page("test.md", page, stand_ins)
    import loratool

    assert rendered != page
    assert f"$ loratool --version\nloratool, version {loratool.__version__}\n" in rendered
    assert make_examples.render_page("test.md", rendered, stand_ins) == rendered
    with pytest.raises(SystemExit, match="exited 2"):
        make_examples.render_page("test.md", page.replace("--version", "inspect missing.safetensors"), stand_ins)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_page_with_real_examples(command):
    page = (ROOT / "docs" / f"{command}.md").read_text(encoding="utf-8")
    assert page.startswith(f"# `loratool {command}`")
    blocks = page.split("<!-- example")[1:]
    assert blocks, f"docs/{command}.md has no generated example"
    assert any(f"$ loratool {command} " in block.split("```", 2)[1] for block in blocks)
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert f"({command}.md)" in index


def test_docs_index_links_every_page():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name}" in index, page.name
    assert "## Quickstart" in index and "<!-- example -->" in index


def test_cookbook_has_every_recipe():
    cookbook = (ROOT / "docs" / "cookbook.md").read_text(encoding="utf-8")
    titles = [line[3:] for line in cookbook.splitlines() if line.startswith("## ")]
    assert titles == [
        'My LoRA shows "lora key not loaded" in ComfyUI',
        "Turn a PEFT adapter into one file for ComfyUI or A1111",
        "Bake a LoRA into an SDXL checkpoint",
        "Extract a LoRA from a fine-tuned Llama",
        "Shrink a LoRA's rank",
    ]
    sections = cookbook.split("\n## ")[1:]
    assert all("<!-- example" in section for section in sections)


def test_shell_completion_is_documented():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for shell in ("bash", "zsh", "fish"):
        assert f"_LORATOOL_COMPLETE={shell}_source loratool" in index


def test_api_doc_names_every_public_name():
    import loratool

    doc = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in loratool.__all__:
        if name != "__version__":
            assert f"`{name}" in doc or f"loratool.{name}" in doc or f" {name}(" in doc, name


@pytest.fixture(scope="module")
def doc_workspace(tmp_path_factory):
    """A scratch dir like make_examples.py's: the fixtures and toy stand-in checkpoints."""
    sys.path.insert(0, str(ROOT / "docs"))
    import make_examples

    workspace = tmp_path_factory.mktemp("docs")
    make_examples.build_stand_ins(workspace)
    (workspace / "fixtures").symlink_to(ROOT / "fixtures")
    return workspace


def python_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]


@pytest.mark.parametrize("index", range(len(python_blocks("api.md"))))
def test_api_doc_python_runs(doc_workspace, index):
    code = python_blocks("api.md")[index]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=doc_workspace, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
