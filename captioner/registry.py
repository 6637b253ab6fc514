"""A name -> (class, config schema) table per kind of component (models, objectives).

A component registers itself with ``@REGISTRY.register(name, Schema)`` in a module of the
registry's package; the registry imports every module of that package on first use, so adding a
component is one new module (plus its ``conf/<group>/<name>.yaml``) and no list to edit. Each
registry checks its contract when a class registers (``captioner.models.base.Decoder``,
``captioner.objectives.base.Objective``): a class that lacks a piece fails then, with one line
naming it, before any data or training work.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable, Optional, Sequence


class ContractError(TypeError):
    """A component class that does not provide what its registry's contract asks for."""


class Registry:
    """``base`` is the contract's base class and ``required`` the methods every registered class
    must define itself (the base's raise NotImplementedError)."""

    def __init__(self, group: str, package: str, base: Optional[type] = None, required: Sequence[str] = (),
                 contract: str = ""):
        self.group, self.package, self.base, self.required, self.contract = group, package, base, required, contract
        self._classes: dict[str, type] = {}
        self._schemas: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str, schema: type) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if not (dataclasses.is_dataclass(schema) and "name" in {f.name for f in dataclasses.fields(schema)}):
                raise ContractError(f"{self.group} {name!r}: its schema {getattr(schema, '__name__', schema)} must be "
                                    "a dataclass with a name field")
            if self.base is not None:
                self._check(name, cls)
            self._classes[name], self._schemas[name] = cls, schema
            return cls

        return add

    def _check(self, name: str, cls: type) -> None:
        """ContractError naming what ``cls`` lacks to be registered as ``name``."""
        where = f"(the {self.group} contract: {self.contract})"
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ContractError(f"{self.group} {name!r}: {getattr(cls, '__name__', cls)} must subclass "
                                f"{self.base.__module__}.{self.base.__name__} {where}")
        below = cls.__mro__[: cls.__mro__.index(self.base)]
        missing = [m for m in self.required if not any(m in vars(k) for k in below)]
        if missing:
            raise ContractError(f"{self.group} {name!r}: {cls.__name__} lacks {', '.join(missing)} {where}")

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
