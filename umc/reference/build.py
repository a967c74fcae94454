"""Model construction from a spec: seeded weights on the CPU, or shapes only on the meta device."""

from __future__ import annotations

import torch

from umc.reference.init import initialize
from umc.reference.model import MemoryLM
from umc.spec import Spec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(spec: Spec, seed: int | None = None, device: str = "cpu") -> MemoryLM:
    """The eager reference model of ``spec`` in the spec's dtype, in eval mode.

    ``seed`` defaults to the spec's seed. Weights are drawn in float32 and then cast, so
    every dtype starts from the same values. ``device="meta"`` allocates no weights:
    use it to inspect shapes and parameter counts of models too big for memory.
    """
    dtype = TORCH_DTYPES[spec.dtype]
    if device == "meta":
        with torch.device("meta"):
            return MemoryLM(spec).to(dtype).eval()
    with torch.device("cpu"):
        model = MemoryLM(spec)
    initialize(model, spec.seed if seed is None else seed)
    return model.to(device=device, dtype=dtype).eval()
