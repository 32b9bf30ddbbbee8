"""One process of a multi-process training run on CPU, for tests/test_multihost.py.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR BACKBONE

With NUM_PROCESSES > 1 it joins the others through ``jax.distributed`` (a coordinator on
127.0.0.1:PORT); every process then loads only its rows of each global batch (``ArrayBatches``,
``process_rows``) and the jitted train step runs on the global ('data', 'fsdp') = (2, 2) mesh,
exactly as on a multi-host GPU or TPU slice. Process 0 writes the losses and the gathered weights.
"""

import json
import os
import sys

import numpy as np


def main():
    pid, nproc, port, out, backbone = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    import jax

    if nproc > 1:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except AttributeError:  # newer JAX: gloo is the default and the option is gone
            pass
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    from jax.experimental import multihost_utils

    sys.path.insert(0, os.path.dirname(__file__))
    from train_toy import make_task
    from vfm_align.data.tasks import get_task
    from vfm_align.train import mesh as M
    from vfm_align.train.data import ArrayBatches
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.recipes import base_config
    from vfm_align.train.state import create_state
    from vfm_align.train.step import jit_train_step, make_train_step, task_objective

    assert jax.device_count() == 4 and jax.process_count() == nproc, (jax.device_count(), jax.process_count())
    cfg = base_config(backbone, "segmentation", "tiny")
    cfg.optim.warmup_steps = 0
    data = make_task("segmentation", 16, seed=1)
    mesh = M.make_mesh(2, 2)
    kind, loss = get_task("segmentation").head, get_task("segmentation").loss
    gdef, _, state, sh, tx = create_state(lambda: build_task_model(cfg, data["image"].shape[1:]),
                                          lambda p: make_optimizer(cfg.optim, p, 10)[0], mesh, min_size=256)
    step = jit_train_step(make_train_step(gdef, task_objective(kind, loss), tx, seed=3), sh, mesh)
    batches = ArrayBatches(data, 8, seed=0)
    losses = []
    for i in range(2):
        local = batches.batch(i)
        assert len(local["image"]) == 8 // nproc  # this process's rows only
        state, m = step(state, M.global_batch(local, mesh))
        losses.append(float(m["loss"]))
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    if pid == 0:
        leaves = jax.tree.leaves(params)
        np.savez(os.path.join(out, "params.npz"), *[np.asarray(x) for x in leaves])
        with open(os.path.join(out, "losses.json"), "w") as fh:
            json.dump(losses, fh)
    jax.distributed.shutdown() if nproc > 1 else None


if __name__ == "__main__":
    main()
