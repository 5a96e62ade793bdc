"""Shared pytest setup: offline libraries, and GPU tests skipped where there is no CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# fixtures/tiny_models.py: the narrow models with real module names that fixtures and tests share.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def sketch_every_module():
    """The tiny models' modules are small enough for extract to take the exact SVD by default
    (ops.svd.EXACT_BELOW); test modules that use this lower the bar so they check the randomized one."""
    from loratool.ops import svd

    patch = pytest.MonkeyPatch()
    patch.setattr(svd, "EXACT_BELOW", 0)
    yield
    patch.undo()
