"""Loader throughput (cold and cached) and whether a jitted train step waits on the loader.

    python scripts/bench/bench_loader.py [--cases 48] [--shape 32,96,96] [--batch 2] [--threads 2] [--workers 0]

Prints, measured in one run:
  1. phantom generation time (not part of loading);
  2. cold: preprocessing into an empty cache + one pass of the loader, volumes/s;
  3. warm: one pass of the loader from the cache, with and without augmentation, volumes/s;
  4. a small 3-layer conv net's jitted train step (compile timed apart) fed (a) one synthetic batch
     already on device, (b) the loader (host batch -> device_put each step); the ratio b/a shows
     how much the step waits on the loader.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time



def _pass(loader, epoch=0):
    n, t0 = 0, time.perf_counter()
    for b in loader.epoch(epoch):
        n += len(b["case_id"])
    return n, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--shape", default="32,96,96")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="loader worker processes (0: threads only)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--task", default="segmentation")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))

    import jax

    from vfm_align.data.augment import AugmentConfig
    from vfm_align.data.cache import PreprocessCache, Recipe
    from vfm_align.data.cohort import read_manifest
    from vfm_align.data.loader import Loader
    from vfm_align.data.phantom import make_phantom
    from vfm_align.data.tasks import get_task

    print(f"jax {jax.__version__}, devices {jax.devices()}, cpus {os.cpu_count()} (shared machine: timings are noisy)")
    print(f"cases {args.cases}, shape {shape}, batch {args.batch}, loader threads {args.threads}, workers {args.workers}, task {args.task}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = make_phantom(os.path.join(tmp, "ph"), args.cases, shape=shape, seed=0, progress=False)
        print(f"phantom: {args.cases} cases in {time.perf_counter() - t0:.2f} s")
        cohort = read_manifest(manifest)
        cases = cohort.cases
        task = get_task(args.task)
        cache = PreprocessCache(os.path.join(tmp, "cache"), Recipe())

        def make(aug, train=True):
            return Loader(cases, cache, task, batch_size=args.batch, seed=0, train=train, augment_cfg=aug,
                          num_threads=args.threads, prefetch=4, workers=args.workers, process_index=0, process_count=1)

        # Cold: every case is read from NIfTI, reoriented, normalised and written to the cache on first touch.
        n, dt = _pass(make(None, train=False))
        cold = n / dt
        n, dt = _pass(make(None, train=False))
        warm = n / dt
        n, dt = _pass(make(AugmentConfig()), epoch=1)
        warm_aug = n / dt
        print(f"{'loader pass':<34}{'volumes/s':>10}")
        print(f"{'cold (NIfTI -> cache -> batch)':<34}{cold:>10.1f}")
        print(f"{'warm from cache, no augmentation':<34}{warm:>10.1f}   x{warm / cold:.1f} vs cold")
        print(f"{'warm from cache, augmented':<34}{warm_aug:>10.1f}")

        import optax
        from flax import nnx

        class TinyNet(nnx.Module):
            """Patchify (4^3, stride 4) -> 3^3 conv -> 1^3 conv to 4^3 x classes -> unpatchify (cheap on CPU)."""

            def __init__(self, cin, cout, *, rngs):
                self.cout = cout
                self.stem = nnx.Conv(cin, 16, (4, 4, 4), strides=(4, 4, 4), padding="VALID", rngs=rngs)
                self.mid = nnx.Conv(16, 16, (3, 3, 3), rngs=rngs)
                self.head = nnx.Conv(16, 64 * cout, (1, 1, 1), rngs=rngs)

            def __call__(self, x):
                h = self.head(nnx.gelu(self.mid(nnx.gelu(self.stem(x), approximate=False)), approximate=False))
                b, d, hh, w, _ = h.shape
                h = h.reshape(b, d, hh, w, 4, 4, 4, self.cout).transpose(0, 1, 4, 2, 5, 3, 6, 7)
                return h.reshape(b, 4 * d, 4 * hh, 4 * w, self.cout)

        model = TinyNet(3, task.num_outputs, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))

        def step(state, image, target):
            m, o = nnx.merge(graphdef, state)

            def loss_fn(m):
                logits = m(image)
                onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
                return -(onehot * jax.nn.log_softmax(logits)).sum(-1).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(m)
            o.update(m, grads)
            return nnx.state((m, o)), loss

        jstep = jax.jit(step, donate_argnums=0)
        first = next(make(AugmentConfig()).epoch(0))
        img = jax.device_put(first["image"])
        tgt = jax.device_put(first["target"])
        t0 = time.perf_counter()
        compiled = jstep.lower(state, img, tgt).compile()
        print(f"train step compile: {time.perf_counter() - t0:.2f} s")
        for _ in range(2):
            state, loss = compiled(state, img, tgt)
        jax.block_until_ready(loss)
        synth = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, loss = compiled(state, img, tgt)
            jax.block_until_ready(loss)
            synth.append(time.perf_counter() - t0)
        fed = []
        it = make(AugmentConfig()).epoch(2)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                it = make(AugmentConfig()).epoch(3)
                b = next(it)
            state, loss = compiled(state, jax.device_put(b["image"]), jax.device_put(b["target"]))
            jax.block_until_ready(loss)
            fed.append(time.perf_counter() - t0)
        ms, mf = statistics.median(synth), statistics.median(fed)
        print(f"{'train step (median of ' + str(args.steps) + ')':<34}{'s/step':>10}")
        print(f"{'synthetic batch on device':<34}{ms:>10.3f}")
        print(f"{'fed by the loader (augmented)':<34}{mf:>10.3f}   x{mf / ms:.2f} of synthetic")
        print("the step waits on the loader" if mf > 1.15 * ms else "the loader keeps up with the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
