"""The floating-point margins of the numpy twins: results are widened by ``ROUND`` times the
magnitudes that entered them, the margin the torch rules use (``certify.graph.operators.base``;
far above float64 rounding, relative 1e-16), and summations by multiples of ``EPS``."""

import numpy as np

ROUND = 1e-10
EPS = float(np.finfo(np.float64).eps)
