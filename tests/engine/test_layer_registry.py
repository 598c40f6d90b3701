"""The layer registry: every family module listed in _FAMILIES loads and registers its types, and a
family module that cannot be imported is an error instead of a registry with types missing."""
import importlib

import pytest

from mpicaffe.backends.engine import layers
from mpicaffe.backends.engine.layers import LAYERS, layer_types


@pytest.mark.parametrize("family", layers._FAMILIES)
def test_every_listed_family_imports_and_registers_a_layer_type(family):
    module = importlib.import_module(f"{layers.__name__}.{family}")
    layer_types()
    assert any(cls.__module__ == module.__name__ for cls in LAYERS.values()), (
        f"layer family {family} registers no layer type")


def test_every_registered_engine_layer_comes_from_a_listed_family():
    layer_types()
    prefix = layers.__name__ + "."
    unlisted = {cls.__module__ for cls in LAYERS.values()
                if cls.__module__.startswith(prefix) and cls.__module__[len(prefix):] not in layers._FAMILIES}
    assert not unlisted, f"modules register layers but are missing from _FAMILIES: {sorted(unlisted)}"


def test_a_missing_family_module_is_an_error(monkeypatch):
    monkeypatch.setattr(layers, "_FAMILIES", (*layers._FAMILIES, "no_such_family"))
    with pytest.raises(ModuleNotFoundError, match="no_such_family"):
        layer_types()
