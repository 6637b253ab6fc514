"""A name -> (class, config schema) table per kind of component (models, objectives).

A component registers itself with ``@REGISTRY.register(name, Schema)`` in a module of the
registry's package; the registry imports every module of that package on first use, so adding a
component is one new module (plus its ``conf/<group>/<name>.yaml``) and no list to edit.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable


class Registry:
    def __init__(self, group: str, package: str):
        self.group, self.package = group, package
        self._classes: dict[str, type] = {}
        self._schemas: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str, schema: type) -> Callable[[type], type]:
        def add(cls: type) -> type:
            self._classes[name], self._schemas[name] = cls, schema
            return cls

        return add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._load()
        if name not in self._classes:
            raise ValueError(f"{self.group}.name={name!r}: choose one of {', '.join(self.names())}")
        return self._classes[name]

    def store_schemas(self, store) -> None:
        """``<group>/<name>_schema`` in Hydra's ConfigStore for each one (its YAML extends it)."""
        self._load()
        for name, schema in self._schemas.items():
            store.store(group=self.group, name=f"{name}_schema", node=schema)
