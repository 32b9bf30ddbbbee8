"""The PyTorch twins of the three backbones the benches compare against (forward and, for the train-step
bench, backward), each holding the same weights as the JAX model it is checked against. Bench-only: torch is
imported inside the functions, never by the package.

* :func:`torch_convnext`: ProFound-Conv (ConvNeXt-V2 3D), from the NNX weights (kept in their JAX layout,
  so gradients flow to the very tensors that were loaded);
* :func:`random_state_dict` / :func:`torch_encoder`: ProFound MAE-ViT-B, reference key names;
* :func:`torch_provicnet`: ProViCNet per-sequence model (ViT-S/14-reg + conv head), reference key names.
"""

from __future__ import annotations

import numpy as np

# mae_vit_base_patch16
E, DEPTH, HEADS, MLP = 768, 12, 12, 3072
DE, DDEPTH, DMLP = 384, 8, 1536
PATCH, IMG, C = (16, 32, 32), (64, 256, 256), 3



def tree_map(fn, tree):
    """``fn`` on every leaf of a tree of dicts and lists (an NNX pure dict); torch-free, numpy-free."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return fn(tree)


def torch_convnext(params, cfg):
    """Compact torch ConvNeXt-V2 3D (upstream structure, channels-first) holding the NNX weights.

    ``params``: the NNX pure dict (arrays: copied into fresh tensors) or the same tree of torch tensors (used
    as they are: gradients reach them). Weights stay in their JAX layout; the forward transposes them, so a
    gradient step on these tensors is directly comparable with the JAX one.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def t(a):
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

    def ln_cf(x, p):  # channels-first LN
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + cfg.ln_eps)
        sh = (1, -1) + (1,) * (x.ndim - 2)
        return p["scale"].view(sh) * x + p["bias"].view(sh)

    def conv_w(k):  # (k, k, k, I, O) -> (O, I, k, k, k)
        return k.permute(4, 3, 0, 1, 2).contiguous()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = tree_map(t, params)
            self.mf = torch.contiguous_format

        def stage_maps(self, x, upto: int = 3):
            """The raw maps of stages 0..``upto`` (channels-first); later stages are not computed."""
            p, outs = self.p, []
            x = F.conv3d(x, conv_w(p["stem"]["kernel"]), p["stem"]["bias"], stride=4)
            x = ln_cf(x, p["stem_norm"]).contiguous(memory_format=self.mf)
            for s in range(upto + 1):
                if s:
                    d = p["downs"][s - 1]
                    w = conv_w(d["kernel"])
                    x = F.conv3d(ln_cf(x, p["down_norms"][s - 1]).contiguous(memory_format=self.mf), w, d["bias"],
                                 stride=w.shape[-1])
                for b in range(cfg.depths[s]):
                    q = p["stages"][s][b]
                    dw = q["dwconv_kernel"].permute(3, 0, 1, 2)[:, None].contiguous()
                    n = q["norm"]
                    y = F.conv3d(x, dw, q["dwconv_bias"], padding=3, groups=x.shape[1]).permute(0, 2, 3, 4, 1)
                    y = F.gelu(F.linear(F.layer_norm(y, (y.shape[-1],), n["scale"], n["bias"], cfg.ln_eps),
                                        q["pwconv1"]["kernel"].T, q["pwconv1"]["bias"]))
                    gx = torch.norm(y, p=2, dim=(1, 2, 3), keepdim=True)
                    y = q["grn"]["gamma"] * (y * (gx / (gx.mean(dim=-1, keepdim=True) + cfg.grn_eps))) \
                        + q["grn"]["beta"] + y
                    x = x + F.linear(y, q["pwconv2"]["kernel"].T, q["pwconv2"]["bias"]).permute(0, 4, 1, 2, 3)
                outs.append(x)
            return outs

        def forward(self, x):
            x = self.stage_maps(x)[-1]
            n = self.p["norm"]
            return F.layer_norm(x.mean((2, 3, 4)), (x.shape[1],), n["scale"], n["bias"], cfg.ln_eps)

    return Net()


def random_state_dict(seed: int = 0, decoder_depth: int = DDEPTH, img=IMG) -> dict[str, np.ndarray]:
    """Reference key names and shapes (mae_vit_base_patch16; position tables for ``img``), random values of
    sensible scale."""
    rng = np.random.default_rng(seed)
    t1 = int(np.prod([i // p for i, p in zip(img, PATCH)])) + 1
    pdim = int(np.prod(PATCH)) * C

    def lin(o, i):
        return (rng.standard_normal((o, i), np.float32) / np.sqrt(i)).astype(np.float32)

    def vec(n, scale=0.1, mean=0.0):
        return (mean + scale * rng.standard_normal(n)).astype(np.float32)

    sd = {"cls_token": vec((1, 1, E), 0.5), "pos_embed": vec((1, t1, E), 0.5),
          "patch_embed.proj.weight":
              (rng.standard_normal((E, C, *PATCH), np.float32) / np.sqrt(pdim)).astype(np.float32),
          "patch_embed.proj.bias": vec(E), "norm.weight": vec(E, 0.2, 1.0), "norm.bias": vec(E),
          "decoder_embed.weight": lin(DE, E), "decoder_embed.bias": vec(DE), "mask_token": vec((1, 1, DE), 0.5),
          "decoder_pos_embed": vec((1, t1, DE), 0.5), "decoder_norm.weight": vec(DE, 0.2, 1.0),
          "decoder_norm.bias": vec(DE), "decoder_pred.weight": lin(pdim, DE), "decoder_pred.bias": vec(pdim)}
    for prefix, n, d, m in (("blocks", DEPTH, E, MLP), ("decoder_blocks", decoder_depth, DE, DMLP)):
        for i in range(n):
            b = f"{prefix}.{i}."
            sd.update({b + "norm1.weight": vec(d, 0.2, 1.0), b + "norm1.bias": vec(d),
                       b + "attn.qkv.weight": lin(3 * d, d), b + "attn.qkv.bias": vec(3 * d),
                       b + "attn.proj.weight": lin(d, d), b + "attn.proj.bias": vec(d),
                       b + "norm2.weight": vec(d, 0.2, 1.0), b + "norm2.bias": vec(d),
                       b + "mlp.fc1.weight": lin(m, d), b + "mlp.fc1.bias": vec(m),
                       b + "mlp.fc2.weight": lin(d, m), b + "mlp.fc2.bias": vec(d)})
    return sd


def torch_encoder(sd):
    """Compact PyTorch reference encoder (NCDHW input) holding the same weights (``sd``: numpy arrays, or torch
    tensors used as they are, so gradients reach them)."""
    import torch
    import torch.nn.functional as F

    w = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in sd.items()}

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), w[p + ".weight"], w[p + ".bias"], eps=1e-6)

    def lin(x, p):
        return F.linear(x, w[p + ".weight"], w[p + ".bias"])

    def forward(x):
        x = F.conv3d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH)
        x = x.flatten(2).transpose(1, 2) + w["pos_embed"][:, 1:]
        cls = (w["cls_token"] + w["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        n, t, _ = x.shape
        for i in range(DEPTH):
            b = f"blocks.{i}"
            qkv = lin(ln(x, b + ".norm1"), b + ".attn.qkv").reshape(n, t, 3, HEADS, E // HEADS).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(n, t, E)
            x = x + lin(a, b + ".attn.proj")
            x = x + lin(F.gelu(lin(ln(x, b + ".norm2"), b + ".mlp.fc1")), b + ".mlp.fc2")
        return ln(x, "norm")

    return forward


def torch_provicnet(depth: int, dim: int = 384, heads: int = 6, mlp: int = 1536, regs: int = 4, classes: int = 4):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))

    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(1 + 0.1 * torch.randn(dim))

        def forward(self, x):
            return x * self.gamma

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attn(), LayerScale()
            self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(), LayerScale()

        def forward(self, x):
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, dim, 14, 14)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
            self.register_tokens = nn.Parameter(0.02 * torch.randn(1, regs, dim))
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + 37 * 37, dim))
            self.patch_embed = PatchEmbed()
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def up():
        return nn.Upsample(scale_factor=2)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.segmentation_conv = nn.Sequential(
                up(), nn.Conv2d(dim, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                up(), nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                up(), nn.Conv2d(64, classes, 3, padding=1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = Backbone(), Head()
            self.axis_pos, self.axis_max = nn.Linear(1, dim), nn.Linear(1, dim)

        def tokens(self, x, pos):
            bb = self.backbone
            b, _, h, w = x.shape
            p = bb.patch_embed.proj(x).flatten(2).transpose(1, 2)
            g = h // 14
            grid = bb.pos_embed[:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(g, g), mode="bicubic", antialias=True)
            grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
            cls = bb.cls_token + bb.pos_embed[:, :1]
            t = torch.cat([cls.expand(b, -1, -1), bb.register_tokens.expand(b, -1, -1),
                           self.axis_pos(pos[:, 0:1])[:, None], self.axis_max(pos[:, 1:2])[:, None], p + grid], 1)
            for blk in bb.blocks:
                t = blk(t)
            return bb.norm(t)

        def forward(self, x, pos):
            t = self.tokens(x, pos)[:, 7:]
            g = x.shape[2] // 14
            return self.head.segmentation_conv(t.transpose(1, 2).reshape(x.shape[0], dim, g, g))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


