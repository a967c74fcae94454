"""The authors' UltraMem V1 layer config (a golden file's ``config``, a checkpoint's) as a validated MemorySpec.

Spec logic, not oracle logic: the eager reference imports the layer through it, and the
compiler side reads the same config dicts, so it lives on neutral ground and imports only
umc.spec. A config is checked by the spec's own field parsers, cross-field rules and size
rule, and every error names the key as the authors wrote it (``config.knn``).
"""

from __future__ import annotations

from typing import Any, Mapping

from umc.spec import MemorySpec, SpecError, memory_layer_spec

OFFICIAL_CONFIG_KEYS = ("hidden_size", "knum", "kdim", "vdim", "knn", "head", "tucker_rank",
                        "tucker_multihead", "value_expand_time")

# the authors' key -> the memory field it sets (hidden_size is the layer's d_model)
FIELD_OF = {"knum": "knum", "kdim": "kdim", "vdim": "vdim", "knn": "topm", "head": "heads", "tucker_rank": "tucker_rank",
            "tucker_multihead": "cores", "value_expand_time": "value_expansion", "layer_norm_eps": "norm_eps"}

# what the authors' layer always is: one shared query, LayerNorm on query and keys, no conv, no activation
FIXED = {"kind": "ultramem", "units": "0:0", "share_query": True, "query_conv": None, "score_activation": "none",
         "query_norm": "layernorm", "key_norm": "layernorm", "output_projection": True, "init": "official"}

# how messages call each field and section: the config's own keys
NAMES = {"memory": "config", "model": "config", "d_model": "hidden_size", **{field: key for key, field in FIELD_OF.items()}}


def official_memory_spec(config: Mapping[str, Any], source: str = "<config>") -> MemorySpec:
    """The MemorySpec equal to an official layer config, or a SpecError naming ``source`` and the config key.

    Keys other than OFFICIAL_CONFIG_KEYS and ``layer_norm_eps`` (default 1e-5) are ignored.
    """
    if not isinstance(config, Mapping):
        raise SpecError(source, None, "config", f"expected a mapping with keys {', '.join(OFFICIAL_CONFIG_KEYS)}, "
                                                f"got {type(config).__name__}")
    missing = [key for key in OFFICIAL_CONFIG_KEYS if key not in config]
    if missing:
        raise SpecError(source, None, "config", f"missing required key {missing[0]!r} (required: {', '.join(OFFICIAL_CONFIG_KEYS)})")
    fields = {**FIXED, **{field: config[key] for key, field in FIELD_OF.items() if key in config}}
    return memory_layer_spec(fields, config["hidden_size"], source, NAMES)[0]
