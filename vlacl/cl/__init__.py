"""Continual-learning algorithms behind one hook protocol, selected by name (``--cl``)."""

from vlacl.cl.base import Algorithm, CLAlgorithm, SampleRef, TaskContext, available, get_algorithm, register

__all__ = ["Algorithm", "CLAlgorithm", "SampleRef", "TaskContext", "available", "get_algorithm", "register"]
