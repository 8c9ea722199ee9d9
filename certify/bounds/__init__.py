"""Bounds on the network downstream of a layer (THEORY.md sections 4, 5 and 8): the section-4
region a weight ball reaches (``regions``), interval and CROWN-style linear bounds with
forward enclosures (``linear``) and rigorous Lipschitz constants (``lipschitz``).
"""

from __future__ import annotations

from certify.bounds.linear import MarginLines, intermediate_bounds, margin_lines
from certify.bounds.lipschitz import spectral_norm_upper
from certify.bounds.regions import Region, WeightRegion

__all__ = ["MarginLines", "Region", "WeightRegion", "intermediate_bounds", "margin_lines",
           "spectral_norm_upper"]
