"""Backbone + task head for each backbone family and task.

Backbones expose ``features(...) -> dict`` of channels-last arrays:

* volume backbones (ProFound-Conv, MAE-ViT): ``features(x (N,D,H,W,C))`` with "pooled" (N,F) and
  dense maps such as "stage0".."stage3" / "patch" (N,d,h,w,F);
* slice backbones (ProViCNet): ``features(x (N,S,S,3), pos (N,2))`` with "pooled"/"cls" (N,F)
  and "patch" (N,h,w,F). A volume is cut into 2.5D windows of ``slice_window`` consecutive
  slices of one sequence (windows shift inward at the edges, as upstream), each resized to
  ``slice_size``, with ``pos = (j, D)``; dense outputs are put back into (N,D,H,W,K).

The head is the task's (``vfm_align.data.tasks``: ``Task.head``): "label" (one prediction per case,
from pooled features), "dense" (per-voxel logits: segmentation, detection) and "restore" (the clean
volume: super-resolution, distortion correction). Dense and restore heads are
:class:`RestorationDecoder` (residual on the task's ``restore_from`` input channels for restore).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from vfm_align.data.tasks import get_task
from vfm_align.errors import ConfigError
from vfm_align.models.heads.restoration import RestorationDecoder
from vfm_align.models.layers import set_remat
from vfm_align.models.registry import build_model, register


def is_layer_site(name: str) -> bool:
    """A per-block feature site ("block3", "stage1_block0"): models give those only with ``layers=True``."""
    return re.fullmatch(r"(stage\d+_)?block\d+", name) is not None


def layer_sites(names) -> list[str]:
    """The per-block sites among ``names``, in network order (stage, then block, by number)."""
    found = [n for n in names if is_layer_site(n)]
    return sorted(found, key=lambda n: tuple(int(v) for v in re.findall(r"\d+", n)) if "stage" in n
                  else (0, int(n[5:])))


def window_index(depth: int, window: int) -> jnp.ndarray:
    """(D, window) slice indices: window centred on j, shifted inward at the edges."""
    if depth < window:
        raise ConfigError(f"volume has {depth} slices, fewer than the 2.5D window of {window}")
    half = window // 2
    start = jnp.clip(jnp.arange(depth) - half, 0, depth - window)
    return start[:, None] + jnp.arange(window)[None, :]


def volume_to_slices(x: jax.Array, channel: int, window: int, size: int | None):
    """(N,D,H,W,C) -> 2.5D slices (N*D, S, S, window) of one sequence and pos (N*D, 2) = (j, D)."""
    n, d, h, w, _ = x.shape
    v = x[..., channel]                                   # (N, D, H, W)
    idx = window_index(d, window)                         # (D, window)
    s = jnp.moveaxis(v[:, idx], 2, -1).reshape(n * d, h, w, window)
    if size is not None and (size, size) != (h, w):
        # Bilinear with half-pixel centres, no antialias: cv2 INTER_LINEAR for upsampling.
        s = jax.image.resize(s, (n * d, size, size, window), "linear", antialias=False)
    j = jnp.tile(jnp.arange(d, dtype=jnp.float32), n)
    pos = jnp.stack([j, jnp.full_like(j, d)], axis=-1)
    return s, pos


class TaskModel(nnx.Module):
    """``model(x) -> (out, aux)``; aux is None unless the head is deep-supervised.

    ``remat``: rematerialise every backbone block in the backward pass (less activation memory, one
    more forward of the backbone per step; the recipes' ``train.remat``).
    """

    def __init__(self, backbone: nnx.Module, *, task: str, family: str, input_shape, num_outputs: int,
                 head_hidden: int = 32, feature_site: str | None = None, freeze_backbone: bool = False,
                 slice_channel: int = 0, slice_window: int = 3, slice_size: int | None = None,
                 remat: bool = False, rngs: nnx.Rngs):
        if family not in ("volume", "slices"):
            raise ConfigError(f"backbone family must be 'volume' or 'slices', got '{family}'")
        spec = get_task(task)
        if remat and not set_remat(backbone):
            raise ConfigError(f"remat: backbone {type(backbone).__name__} has no rematerialisable blocks")
        self.backbone = backbone
        self.kind = spec.head
        self.family = family
        self.freeze_backbone = freeze_backbone
        self.slice_channel, self.slice_window, self.slice_size = slice_channel, slice_window, slice_size
        d, h, w, c = input_shape
        feats = jax.eval_shape(self._raw_features, jax.ShapeDtypeStruct((1, d, h, w, c), jnp.float32))
        if feature_site is None:
            feature_site = next((k for k in ("stage0", "patch_map", "patch") if k in feats), "pooled")
        if self.kind != "label" and feature_site not in feats:
            raise ConfigError(f"backbone has no feature map '{feature_site}'; it gives {sorted(feats)}")
        self.feature_site = feature_site
        ndim = 3 if family == "volume" else 2
        if self.kind == "label":
            self.head = nnx.Linear(feats["pooled"].shape[-1], num_outputs, rngs=rngs)
        else:
            self.head = RestorationDecoder(feats[feature_site].shape[-1], c, num_outputs, hidden=head_hidden,
                                           ndim=ndim, residual=self.kind == "restore",
                                           residual_from=spec.restore_from or 0, rngs=rngs)

    def _raw_features(self, x, layers: bool = False):
        kw = {"layers": True} if layers else {}
        if self.family == "volume":
            return self.backbone.features(x, **kw)
        s, pos = volume_to_slices(x, self.slice_channel, self.slice_window, self.slice_size)
        return self.backbone.features(s, pos, **kw)

    def features(self, x: jax.Array, *, layers: bool = False) -> dict:
        """Backbone features of a volume batch (slice backbones: one row per slice); ``layers=True`` adds the
        per-block sites (:func:`layer_sites`)."""
        return self._raw_features(x, layers)

    def __call__(self, x: jax.Array):
        feats = self._raw_features(x)
        if self.freeze_backbone:
            feats = jax.lax.stop_gradient(feats)
        n, d, h, w, c = x.shape
        if self.kind == "label":
            pooled = feats["pooled"]
            if self.family == "slices":
                pooled = pooled.reshape(n, d, -1).mean(axis=1)
            return self.head(pooled), None
        fmap = feats[self.feature_site]
        if self.family == "volume":
            if fmap.ndim == 3:  # ViT tokens (N, T, E) -> their (N, d, h, w, E) grid
                fmap = fmap.reshape((n, *self.backbone.config.grid_for((d, h, w)), fmap.shape[-1]))
            return self.head(fmap, x), None
        skip = x.reshape(n * d, h, w, c)          # the slice's own voxels, all sequences
        out = self.head(fmap, skip)               # (N*D, H, W, K)
        return out.reshape(n, d, h, w, -1), None


TASK_MODEL_ARCH = "task_model"


@dataclasses.dataclass(frozen=True)
class TaskModelConfig:
    """Everything that rebuilds a fine-tuned :class:`TaskModel` (the sidecar of an exported model directory):
    the backbone's registry arch and config, and the head's settings as the model resolved them."""

    backbone_arch: str = ""
    backbone_config: dict = dataclasses.field(default_factory=dict)
    task: str = "segmentation"
    family: str = "volume"
    input_shape: tuple = (64, 224, 224, 3)  # (D, H, W, C) the model was trained on: its inference window
    num_outputs: int = 3
    head_hidden: int = 32
    feature_site: str | None = None
    slice_channel: int = 0
    slice_window: int = 3
    slice_size: int | None = None

    def __post_init__(self):
        if not self.backbone_arch or len(self.input_shape) != 4:
            raise ConfigError(f"a task model needs a backbone_arch and a (D, H, W, C) input_shape, got "
                              f"'{self.backbone_arch}' and {self.input_shape}")


@register(TASK_MODEL_ARCH, TaskModelConfig)
def build_task_model_from_config(config: TaskModelConfig, *, rngs: nnx.Rngs) -> TaskModel:
    backbone = build_model(config.backbone_arch, dict(config.backbone_config), rngs=rngs)
    return TaskModel(backbone, task=config.task, family=config.family, input_shape=tuple(config.input_shape),
                     num_outputs=config.num_outputs, head_hidden=config.head_hidden,
                     feature_site=config.feature_site, slice_channel=config.slice_channel,
                     slice_window=config.slice_window, slice_size=config.slice_size, rngs=rngs)


def task_model_config(model: TaskModel, backbone_arch: str, backbone_config: dict, task: str, input_shape,
                      num_outputs: int, head_hidden: int) -> TaskModelConfig:
    """The config that rebuilds ``model`` (its head settings as resolved, e.g. the chosen feature site)."""
    return TaskModelConfig(backbone_arch=backbone_arch, backbone_config=dict(backbone_config), task=task,
                           family=model.family, input_shape=tuple(int(s) for s in input_shape),
                           num_outputs=int(num_outputs), head_hidden=int(head_hidden),
                           feature_site=model.feature_site, slice_channel=int(model.slice_channel),
                           slice_window=int(model.slice_window),
                           slice_size=None if model.slice_size is None else int(model.slice_size))
