"""The op registry (``OPS``): every op's definition, by family. Importing this package registers them all."""
from umc.ir.ops import dense, fused, kernels, memory, shard, tensor  # noqa: F401  (registration)
from umc.ir.ops.registry import (OPS, Attr, Concrete, OpDef, Port, Selection, check_arity, check_attrs, infer_types,
                                 lookup)

__all__ = ["OPS", "Attr", "Concrete", "OpDef", "Port", "Selection", "check_arity", "check_attrs", "infer_types", "lookup"]
