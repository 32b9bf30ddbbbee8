"""Whole-volume inference with converted models: NIfTI in, probability and label maps out on the input grid."""

from vfm_align.infer.provicnet import (ProViCNetPrediction, predict_fusion, predict_sequence, preprocess_volume,
                                       write_prediction)

__all__ = ["ProViCNetPrediction", "predict_sequence", "predict_fusion", "preprocess_volume", "write_prediction"]
