"""Algorithms by name: the class named in the method's registry row (engine/registry.py)."""

from __future__ import annotations

import importlib

from engine.algorithms.base import Algorithm
from engine.registry import algorithm_info


def build_algorithm(spec) -> Algorithm:
    """The algorithm object of `spec.algorithm`, imported from where its registry row says it lives."""
    module_name, _, class_name = algorithm_info(spec.algorithm).implementation.partition(":")
    return getattr(importlib.import_module(module_name), class_name)(spec)
