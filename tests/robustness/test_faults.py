"""Faults around the output: bad destinations, a disk that fills up, a process that is killed.

Whatever happens, DEST is either absent or exactly what it was, inputs never change, and after a
failure the tool handled (error, Ctrl-C, SIGTERM) no temporary file is left next to DEST.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import Valid, valid_inputs

from loratool.cli import main
from loratool.io import writer as writer_module

ERROR_PREFIX = "loratool: error: "


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    return valid_inputs(tmp_path_factory.mktemp("valid"))


def commands(v: Valid, dest: Path) -> dict[str, list[str]]:
    """One working invocation of every writing command, into `dest`."""
    return {
        "convert": ["convert", str(v.lora), "--to", "diffusers", "-o", str(dest)],
        "merge": ["merge", str(v.base), str(v.lora), "-o", str(dest)],
        "combine": ["combine", str(v.lora), str(v.lora), "-w", "0.5", "-w", "0.25", "-o", str(dest)],
        "extract": ["extract", str(v.base), str(v.tuned), "--rank", "2", "-o", str(dest)],
        "resize": ["resize", str(v.lora), "--rank", "2", "-o", str(dest)],
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(result, pattern: str) -> None:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr
    assert pattern in lines[0], lines[0]
    assert "unexpected" not in lines[0] and "Traceback" not in result.output


def run(args: list[str]):
    return CliRunner().invoke(main, [*args, "--quiet"])


# -- destinations ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "victim"),
    [
        ("convert", "lora"),
        ("merge", "base"),
        ("merge", "lora"),
        ("combine", "lora"),
        ("extract", "base"),
        ("extract", "tuned"),
        ("resize", "lora"),
    ],
)
def test_output_path_equal_to_an_input_is_refused_even_with_force(valid, command, victim):
    target = getattr(valid, victim)
    before = digest(target)
    args = commands(valid, target)[command]
    result = run([*args, "--force"])
    assert result.exit_code == 2
    one_error_line(result, "is an input")
    assert digest(target) == before


@pytest.mark.parametrize("command", ["convert", "merge", "combine", "extract", "resize"])
def test_existing_output_without_force_is_left_alone(valid, tmp_path, command):
    dest = tmp_path / "taken.safetensors"
    dest.write_bytes(b"precious")
    result = run(commands(valid, dest)[command])
    assert result.exit_code == 2
    one_error_line(result, "exists (use --force")
    assert dest.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


@pytest.mark.parametrize("command", ["convert", "merge", "combine", "extract", "resize"])
def test_missing_output_directory(valid, tmp_path, command):
    result = run(commands(valid, tmp_path / "nowhere" / "out.safetensors")[command])
    assert result.exit_code == 2
    one_error_line(result, "output directory does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process may not create files in. root ignores permission bits, so there
    the test uses sysfs, which refuses new files to everyone; skipped where neither holds."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        yield locked
        locked.chmod(0o755)
        return
    locked.chmod(0o755)
    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except PermissionError:
        yield Path("/sys")
        return
    except OSError:
        pytest.skip("no directory refuses writes to this user")
    os.close(fd)
    os.unlink(name)
    pytest.skip("no directory refuses writes to this user")


@pytest.mark.parametrize("command", ["convert", "merge", "combine", "extract", "resize"])
def test_unwritable_output_directory(valid, unwritable_dir, command):
    before = sorted(p.name for p in unwritable_dir.iterdir())
    result = run(commands(valid, unwritable_dir / "loratool-out.safetensors")[command])
    assert result.exit_code == 2
    one_error_line(result, "cannot write here")
    assert sorted(p.name for p in unwritable_dir.iterdir()) == before


# -- a disk that fills up ----------------------------------------------------------------------------
class FillingDisk:
    """Files opened for writing share `budget` bytes; past it, writes fail with ENOSPC."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.failed = False

    def consume(self, n: int) -> None:
        if n > self.budget:
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n

    def wrap(self, fh):
        disk = self

        class Handle:
            def write(self, data):
                disk.consume(len(data))
                return fh.write(data)

            def __getattr__(self, name):
                return getattr(fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()

        return Handle()


@pytest.mark.parametrize("command", ["convert", "merge", "combine", "extract", "resize"])
@pytest.mark.parametrize("share", [0.0, 0.5, 0.95])
def test_disk_full_mid_write_keeps_the_previous_output(valid, tmp_path, monkeypatch, command, share):
    full = tmp_path / "full.safetensors"
    assert run(commands(valid, full)[command]).exit_code == 0
    size = full.stat().st_size
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "dest.safetensors"
    dest.write_bytes(b"the previous result")

    disk = FillingDisk(int(size * share))
    real_fdopen = os.fdopen
    monkeypatch.setattr(writer_module.os, "fdopen", lambda *a, **k: disk.wrap(real_fdopen(*a, **k)))

    real_copy = os.copy_file_range

    def kernel_copy(*args):
        disk.consume(args[2])
        return real_copy(*args)

    monkeypatch.setattr(writer_module.os, "copy_file_range", kernel_copy)
    result = run([*commands(valid, dest)[command], "--force"])
    monkeypatch.undo()
    assert disk.failed
    assert result.exit_code == 2, result.output
    one_error_line(result, "No space left on device")
    assert dest.read_bytes() == b"the previous result"
    assert sorted(p.name for p in out.iterdir()) == ["dest.safetensors"]


# -- killed while writing ----------------------------------------------------------------------------
# The real CLI in a child process, writing slowly once it has started, so a signal reliably lands
# mid-write; it creates `marker` when the first tensors are on disk.
SLOW_CLI = """
import sys, time, pathlib
from loratool.io import writer
marker = pathlib.Path(sys.argv.pop(1))
calls = 0
def slowed(method):
    def wrapper(self, *args, **kwargs):
        global calls
        method(self, *args, **kwargs)
        calls += 1
        if calls == 3:
            marker.write_text("writing")
        if calls >= 3:
            time.sleep(0.05)
    return wrapper
for name in ("write", "write_raw", "write_from"):
    setattr(writer.SafetensorsWriter, name, slowed(getattr(writer.SafetensorsWriter, name)))
from loratool.cli import main
main()
"""


def start_slow_merge(args: list[str], marker: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, str(marker), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(marker: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the merge never started writing"
        time.sleep(0.01)


def merge_cases(valid: Valid, out: Path) -> dict[str, tuple[list[str], Path]]:
    file_dest = out / "merged.safetensors"
    dir_dest = out / "merged_llama"
    return {
        "file": (["merge", str(valid.base), str(valid.lora), "-o", str(file_dest)], file_dest),
        "directory": (["merge", str(valid.llama_dir), str(valid.peft), "-o", str(dir_dest)], dir_dest),
    }


def tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": digest(path)}
    return {str(p.relative_to(path)): digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_mid_merge_leaves_dest_absent_or_intact(valid, tmp_path, kind, existing):
    out = tmp_path / "out"
    out.mkdir()
    args, dest = merge_cases(valid, out)[kind]
    if existing:
        assert run(args).exit_code == 0
        before = tree(dest)
        args = [*args, "--force", "-w", "0.5"]
    process = start_slow_merge([*args, "--quiet"], tmp_path / "marker")
    wait_for(tmp_path / "marker", process)
    process.kill()
    process.wait()
    if existing:
        assert tree(dest) == before
    else:
        assert not dest.exists()
    # Only hidden temporaries can be left (nothing catches SIGKILL); never a file under DEST's name.
    assert all(p.name.startswith(".") for p in out.iterdir() if p != dest)


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_sigterm_and_ctrl_c_mid_merge_clean_up(valid, tmp_path, kind, sig, code, said):
    out = tmp_path / "out"
    out.mkdir()
    args, dest = merge_cases(valid, out)[kind]
    assert run(args).exit_code == 0
    before = tree(dest)
    process = start_slow_merge([*args, "--force", "-w", "0.5", "--quiet"], tmp_path / "marker")
    wait_for(tmp_path / "marker", process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert stderr.splitlines() == [f"{ERROR_PREFIX}{said}" + (" (SIGTERM)" if sig == signal.SIGTERM else "")]
    assert tree(dest) == before
    assert sorted(p.name for p in out.iterdir()) == [dest.name]
