"""Structured pruning: dependency groups scored by an importance, cut together, then refit.

``Importance`` is the base class of pruning importances (plugins register their own).
"""
from presso.passes.pruning.importance import Importance

__all__ = ["Importance"]
