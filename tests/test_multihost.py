"""Multi-process (multi-host) training on CPU: two processes joined by jax.distributed, each loading
only its share of every batch, train exactly like one process driving the same (2, 2) mesh."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    # The worker runs as a script: put this checkout first, so it trains this package, not another installed copy.
    root = os.path.dirname(os.path.dirname(os.path.abspath(WORKER)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _wait(procs, timeout=600):
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a training process did not finish within the time limit")
        outs.append(out.decode(errors="replace"))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _result(d):
    with open(os.path.join(d, "losses.json")) as fh:
        losses = json.load(fh)
    with np.load(os.path.join(d, "params.npz")) as z:
        params = [z[f"arr_{i}"] for i in range(len(z.files))]
    return losses, params


def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "0", "1", "0", str(one), "provicnet"], env=_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    procs += [subprocess.Popen([sys.executable, WORKER, str(i), "2", str(port), str(two), "provicnet"], env=_env(2),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    _wait(procs)
    ref_losses, ref_params = _result(one)
    losses, params = _result(two)
    assert ref_losses[1] != ref_losses[0]  # the weights really changed between the steps
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert len(params) == len(ref_params)
    for a, b in zip(params, ref_params):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
