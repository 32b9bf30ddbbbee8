"""Test setup: an 8-device fake CPU mesh (set before JAX starts), the golden fixtures and the parity check."""

import os

# Must happen before anything initialises the JAX backend: sharding tests need 8 devices.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pathlib

import numpy as np
import pytest

_HERE = pathlib.Path(__file__).resolve().parent


def fixtures_path() -> pathlib.Path:
    """The golden fixtures: tests/golden in the repository, or $VFM_ALIGN_FIXTURES to test against another set."""
    env = os.environ.get("VFM_ALIGN_FIXTURES")
    return pathlib.Path(env) if env else _HERE / "golden"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    # The fixtures are part of the repository: a missing one is an error, never a skip, so that a run
    # without them cannot pass as a parity check.
    path = fixtures_path()
    if not (path / "README.md").is_file():
        pytest.fail(f"golden fixtures not found in {path} (tests/golden is part of the repository)", pytrace=False)
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


# Every parity comparison made in this session: (test id, output, max abs error, max |reference|, allowed ratio).
_PARITY_LOG: list[tuple[str, str, float, float, float]] = []


def pytest_addoption(parser):
    parser.addoption("--parity-report", action="store_true",
                     help="print the measured error of every parity comparison (to re-derive tolerances on this CPU)")


# The parity bound against the PyTorch goldens, as a fraction of the reference's largest magnitude. Measured on a
# 2-core AVX-512 Xeon (jax 0.10.2): at most 1.6e-6 over every golden output (tests/golden/PROVENANCE.md); the
# bound leaves 6x for CPUs whose float32 reductions round differently (AVX2). The README states this number.
GOLDEN_REL = 1e-5


@pytest.fixture
def parity(request):
    """parity(got, want, what, rel=GOLDEN_REL): max |got - want| <= rel * max |want|.

    The bound scales with the reference's magnitude: float32 rounding differences (thread count, SIMD width,
    reduction order) grow with the size of the numbers, so one relative bound holds for logits and losses alike.
    """

    def check(got, want, what: str, rel: float = GOLDEN_REL) -> float:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
        _PARITY_LOG.append((request.node.nodeid, what, err, scale, rel))
        assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x max |reference| {scale:.3g}"
        return err

    return check


def pytest_terminal_summary(terminalreporter, config):
    if not config.getoption("--parity-report") or not _PARITY_LOG:
        return
    tr = terminalreporter
    tr.section("parity: max abs error / max |reference| (bound = allowed ratio)")
    for nodeid, what, err, scale, rel in _PARITY_LOG:
        ratio = err / scale if scale else float("inf")
        name = nodeid.split("::")[-1]
        tr.write_line(f"{ratio:9.2e}  bound {rel:7.1e}  abs {err:9.2e}  scale {scale:8.3g}  {name}: {what}")


def pytest_collection_modifyitems(config, items):
    """The slow tier: every test marked ``slow`` is skipped unless VFM_ALIGN_SLOW=1 (run it with ``-m slow``)."""
    if os.environ.get("VFM_ALIGN_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow tier; set VFM_ALIGN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
