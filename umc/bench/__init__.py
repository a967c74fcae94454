"""``umc bench``: decode-step latency of every backend against the hardware limits measured in the same run.

- ``timing``: the round-robin scheduler and the statistics of its samples.
- ``probes``: the machine's limits (streaming read bandwidth, fp32 GEMM rate) and what the machine is.
- ``limits``: what one decode step must read and compute (bytes, FLOPs), from the spec's sizes.
- ``contenders``: what is timed: the eager reference, ``torch.compile`` of it, and every registered backend,
  each decoding from one identical past (a whole model) or running one memory layer (``--layer-only``).
- ``peak``: each contender's peak RSS while decoding, measured in a fresh process of its own.
- ``report``: the table, the JSON and the plot.
- ``command``: the click command (``bench_command``), wired into ``umc.cli``.
"""
