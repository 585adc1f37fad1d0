"""cucrf: Convolutional CRFs for semantic segmentation on NumPy and CuPy.

Refine a segmentation network's per-pixel class scores so that labels follow image edges:

>>> import numpy as np, cucrf
>>> image = np.zeros((20, 30, 3), dtype=np.uint8); image[:, 15:] = 255
>>> scores = np.zeros((2, 20, 30), dtype=np.float32)
>>> scores[0, :, :17] = 1.0; scores[1, :, 17:] = 1.0  # labels spill 2 columns over the edge
>>> labels = cucrf.infer(scores, image, blur=1).argmax(axis=0)
>>> bool((labels[:, :15] == 0).all() and (labels[:, 15:] == 1).all())
True
"""

from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS, InferVJP, infer, infer_vjp
from ._diagnostics import InputWarning
from ._fit import FeatureTransform, FitResult, TrainingDivergedError, fit
from ._params import CRFParams
from ._radius import receptive_radius
from ._validation import ProblemTooLargeError
from .unary import unary_from_labels, unary_from_probabilities

__version__ = "0.1.0"

__all__ = [
    "infer", "CRFParams", "unary_from_probabilities", "unary_from_labels",
    "ProblemTooLargeError", "DEFAULT_FILTER_SIZE", "DEFAULT_BLUR", "DEFAULT_ITERATIONS",
    "infer_vjp", "InferVJP", "fit", "FitResult", "FeatureTransform", "TrainingDivergedError", "InputWarning",
    "receptive_radius",
]
