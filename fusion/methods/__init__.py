"""Fusion methods, registered by name (the name string is the single source of truth).

Importing this package registers every method; ``get_method(name)`` returns one or
raises ``InvalidConfig`` listing the known names.
"""

from fusion.methods import (  # noqa: F401  (imported to register)
    dare_linear,
    dare_ties,
    geodesic,
    iso_c,
    linear,
    magnitude_prune,
    slices,
    ties,
    tsv,
)
from fusion.methods.base import METHODS, FusionContext, FusionMethod, get_method

__all__ = ["METHODS", "FusionContext", "FusionMethod", "get_method"]
