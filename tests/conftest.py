"""Test setup: an 8-device fake CPU mesh (set before JAX starts) and the golden fixtures."""

import os

# Must happen before anything initialises the JAX backend: sharding tests need 8 devices.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pathlib

import numpy as np
import pytest

_HERE = pathlib.Path(__file__).resolve().parent


def fixtures_path() -> pathlib.Path | None:
    """The golden fixtures: $VFM_ALIGN_FIXTURES, else ../shared/fixtures beside the checkout."""
    env = os.environ.get("VFM_ALIGN_FIXTURES")
    candidates = [pathlib.Path(env)] if env else []
    candidates += [_HERE.parent.parent / "shared" / "fixtures", _HERE.parent / "shared" / "fixtures"]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    path = fixtures_path()
    if path is None:
        pytest.skip("golden fixtures not found: set VFM_ALIGN_FIXTURES or place them at ../shared/fixtures")
    return path


@pytest.fixture(scope="session")
def golden(fixtures_dir):
    """golden('provicnet_t2') -> dict of arrays from that fixture's .npz."""
    cache = {}

    def _load(name: str) -> dict:
        if name not in cache:
            with np.load(fixtures_dir / f"{name}.npz", allow_pickle=False) as z:
                cache[name] = {k: z[k] for k in z.files}
        return cache[name]

    return _load
