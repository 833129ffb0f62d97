"""All methods, found by importing every module of this package: a new method is one new file. Modules whose
names start with `_` are helpers shared by methods (`_gradients`), not methods."""

from __future__ import annotations

import importlib
import pkgutil

from featdp.methods.base import HyperparameterError, Method, register, registry

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def method_names(private: bool | None = None) -> list[str]:
    return sorted(n for n, m in registry().items() if private is None or m.private == private)


def get_method(name: str, **hyperparameters) -> Method:
    methods = registry()
    if name not in methods:
        raise HyperparameterError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name].create(**hyperparameters)


__all__ = ["HyperparameterError", "Method", "get_method", "method_names", "register", "registry"]
