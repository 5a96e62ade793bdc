"""Every command behaves as golden.json recorded: the same exit codes, reports, error lines and
output bytes over the golden corpus (golden_cases.py). It holds the code to its behaviour while the
code is reshaped; `python tests/golden/record.py` rerecords it when a change of behaviour is meant."""

from __future__ import annotations

import json

import pytest
from golden_cases import GOLDEN, run_all

RECORDED = json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> dict:
    return run_all(tmp_path_factory.mktemp("golden"))


def test_the_inputs_are_the_recorded_ones(replayed: dict) -> None:
    """A different input would make every comparison below meaningless: say so first."""
    changed = sorted(
        k
        for k in RECORDED["inputs"].keys() | replayed["inputs"].keys()
        if RECORDED["inputs"].get(k) != replayed["inputs"].get(k)
    )
    assert not changed, f"generated inputs differ from the recorded ones: {changed}"


def test_the_same_cases_ran(replayed: dict) -> None:
    assert sorted(replayed["cases"]) == sorted(RECORDED["cases"])


def _differences(want: dict, got: dict, at: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in sorted(want.keys() | got.keys(), key=str):
            if key not in got:
                out.append(f"{at}/{key}: recorded, now missing")
            elif key not in want:
                out.append(f"{at}/{key}: new, now {json.dumps(got[key])[:200]}")
            else:
                out += _differences(want[key], got[key], f"{at}/{key}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got, strict=True)) for d in _differences(w, g, f"{at}[{i}]")]
    return [] if want == got else [f"{at}: recorded {json.dumps(want)[:200]}, now {json.dumps(got)[:200]}"]


@pytest.mark.parametrize("name", sorted(RECORDED["cases"]))
def test_case_behaves_as_recorded(name: str, replayed: dict) -> None:
    found = _differences(RECORDED["cases"][name], replayed["cases"].get(name, {}))
    assert not found, "\n".join(found[:20])


def test_a_changed_behaviour_is_seen() -> None:
    """The comparison is not vacuous: another byte, exit code or report value is named."""
    case = next(v for v in RECORDED["cases"].values() if v.get("files") and v["exit"] == 0)
    tampered = json.loads(json.dumps(case))
    name = next(iter(tampered["files"]))
    tampered["files"][name] = "0" * 64
    tampered["exit"] = 1
    found = _differences(case, tampered)
    assert len(found) == 2 and any("/exit" in f for f in found) and any("/files/" in f for f in found)
    report = next(v for v in RECORDED["cases"].values() if "report" in v and v["report"].get("modules"))
    changed = json.loads(json.dumps(report))
    changed["report"]["modules"][0]["rank"] = -1
    assert _differences(report, changed) == [
        f"/report/modules[0]/rank: recorded {report['report']['modules'][0]['rank']}, now -1"
    ]
