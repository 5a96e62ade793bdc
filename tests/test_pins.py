"""The test stack is pinned: README installs through constraints.txt, so a release on the registry
cannot change what the suite runs against until the pins are moved (scripts/update-pins)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;#]+)$")


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in found, f"constraints.txt pins {name} twice"
        found[name] = match[2]
    return found


def declared() -> list[Requirement]:
    lines = PYPROJECT["project"]["dependencies"] + [r for extra in EXTRAS.values() for r in extra]
    return [Requirement(line) for line in lines]


def test_every_declared_requirement_has_an_exact_pin_it_admits() -> None:
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is required but constraints.txt does not pin it"
        assert req.specifier.contains(Version(pinned[name]), prereleases=True), f"{req} excludes the pin"


def test_readme_installs_through_the_pins() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme.split("<!-- ci:install -->", 1)[1].split("```", 2)[1]
    assert "-c constraints.txt" in install


def test_the_installed_stack_is_the_pinned_one() -> None:
    """The suite runs on the versions the tables and fixtures were generated with, or says so."""
    pinned = pins()
    off = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pinned and Version(dist.version).public != Version(pinned[name]).public:
            off[name] = f"installed {dist.version}, pinned {pinned[name]}"
    assert not off, f"reinstall with README's first command, or move the pins with scripts/update-pins: {off}"
