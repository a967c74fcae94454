"""The eager PyTorch reference: the oracle every compiled artifact is checked against.

It imports nothing from the IR, passes, kernels or runtime, and they import nothing from it.
"""
from umc.reference.build import build_block, build_memory_layer, build_model
from umc.reference.init import rank_one_vectors
from umc.reference.memory import MemoryLayer, Retrieval
from umc.reference.model import DecodeState, MemoryLM
from umc.reference.official import memory_layer_from_official
from umc.reference.weights import WeightsError, load_weights, save_weights

__all__ = [
    "DecodeState", "MemoryLayer", "MemoryLM", "Retrieval", "WeightsError", "build_block",
    "build_memory_layer", "build_model", "load_weights", "memory_layer_from_official", "rank_one_vectors",
    "save_weights",
]
