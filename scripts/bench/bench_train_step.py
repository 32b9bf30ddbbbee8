"""Train-step time and throughput for each backbone's recipe, the in-loop alignment overhead, and (``--torch``)
the same optimisation step in PyTorch on the same weights.

    python scripts/bench/bench_train_step.py [--variant tiny|default] [--task segmentation] [--reps 10]
    python scripts/bench/bench_train_step.py --variant default --torch [--backbones profound_conv]
        [--batch 1] [--shape 16,64,64] [--remat] [--compute-dtype bfloat16] [--profile]
    python scripts/bench/bench_train_step.py --fsdp-report [--variant tiny]

Without ``--torch``: for every backbone, compile time of the jitted, donated train step (AOT, apart),
median and IQR of the step time over --reps calls (each ending in block_until_ready), images/s, and
the time of one alignment-monitor call (features on the probe set + RFF MMD^2, CKA, drift); the
overhead is that time divided by (align.every x step time), as the loop runs it.

``--torch``: one full optimisation step of the recipe (forward, task loss, backward, global-norm
clipping, AdamW with the recipe's layer decay and backbone lr multiplier) in this project and in a
PyTorch twin holding the same weights (``torch_twins.py`` for the backbones, the dense head and the
Dice+CE loss written out below), same batch. Each framework runs in its own child process, one after
the other, so its peak resident memory (ru_maxrss) is its own. Before timing, agreement is checked on
the first step: the loss, and the weights after the update (max over tensors of max|w_jax - w_torch| /
max|w|; the update itself likewise, relative to the largest update). For that check both run warmup 0,
i.e. the recipe's peak lr from the first step (at warmup step 0 the scheduled lr is 0 and nothing
moves), and without the random flip (the same batch on both sides). Compile time is apart; step times
are medians over --reps steps after a warm-up step. ``--profile``: the top XLA ops of the JAX step by
time (a jax.profiler trace of one step, summed by op name).

``--fsdp-report``: per-device bytes of parameters and optimizer state with fsdp=1 and fsdp=8 on the fake
8-device CPU mesh, read from the arrays' own shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BACKBONES = ("profound_conv", "profound_mae", "provicnet")
# Released input sizes: ProFound's 64x224x224 volumes; MAE-ViT-B pretrained at 64x256x256; ProViCNet cuts
# the recipe's 64x224x224 volume into 64 2.5D slices, each resized to 448x448 (model.slice_size).
RELEASED_SHAPES = {"profound_conv": (64, 224, 224), "profound_mae": (64, 256, 256), "provicnet": (64, 224, 224)}


def _cfg(backbone, task, variant, *, batch=None, shape=None, remat=False, compute_dtype="float32"):
    from vfm_align.train.recipes import recipe_config

    cfg = recipe_config(backbone, task, variant)
    if batch:
        cfg.train.batch_size = batch
    if shape:
        cfg.data.shape = tuple(shape)
    cfg.train.remat = remat
    cfg.train.compute_dtype = compute_dtype
    return cfg


def bench(backbone, task, variant, reps, **over):
    import jax

    from vfm_align.data.tasks import get_task
    from vfm_align.train import mesh as M
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.monitor import AlignmentMonitor
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.state import create_state
    from vfm_align.train.step import jit_train_step, make_feature_step, make_train_step, task_objective

    cfg = _cfg(backbone, task, variant, **over)
    kind, loss = get_task(task).head, get_task(task).loss
    shape = tuple(cfg.data.shape) + (3,)
    b = int(cfg.train.batch_size)
    mesh = M.make_mesh(-1, 1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, *shape)).astype(np.float32)
    if kind == "label":
        y = rng.integers(0, 2, b).astype(np.int32)
    elif kind == "dense":
        y = rng.integers(0, 2, (b, *shape[:3])).astype(np.int32)
    else:
        y = x.copy()
    gdef, gdef_eval, state, sh, tx = create_state(lambda: build_task_model(cfg, shape),
                                                  lambda p: make_optimizer(cfg.optim, p, 1000)[0], mesh,
                                                  min_size=int(cfg.mesh.fsdp_min_size))
    dtype = jax.numpy.dtype(cfg.train.compute_dtype)
    step = jit_train_step(make_train_step(gdef, task_objective(kind, loss, compute_dtype=dtype), tx, seed=0,
                                          compute_dtype=dtype), sh, mesh)
    batch = M.global_batch({"image": x, "target": y}, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    q1, q3 = np.percentile(times, [25, 75])

    a = cfg.align
    probe = M.global_batch({"x": rng.normal(size=(int(a.probe_cases), *shape)).astype(np.float32)}, mesh)["x"]
    mon = AlignmentMonitor(make_feature_step(gdef_eval, sh, mesh, tuple(a.sites)), probe, a.sites,
                           num_features=int(a.num_features), max_rows=int(a.max_rows))
    mon.bank(state)
    mon(state)  # compile
    at = []
    for _ in range(reps):
        t = time.perf_counter()
        mon(state)
        at.append(time.perf_counter() - t)
    t_align = float(np.median(at))
    return dict(backbone=backbone, compile=t_compile, step=med, iqr=(q3 - q1), img_s=b / med, align=t_align,
                every=int(a.every), overhead=t_align / (int(a.every) * med))


# ---------------------------------------------------------------------------------------------------------
# --torch: the weights in the twin's key space, their JAX form, and the two children.


def _flat(tree) -> dict[str, np.ndarray]:
    """A pure-dict tree as {'a/b/0/kernel': array}."""
    import jax

    from vfm_align.train.optim import path_str

    return {"/".join(path_str(p)): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: dict) -> dict:
    """{'a/0/b': v} -> {'a': {0: {'b': v}}} (digit keys as ints, as NNX pure dicts index lists)."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def init_weights(backbone, shape) -> dict[str, np.ndarray]:
    """Random backbone weights in the twin's key space (ConvNeXt: NNX paths; the ViTs: reference torch keys)."""
    import torch_twins as tw

    if backbone == "profound_conv":
        from flax import nnx

        from vfm_align.models.registry import build_model

        return _flat(nnx.to_pure_dict(nnx.state(build_model("profound_conv", {}, rngs=nnx.Rngs(0)), nnx.Param)))
    if backbone == "profound_mae":
        return tw.random_state_dict(img=shape)
    net = tw.torch_provicnet(12)
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def to_jax(backbone, sd):
    """(NNX backbone holding ``sd``, its config for the recipe's model.config) through the project's converters."""
    import dataclasses

    if backbone == "profound_conv":
        from flax import nnx

        from vfm_align.models.registry import build_model

        model = build_model("profound_conv", {}, rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        pure = nnx.to_pure_dict(state)
        nnx.replace_by_pure_dict(state, _nest({k: sd[k] for k in _flat(pure)}))
        nnx.update(model, state)
        return model, {}
    if backbone == "profound_mae":
        import converters.profound_mae as pm

        model, info = pm.convert(sd, {}, pm.ARCH, "<random mae_vit_base_patch16>")
    else:
        from converters import convert_state_dict

        model, info = convert_state_dict(sd, num_heads=6)
    return model, dataclasses.asdict(info["config"])


def twin_groups(backbone, sd, cfg, shape):
    """{twin key: [lr scale, weight decay]} for every weight the JAX optimizer trains, from its labels.

    The backbone's twin keys are matched to the JAX leaves by converting a probe state dict whose every
    tensor holds its own index (the converters only reshape, split and resample, so the index survives).
    """
    from flax import nnx

    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import param_labels

    abstract = nnx.eval_shape(lambda: build_task_model(cfg, shape + (3,)))
    labels, scales = param_labels(nnx.state(abstract, nnx.Param), freeze_backbone=False,
                                  layer_decay=float(cfg.optim.layer_decay),
                                  backbone_lr_mult=float(cfg.optim.backbone_lr_mult))
    flat_labels = {"/".join(k): v for k, v in _label_items(labels)}
    keys = sorted(k for k, v in sd.items() if np.issubdtype(np.asarray(v).dtype, np.floating))
    if backbone == "profound_conv":
        source = {"backbone/" + k: k for k in keys}
    else:
        probe = {k: np.full(np.shape(v), i + 1, np.float32) for i, (k, v) in enumerate(sorted(sd.items()))}
        names = sorted(sd)
        model, _ = to_jax(backbone, probe)
        source = {}
        for k, v in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
            idx = np.unique(np.round(v))
            if idx.size != 1 or not np.allclose(v, idx[0], atol=1e-3):
                raise SystemExit(f"cannot match JAX weight backbone/{k} to one twin tensor (values {idx[:4]})")
            source["backbone/" + k] = names[int(idx[0]) - 1]
    groups = {}
    wd = float(cfg.optim.weight_decay)
    for path, label in flat_labels.items():
        key = source.get(path, path) if path.startswith("backbone/") else path
        if path.startswith("backbone/") and path not in source:
            raise SystemExit(f"JAX weight {path} has no twin tensor")
        g = [scales[label], wd if label.endswith("/decay") else 0.0]
        if groups.setdefault(key, g) != g:
            raise SystemExit(f"twin tensor {key} feeds JAX weights of different lr groups")
    return groups


def _label_items(labels):
    import jax

    from vfm_align.train.optim import path_str

    out = []
    for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]:
        path = path_str(p)
        out.append((path[:-1] if path[-1] == "value" else path, v))  # a Variable's value, as in a pure dict
    return out


def make_batch(cfg, shape):
    from vfm_align.data.tasks import get_task

    rng = np.random.default_rng(0)
    b = int(cfg.train.batch_size)
    x = rng.normal(size=(b, *shape, 3)).astype(np.float32)
    y = rng.integers(0, get_task(cfg.task.name).num_outputs, (b, *shape)).astype(np.int32)
    return x, y


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_jax(spec):
    import jax

    from vfm_align.data.tasks import get_task
    from vfm_align.train import mesh as M
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.state import create_state
    from vfm_align.train.step import jit_train_step, make_train_step, task_objective

    cfg = _child_cfg(spec)
    shape = tuple(spec["shape"])
    task = get_task(cfg.task.name)
    with np.load(spec["init"]) as z:
        backbone, _ = to_jax(spec["backbone"], {k: z[k] for k in z.files})
    mesh = M.make_mesh(-1, 1)
    gdef, _, state, sh, tx = create_state(lambda: build_task_model(cfg, shape + (3,)),
                                          lambda p: make_optimizer(cfg.optim, p, 1000)[0], mesh,
                                          min_size=int(cfg.mesh.fsdp_min_size), backbone=backbone)
    del backbone
    from flax import nnx

    head = _flat(nnx.to_pure_dict(jax.device_get(state["params"]["head"])))
    np.savez(spec["head"], **{"head/" + k: v for k, v in head.items()})
    dtype = jax.numpy.dtype(cfg.train.compute_dtype)
    step = jit_train_step(make_train_step(gdef, task_objective(task.head, task.loss, augment=False,
                                                               compute_dtype=dtype), tx, seed=0,
                                          compute_dtype=dtype), sh, mesh)
    x, y = make_batch(cfg, shape)
    batch = M.global_batch({"image": x, "target": y}, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t
    state, m = compiled(state, batch)
    loss0 = float(m["loss"])
    np.savez(spec["updated"], **_flat(nnx.to_pure_dict(jax.device_get(state["params"]))))
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(spec["reps"]):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    out = dict(loss=loss0, compile=t_compile, times=times, rss=peak_rss())
    if spec.get("profile"):
        out["profile"] = profile_step(compiled, state, batch, spec["profile"])
    return out


def profile_step(compiled, state, batch, trace_dir, top=12):
    """[(op name, ms, share)] of one step, from a jax.profiler trace: XLA op events summed by name."""
    import glob

    import jax

    jax.profiler.start_trace(trace_dir)
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    totals: dict[str, float] = {}
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for ev in line.events:
                md = {k: v for k, v in ev.stats}
                if "hlo_op" in md or "hlo_module" in md:
                    name = str(md.get("hlo_op", ev.name))
                    totals[name] = totals.get(name, 0.0) + ev.duration_ns / 1e6
    total = sum(totals.values()) or 1.0
    # Each op named with the JAX operation it came from (the HLO's op_name metadata, last path parts).
    import re

    origin = {}
    for line in compiled.as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', line)
        if m:
            origin.setdefault(m.group(1), "/".join(m.group(2).split("/")[-3:]))
    return [(f"{k}  [{origin.get(k, '?')}]", v, v / total)
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]


def _child_cfg(spec):
    cfg = _cfg(spec["backbone"], spec["task"], "default", batch=spec["batch"], shape=spec["shape"],
               remat=spec["remat"], compute_dtype=spec["dtype"])
    cfg.model.config = spec["model_config"]
    cfg.optim.warmup_steps = 0  # the peak lr from the first step (see the module docstring)
    cfg.train.augment = False
    return cfg


def _window_index(depth, window):
    half = window // 2
    start = np.clip(np.arange(depth) - half, 0, depth - window)
    return start[:, None] + np.arange(window)[None, :]


def child_torch(spec):
    import torch
    import torch.nn.functional as F
    import torch_twins as tw

    from vfm_align.models.convnext3d import ConvNeXt3DConfig

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = _child_cfg(spec)
    bb = spec["backbone"]
    d, h, w = spec["shape"]
    groups = spec["groups"]
    with np.load(spec["init"]) as z:
        sd = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    with np.load(spec["head"]) as z:
        head = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    for k, v in list(sd.items()) + list(head.items()):
        v.requires_grad_(k in groups)
    if bb == "profound_conv":
        net = tw.torch_convnext(_nest(sd), ConvNeXt3DConfig())

        def fmap(x):
            return net.stage_maps(x, upto=0)[-1]
    elif bb == "profound_mae":
        enc = tw.torch_encoder(sd)
        grid = (d // tw.PATCH[0], h // tw.PATCH[1], w // tw.PATCH[2])

        def fmap(x):
            t = enc(x)[:, 1:]
            return t.reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 4, 1, 2, 3)
    else:
        net = tw.torch_provicnet(12)
        with torch.no_grad():
            net.load_state_dict(sd)
        sd = dict(net.state_dict(keep_vars=True))
        for k, v in sd.items():
            if v.dtype.is_floating_point:
                v.requires_grad_(k in groups)
        g = int(cfg.model.slice_size) // 14

        def fmap(s, pos):
            t = net.tokens(s, pos)[:, 7:]
            return t.transpose(1, 2).reshape(t.shape[0], -1, g, g)
    params = [t for k, t in list(sd.items()) + list(head.items()) if k in groups]
    by = {}
    for k, t in list(sd.items()) + list(head.items()):
        if k in groups:
            by.setdefault(tuple(groups[k]), []).append(t)
    lr = float(cfg.optim.lr)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr * sc, "weight_decay": wd} for (sc, wd), ps in by.items()],
                            lr=lr, betas=(float(cfg.optim.b1), float(cfg.optim.b2)), eps=float(cfg.optim.eps))
    x, y = make_batch(cfg, (d, h, w))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    ndim = 3 if bb != "provicnet" else 2

    def conv(name, v, pad):
        k = head[f"head/{name}/kernel"]
        k = k.permute(4, 3, 0, 1, 2) if ndim == 3 else k.permute(3, 2, 0, 1)
        return (F.conv3d if ndim == 3 else F.conv2d)(v, k, head[f"head/{name}/bias"], padding=pad)

    def decoder(f, skip):  # RestorationDecoder, dense (residual=False)
        f = F.gelu(conv("proj", f, 0))
        f = F.interpolate(f, size=skip.shape[2:], mode="trilinear" if ndim == 3 else "bilinear",
                          align_corners=False)
        hh = F.gelu(conv("fuse1", torch.cat([f, skip], 1), 1))
        return conv("out", F.gelu(conv("fuse2", hh, 1)), 0)

    def dice_ce(logits, labels):  # vfm_align.train.losses.dice_ce: MONAI DiceCE, background out of the Dice
        k = logits.shape[1]
        probs = torch.softmax(logits, 1)[:, 1:]
        onehot = F.one_hot(labels, k).movedim(-1, 1)[:, 1:].float()
        axes = tuple(range(2, logits.ndim))
        inter = (probs * onehot).sum(axes)
        denom = probs.sum(axes) + onehot.sum(axes)
        return (1.0 - (2.0 * inter + 1e-5) / (denom + 1e-5)).mean() + F.cross_entropy(logits, labels)

    def loss_fn():
        if ndim == 3:
            xcf = xt.permute(0, 4, 1, 2, 3).contiguous()
            out = decoder(fmap(xcf), xcf)
        else:  # vfm_align.models.task_model.volume_to_slices, then the head on each slice
            n, s = xt.shape[0], int(cfg.model.slice_size)
            v = xt[..., int(cfg.model.slice_channel)]
            sl = v[:, torch.from_numpy(_window_index(d, int(cfg.model.slice_window)))].reshape(n * d, -1, h, w)
            sl = F.interpolate(sl, size=(s, s), mode="bilinear", align_corners=False)
            j = torch.arange(d, dtype=torch.float32).repeat(n)
            pos = torch.stack([j, torch.full_like(j, d)], -1)
            skip = xt.reshape(n * d, h, w, -1).permute(0, 3, 1, 2)
            out = decoder(fmap(sl, pos), skip)
            out = out.reshape(n, d, -1, h, w).transpose(1, 2)
        return dice_ce(out, yt)

    clip = float(cfg.optim.clip_norm)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        for p in params:  # weights the loss does not reach still decay, as in the JAX step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return float(loss.detach())

    loss0 = step()
    upd = {k: t.detach().numpy().copy() for k, t in list(sd.items()) + list(head.items())}
    np.savez(spec["updated"], **upd)
    del upd
    step()  # warm-up
    times = []
    for _ in range(spec["reps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return dict(loss=loss0, times=times, rss=peak_rss(), torch=torch.__version__, threads=torch.get_num_threads())


def run_child(framework, spec, tmp):
    path = os.path.join(tmp, f"{framework}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", framework, path], env=env)
    if r.returncode:
        raise SystemExit(f"the {framework} child failed (exit {r.returncode}); see its output above")
    with open(path + ".out") as f:
        return json.load(f)


def agreement(backbone, jax_path, torch_path, init):
    """(max relative weight error, max relative update error) between the two updated weight sets."""
    from flax import nnx

    with np.load(jax_path) as z:
        wj = {k: z[k] for k in z.files}
    with np.load(torch_path) as z:
        tw_ = {k: z[k] for k in z.files}
    model, _ = to_jax(backbone, {k: v for k, v in tw_.items() if not k.startswith("head/")})
    wt = {"backbone/" + k: v for k, v in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    wt.update({k: v for k, v in tw_.items() if k.startswith("head/")})
    model, _ = to_jax(backbone, init)
    w0 = {"backbone/" + k: v for k, v in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    w_err = u_err = u_max = 0.0
    for k, a in wj.items():
        b = wt[k]
        w_err = max(w_err, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
        if k in w0:
            du = np.abs((a - w0[k]) - (b - w0[k])).max()
            u_err, u_max = max(u_err, float(du)), max(u_max, float(np.abs(a - w0[k]).max()))
    return w_err, u_err / max(u_max, 1e-30)


def bench_torch(backbone, task, args):
    shape = tuple(args.shape) if args.shape else RELEASED_SHAPES[backbone]
    batch = args.batch or 1
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        sd = init_weights(backbone, shape)
        _, model_config = to_jax(backbone, sd)
        cfg = _cfg(backbone, task, "default", batch=batch, shape=shape)
        cfg.model.config = model_config
        groups = twin_groups(backbone, sd, cfg, shape)
        init = os.path.join(tmp, "init.npz")
        np.savez(init, **sd)
        spec = dict(backbone=backbone, task=task, shape=shape, batch=batch, reps=args.reps, remat=args.remat,
                    dtype=args.compute_dtype, model_config=model_config, init=init, groups=groups,
                    head=os.path.join(tmp, "head.npz"),
                    profile=os.path.join(tmp, "trace") if args.profile else "")
        rj = run_child("jax", dict(spec, updated=os.path.join(tmp, "jax_updated.npz")), tmp)
        if args.jax_only:
            return dict(shape=shape, batch=batch, jax=rj)
        rt = run_child("torch", dict(spec, updated=os.path.join(tmp, "torch_updated.npz")), tmp)
        w_err, u_err = agreement(backbone, os.path.join(tmp, "jax_updated.npz"),
                                 os.path.join(tmp, "torch_updated.npz"), sd)
    return dict(shape=shape, batch=batch, jax=rj, torch=rt, w_err=w_err, u_err=u_err,
                loss_err=abs(rj["loss"] - rt["loss"]) / abs(rt["loss"]))


def fsdp_report(backbones, task, variant):
    """Per-device parameter and optimizer-state bytes, fsdp=1 vs fsdp=8, from the arrays' shards."""
    import jax

    from vfm_align.train import mesh as M
    from vfm_align.train.loop import build_task_model
    from vfm_align.train.optim import make_optimizer
    from vfm_align.train.state import create_state

    if jax.device_count() < 8:
        raise SystemExit("--fsdp-report needs 8 devices (it sets the fake CPU devices itself when run directly)")
    print(f"{'backbone':<15}{'fsdp':>5}{'params MB/dev':>15}{'opt MB/dev':>12}{'total MB/dev':>14}")
    for bb in backbones:
        cfg = _cfg(bb, task, variant, shape=RELEASED_SHAPES[bb] if variant == "default" else None)
        shape = tuple(cfg.data.shape) + (3,)
        for fsdp in (1, 8):
            mesh = M.make_mesh(1, fsdp, devices=jax.devices()[:fsdp])
            _, _, state, _, _ = create_state(lambda c=cfg, s=shape: build_task_model(c, s),
                                             lambda p, c=cfg: make_optimizer(c.optim, p, 1000, flat=False)[0],
                                             mesh, min_size=int(cfg.mesh.fsdp_min_size))
            dev = mesh.devices.flat[0]
            got = [sum(s.data.nbytes for a in jax.tree.leaves(state[k]) for s in a.addressable_shards
                       if s.device == dev) / 2**20 for k in ("params", "opt")]
            print(f"{bb:<15}{fsdp:>5}{got[0]:>15.1f}{got[1]:>12.1f}{sum(got):>14.1f}", flush=True)
            del state


def _print_profile(r):
    if r.get("profile"):
        print("  top XLA ops of one JAX step (CPU time summed by op; share of all op time):")
    for name, ms, share in r.get("profile", []):
        print(f"    {ms:9.1f} ms {share * 100:5.1f}%  {name}")


def _fmt_mem(b):
    return f"{b / 2**30:.2f} GiB"


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        with open(sys.argv[3]) as f:
            spec = json.load(f)
        out = (child_jax if sys.argv[2] == "jax" else child_torch)(spec)
        with open(sys.argv[3] + ".out", "w") as f:
            json.dump(out, f)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="tiny", choices=("tiny", "default"))
    ap.add_argument("--task", default="segmentation")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--backbones", "--backbone", default=None,
                    help="comma-separated (default: profound_conv,provicnet; with --torch all three)")
    ap.add_argument("--torch", action="store_true", help="the same step in PyTorch, same weights (see above)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's; --torch: 1)")
    ap.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                    help="input D,H,W (default: the recipe's; --torch: the released sizes)")
    ap.add_argument("--remat", action="store_true", help="train.remat: rematerialise the backbone blocks")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="train.compute_dtype (float32 master weights either way)")
    ap.add_argument("--profile", action="store_true", help="--torch: top XLA ops of the JAX step by time")
    ap.add_argument("--jax-only", action="store_true",
                    help="--torch without the PyTorch side: the JAX step's time and peak memory (memory levers)")
    ap.add_argument("--fsdp-report", action="store_true", help="per-device bytes, fsdp=1 vs 8 (fake CPU mesh)")
    args = ap.parse_args()
    if args.torch:
        args.variant = "default"  # the twins are the released architectures
    if args.fsdp_report:
        flag = "--xla_force_host_platform_device_count=8"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax
    import machine

    print(f"machine: {machine.describe()}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{platform.processor() or platform.machine()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, compute {args.compute_dtype}, variant {args.variant}, "
          f"task {args.task}, remat {args.remat}; no persistent compilation cache")
    if args.fsdp_report:
        fsdp_report((args.backbones or ",".join(BACKBONES)).split(","), args.task, args.variant)
        return
    if args.torch:
        for bb in (args.backbones or ",".join(BACKBONES)).split(","):
            r = bench_torch(bb, args.task, args)
            rj = r["jax"]
            tj = float(np.median(rj["times"]))
            if args.jax_only:
                print(f"\n{bb}: batch {r['batch']} x {'x'.join(map(str, r['shape']))}, {args.task}, median of "
                      f"{args.reps} steps\n  jax    step {tj:8.3f} s  {r['batch'] / tj:7.3f} img/s  peak RSS "
                      f"{_fmt_mem(rj['rss'])}  (compile {rj['compile']:.1f} s apart)")
                _print_profile(rj)
                continue
            rt = r["torch"]
            tt = float(np.median(rt["times"]))
            print(f"\n{bb}: batch {r['batch']} x {'x'.join(map(str, r['shape']))}, {args.task}, "
                  f"torch {rt['torch']} ({rt['threads']} threads), median of {args.reps} steps")
            print(f"  agreement after one step: loss rel err {r['loss_err']:.1e} "
                  f"(jax {rj['loss']:.6f}, torch {rt['loss']:.6f}); weights max rel err {r['w_err']:.1e}; "
                  f"update max rel err {r['u_err']:.1e}")
            print(f"  jax    step {tj:8.3f} s  {r['batch'] / tj:7.3f} img/s  peak RSS {_fmt_mem(rj['rss'])}  "
                  f"(compile {rj['compile']:.1f} s apart)")
            print(f"  torch  step {tt:8.3f} s  {r['batch'] / tt:7.3f} img/s  peak RSS {_fmt_mem(rt['rss'])}")
            print(f"  ratio torch/JAX step time {tt / tj:.2f}x; peak memory torch/JAX {rt['rss'] / rj['rss']:.2f}x")
            _print_profile(rj)
        return
    print(f"{'backbone':<15}{'compile s':>10}{'step ms':>10}{'IQR ms':>9}{'img/s':>8}"
          f"{'align ms':>10}{'K':>6}{'overhead':>10}")
    for bb in (args.backbones or "profound_conv,provicnet").split(","):
        r = bench(bb, args.task, args.variant, args.reps, batch=args.batch, shape=args.shape, remat=args.remat,
                  compute_dtype=args.compute_dtype)
        print(f"{r['backbone']:<15}{r['compile']:>10.1f}{r['step'] * 1e3:>10.1f}{r['iqr'] * 1e3:>9.1f}"
              f"{r['img_s']:>8.2f}"
              f"{r['align'] * 1e3:>10.1f}{r['every']:>6}{r['overhead'] * 100:>9.2f}%")


if __name__ == "__main__":
    main()
