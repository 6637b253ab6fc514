"""A name -> (class, config schema) table per kind of component (models, objectives).

A component registers itself with ``@REGISTRY.register(name, Schema)`` in a module of the
registry's package; the registry imports every module of that package on first use, so adding a
component is one new module (plus its ``conf/<group>/<name>.yaml``) and no list to edit. Each
registry checks its contract when a class registers (``captioner.models.base.check_decoder``,
``captioner.objectives.base.check_objective``): a class that lacks a piece fails then, with one
line naming it, before any data or training work.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable, Iterable, Optional


class ContractError(TypeError):
    """A component class that does not provide what its registry's contract asks for."""


def undefined(cls: type, base: type, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that no class between ``cls`` and ``base`` (exclusive) in the MRO defines."""
    below = cls.__mro__[: cls.__mro__.index(base)] if base in cls.__mro__ else cls.__mro__
    return [name for name in names if not any(name in vars(k) for k in below)]


class Registry:
    def __init__(self, group: str, package: str, contract: Optional[Callable[[str, type], None]] = None):
        self.group, self.package, self.contract = group, package, contract
        self._classes: dict[str, type] = {}
        self._schemas: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str, schema: type) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if not (dataclasses.is_dataclass(schema) and "name" in {f.name for f in dataclasses.fields(schema)}):
                raise ContractError(f"{self.group} {name!r}: its schema {getattr(schema, '__name__', schema)} must be "
                                    "a dataclass with a name field")
            if self.contract is not None:
                self.contract(name, cls)
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

    def schema(self, name: str) -> type:
        self.get(name)
        return self._schemas[name]

    def store_schemas(self, store) -> None:
        """``<group>/<name>_schema`` in Hydra's ConfigStore for each one (its YAML extends it)."""
        self._load()
        for name, schema in self._schemas.items():
            store.store(group=self.group, name=f"{name}_schema", node=schema)
