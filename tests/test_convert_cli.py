"""`vfm-align convert` end to end: PyTorch checkpoint -> model directory -> vfm_align.load."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vfm_align
from converters import from_pytorch
from vfm_align.cli import main


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _weights(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def test_convert_save_load_roundtrip(fixtures_dir, golden, tmp_path, capsys, parity):
    src = str(fixtures_dir / "provicnet_t2.pth")
    out = tmp_path / "t2"
    assert main(["convert", src, "--out", str(out), "--config.num_heads=6"]) == 0
    assert "provicnet" in capsys.readouterr().out
    meta = json.load(open(out / "vfm_align.json"))
    assert meta["arch"] == "provicnet"
    assert meta["config"]["depth"] == 2 and meta["config"]["num_heads"] == 6
    assert meta["config"]["head_channels"] == [128, 64]
    prov = meta["provenance"]
    assert prov["sha256"] == _sha256(src)
    assert "backbone.blocks.1.attn.qkv.weight" in prov["used"]
    assert "BatchNorm" in prov["ignored"]["head.segmentation_conv.2.num_batches_tracked"]
    assert "unused" in prov["ignored"]["backbone.mask_token"]
    assert len(prov["used"]) + len(prov["ignored"]) == 64

    loaded = vfm_align.load(out)
    direct, _ = from_pytorch(src)
    assert loaded.config == direct.config
    jax.tree.map(np.testing.assert_array_equal, _weights(loaded), _weights(direct))
    g = golden("provicnet_t2")
    graphdef, state = nnx.split(loaded)
    with jax.default_matmul_precision("highest"):
        tokens = jax.jit(lambda s, x, p: nnx.merge(graphdef, s).patch_tokens(x, p))(
            state, jnp.asarray(g["x"].transpose(0, 2, 3, 1)), jnp.asarray(g["pos"]))
    parity(tokens, g["patch_tokens"], "patch_tokens after convert + load")

    # an existing output directory is refused and left as it was
    before = open(out / "vfm_align.json").read()
    assert main(["convert", src, "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert open(out / "vfm_align.json").read() == before


def test_convert_fusion_roundtrip(fixtures_dir, tmp_path):
    src = str(fixtures_dir / "provicnet_fusion.pth")
    out = tmp_path / "fusion"
    assert main(["convert", src, "--out", str(out)]) == 0
    loaded = vfm_align.load(out)
    direct, _ = from_pytorch(src)
    assert type(loaded).__name__ == "ProViCNetFusion"
    jax.tree.map(np.testing.assert_array_equal, _weights(loaded), _weights(direct))


@pytest.mark.parametrize("extra, words", [
    (["--arch", "provicnet_fusion"], "problem"),  # wrong architecture: every missing key reported
    (["--config.num_heads=5"], "num_heads=5"),  # 384 is not divisible by 5
])
def test_failed_conversion_leaves_nothing(fixtures_dir, tmp_path, capsys, extra, words):
    out = tmp_path / "bad"
    assert main(["convert", str(fixtures_dir / "provicnet_t2.pth"), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert words in err and "provicnet_t2.pth" in err
    assert os.listdir(tmp_path) == []  # no output directory, no temporary sibling


def test_unreadable_checkpoint_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "garbage.pth"
    src.write_bytes(b"not a checkpoint at all")
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 1
    assert "garbage.pth" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["garbage.pth"]
