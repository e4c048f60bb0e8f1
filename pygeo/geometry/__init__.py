"""Geometry over the metric contract: Christoffel symbols, curvature, geodesics, geodesic distances, interpolation,
volume maps, log maps and parallel transport."""
from .curvature import Curvature, christoffel, curvature, sectional_curvature
from .distances import geodesic_distances
from .geodesic import GeodesicResult, curve_energy, exp_map, geodesic
from .interpolation import ConformalInterpolation, conformal_interpolation
from .logmap import LogMapResult, log_map
from .transport import parallel_transport
from .volume import VolumeMap, volume_map

__all__ = ["Curvature", "christoffel", "curvature", "sectional_curvature", "GeodesicResult", "curve_energy",
           "exp_map", "geodesic", "geodesic_distances", "ConformalInterpolation", "conformal_interpolation",
           "VolumeMap", "volume_map", "LogMapResult", "log_map", "parallel_transport"]
