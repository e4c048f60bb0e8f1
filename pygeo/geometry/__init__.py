"""Geometry generic over the metric contract."""
from .interpolation import ConformalInterpolation, conformal_interpolation

__all__ = ["ConformalInterpolation", "conformal_interpolation"]
