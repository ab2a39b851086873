"""Low-footprint inference for nnU-Net v2 models (paper section 2.3) and its label-map export.

- :class:`LowFootprintPredictor` (:mod:`.predictor`): a drop-in ``nnUNetPredictor``; console command
  ``nnUNetv2_predict_lowfootprint`` (:mod:`noisy_student_nnunet.predict_cli`).
- :mod:`.export`: logits -> label map in the original geometry, ``nearest`` or stock-equal ``linear``.
- :mod:`.resize`: the slab-wise and label-map resampling both use (torch, CPU or CUDA).
- :mod:`.preprocessing`: stock's preprocessing with slice-wise resampling (same array, less memory);
  :mod:`.spline_resize`: its 3D cubic resampling one axis at a time (stock's numbers up to float64 rounding).
- :mod:`.backend`: what runs the network (``--backend auto|torch|openvino``); :mod:`.openvino_backend`: the
  network converted once to OpenVINO, cached, compiled once per process.
- :mod:`.lazy_dynamo`: keeps ``torch._dynamo`` (158 MB, 2.7 s) unimported until something compiles.
"""

from noisy_student_nnunet.inference.lazy_dynamo import defer_dynamo_import

defer_dynamo_import()  # before stock's predictor module is imported (here, through .export and .predictor)


from noisy_student_nnunet.inference.export import (
    EXPORT_MODES,
    export_labels_from_logits,
    labels_in_original_geometry,
)
from noisy_student_nnunet.inference.predictor import FOLD_COMBINATIONS, FailedCases, LowFootprintPredictor

__all__ = [
    "EXPORT_MODES",
    "FOLD_COMBINATIONS",
    "FailedCases",
    "LowFootprintPredictor",
    "export_labels_from_logits",
    "labels_in_original_geometry",
]
