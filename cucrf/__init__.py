"""cucrf: Convolutional CRFs for semantic segmentation on NumPy and CuPy.

Refine a segmentation network's per-pixel class scores so that labels follow image edges:

>>> import numpy as np, cucrf
>>> image = np.zeros((20, 30, 3), dtype=np.uint8); image[:, 15:] = 255
>>> unary = np.zeros((2, 20, 30), dtype=np.float32); unary[1, :, 14:] = 2.0
>>> labels = cucrf.infer(unary, image).argmax(axis=0)
>>> bool((labels[:, :15] == 0).all() and (labels[:, 15:] == 1).all())
True
"""

from ._api import DEFAULT_BLUR, DEFAULT_FILTER_SIZE, DEFAULT_ITERATIONS, infer
from ._params import CRFParams
from ._validation import ProblemTooLargeError
from .unary import unary_from_labels, unary_from_probabilities

__version__ = "0.1.0"

__all__ = [
    "infer", "CRFParams", "unary_from_probabilities", "unary_from_labels",
    "ProblemTooLargeError", "DEFAULT_FILTER_SIZE", "DEFAULT_BLUR", "DEFAULT_ITERATIONS",
]
