"""ProFound-Conv classifier: encoder -> pooled embedding -> Linear -> BatchNorm1d -> ReLU -> Linear."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from vfm_align.models.convnext3d import ConvNeXt3D, ConvNeXt3DConfig
from vfm_align.models.layers import batch_norm
from vfm_align.models.registry import register


@dataclasses.dataclass(frozen=True)
class ConvNeXt3DClassifierConfig(ConvNeXt3DConfig):
    num_classes: int = 4       # PI-RADS risk demo
    bottleneck_dim: int = 256
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1   # torch convention


class ConvNeXt3DClassifier(nnx.Module):
    """``model(x)`` -> logits (N, K); BatchNorm uses running statistics unless ``model.train()``."""

    def __init__(self, config: ConvNeXt3DClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = ConvNeXt3D(config, rngs=rngs)
        self.fc1 = nnx.Linear(config.dims[-1], config.bottleneck_dim, rngs=rngs)
        self.bn = batch_norm(config.bottleneck_dim, eps=config.bn_eps, torch_momentum=config.bn_momentum, rngs=rngs)
        self.fc2 = nnx.Linear(config.bottleneck_dim, config.num_classes, rngs=rngs)

    def head(self, pooled: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.bn(self.fc1(pooled))))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.encoder(x))


@register("profound_conv_cls", ConvNeXt3DClassifierConfig)
def build_classifier(config: ConvNeXt3DClassifierConfig, *, rngs: nnx.Rngs) -> ConvNeXt3DClassifier:
    return ConvNeXt3DClassifier(config, rngs=rngs)


__all__ = ["ConvNeXt3DClassifierConfig", "ConvNeXt3DClassifier"]
