"""Whole-volume inference with converted or fine-tuned models: NIfTI in, maps on the input grid out."""

from vfm_align.infer.loading import load_for_inference
from vfm_align.infer.provicnet import (
    ProViCNetPrediction,
    predict_fusion,
    predict_sequence,
    preprocess_volume,
    write_prediction,
)
from vfm_align.infer.sliding_window import sliding_window_inference
from vfm_align.infer.volume import predict_volume

__all__ = ["ProViCNetPrediction", "predict_sequence", "predict_fusion", "preprocess_volume", "write_prediction",
           "sliding_window_inference", "load_for_inference", "predict_volume"]
