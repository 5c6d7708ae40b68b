"""The model-family registry: where each family keeps its routers, experts and layers."""

from moetool.arch.dims import Dims, resolve_dims
from moetool.arch.registry import family_for_config, get_family, supported_model_types
from moetool.arch.spec import CATEGORIES, ExpertLayout, FamilySpec, RouterOutput, Routing, RoutingSpec

__all__ = [
    "CATEGORIES",
    "Dims",
    "ExpertLayout",
    "FamilySpec",
    "RouterOutput",
    "Routing",
    "RoutingSpec",
    "family_for_config",
    "get_family",
    "resolve_dims",
    "supported_model_types",
]
