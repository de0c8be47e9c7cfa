"""Anonymization methods, by name. Heavy methods are imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

from anonloader.errors import ConfigError
from anonloader.methods.base import Method

__all__ = ["METHODS", "Method", "get_method"]

#: name -> "module:attribute" of the class (or factory) that builds it.
METHODS: dict[str, str] = {
    "blur": "anonloader.methods.classical:GaussianBlur",
    "pixelate": "anonloader.methods.classical:Pixelate",
    "mask": "anonloader.methods.classical:SolidMask",
    "fams": "anonloader.methods.fams:FAMS",
    "iddiffuse": "anonloader.methods.iddiffuse:IDDiffuse",
    "diffdeid": "anonloader.methods.diffdeid:DiffDeID",
    "diffprivacy": "anonloader.methods.diffprivacy:DiffPrivacy",
}


def get_method(method: str | Method, **kwargs: Any) -> Method:
    """A method instance from its registry name (built with ``kwargs``) or the instance itself.

    Raises:
        ConfigError: for an unknown name, or keyword arguments given with an instance.
    """
    if not isinstance(method, str):
        if kwargs:
            raise ConfigError(f"method options {sorted(kwargs)} given with a ready method instance")
        if not isinstance(method, Method):
            raise ConfigError(
                f"{type(method).__name__} is not a method: it needs name, crop_size, template, "
                "__call__(crops, conditions) and config()"
            )
        return method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    module_name, attribute = METHODS[method].split(":")
    factory = getattr(importlib.import_module(module_name), attribute)
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise ConfigError(f"bad options for method {method!r}: {error}") from error
