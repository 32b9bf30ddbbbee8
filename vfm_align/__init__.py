"""vfm-align: fast JAX/Flax ports of prostate-MRI foundation models and MMD alignment scoring."""

__version__ = "0.1.0"


def load(model_dir):
    """Restore a model written by ``vfm-align convert`` or by training; needs no torch."""
    from vfm_align.model_io import load as _load

    return _load(model_dir)


__all__ = ["load", "__version__"]
