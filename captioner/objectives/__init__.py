"""Training objectives behind one registry keyed by ``objective.name``.

Each module of this package defines one objective: a subclass of
``captioner.objectives.base.Objective`` (the contract), decorated with
``@OBJECTIVES.register(name, Schema)`` (``Schema`` a subclass of ``captioner.config.ObjectiveConfig``)
and selected by ``conf/objective/<name>.yaml``. Adding an objective is one module here plus its
config file; the training loop never knows which one it runs (self-critical.pytorch's loss wrapper).
"""
from __future__ import annotations

from captioner.objectives.base import REQUIRED, Objective, ObjectiveContext
from captioner.registry import Registry

OBJECTIVES = Registry("objective", __name__, Objective, REQUIRED, "captioner/objectives/base.py")


def build_objective(objective_cfg, context: ObjectiveContext):
    return OBJECTIVES.get(objective_cfg.name).from_config(objective_cfg, context)
