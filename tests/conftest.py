"""Shared test fixtures: paths to ../shared (CI has it, a user's clone does not) and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
AUTHORS_FIXTURE = SHARED / "fixtures" / "cunet-original"

torch.set_num_threads(1)  # the CI machine has 2 cores; tests stay deterministic and light


def tiny_config(**overrides):
    from cunet_optimize.models import CUNetConfig

    fields = dict(num_unets=2, order=1, num_classes=4, width=8, growth_rate=4, neck_size=2)
    fields.update(overrides)
    return CUNetConfig(**fields)


@pytest.fixture
def authors_fixture() -> Path:
    if not AUTHORS_FIXTURE.is_dir():
        pytest.skip(f"needs the authors' checkpoint fixture in {AUTHORS_FIXTURE} (../shared is only in CI and dev checkouts)")
    return AUTHORS_FIXTURE
