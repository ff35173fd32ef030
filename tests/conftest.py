"""Shared test fixtures: paths to ../shared (CI has it, a user's clone does not), tiny models and
a handful of synthetic faces."""

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


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """10 synthetic faces: 6 in the train split, 4 in test (a module may define its own set)."""
    from cunet_optimize.data.synth import write_synthetic_faces

    root = tmp_path_factory.mktemp("faces") / "synth"
    write_synthetic_faces(root, 10, seed=5, test_fraction=0.4, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A checkpoint of the small face model at width 8 (random weights, seed 0)."""
    from cunet_optimize.models import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2), path)
    return path
