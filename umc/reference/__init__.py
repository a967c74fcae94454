"""The eager PyTorch reference: the oracle every compiled artifact is checked against.

It imports nothing from the IR, passes, kernels or runtime, and they import nothing from it.
"""
from umc.reference.memory import MemoryLayer, Retrieval
from umc.reference.official import memory_layer_from_official

__all__ = ["MemoryLayer", "Retrieval", "memory_layer_from_official"]
