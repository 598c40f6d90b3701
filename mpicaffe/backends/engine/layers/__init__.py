"""Layer registry: Caffe type string -> engine Layer class.

Each family module named in `_FAMILIES` registers its classes with `@register`; `create_layer`
builds one from a LayerParameter and gives a clear error for an unknown type. A family module
that is missing or fails to import raises its ImportError rather than leaving its types out.
"""
from __future__ import annotations

import importlib

import torch

from mpicaffe.backends.engine.layers.base import Layer
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2

LAYERS: dict[str, type[Layer]] = {}
_FAMILIES = ("inputs", "data", "hdf5_data", "vision", "pooling", "activation", "normalization", "structure",
             "loss", "recurrent", "python")


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make `cls` the implementation of Caffe layer type `cls.type`."""
    if cls.type in LAYERS:
        raise RuntimeError(f"layer type {cls.type} registered twice")
    LAYERS[cls.type] = cls
    return cls


def _load_families() -> None:
    for family in _FAMILIES:
        importlib.import_module(f"{__name__}.{family}")


def layer_types() -> list[str]:
    """Sorted list of supported Caffe layer types (pycaffe's layer_type_list)."""
    _load_families()
    return sorted(LAYERS)


def create_layer(param: caffe_pb2.LayerParameter, phase: int, device: torch.device | str = "cpu",
                 source: str = "") -> Layer:
    """Build the engine layer for `param`; UserError naming the layer if its type is unknown."""
    _load_families()
    cls = LAYERS.get(param.type)
    if cls is None:
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}layer '{param.name}' has unknown type '{param.type}' "
            f"(the built-in engine knows: {', '.join(sorted(LAYERS))})"
        )
    layer = cls(param, phase, torch.device(device), source)
    layer.check_counts()
    return layer


__all__ = ["LAYERS", "Layer", "create_layer", "layer_types", "register"]
