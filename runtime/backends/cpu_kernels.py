"""A C++ kernel for the "cpu" backend: bfloat16 matrix-vector products that read the weights at memory speed.

On CPUs without bfloat16 arithmetic (AVX2 only, as on this project's machines) PyTorch's bfloat16 GEMV runs far
below memory bandwidth (0.6 GB/s measured here against 12+ GB/s for float32), which would make a bfloat16 model
slower than its float32 copy although it reads half the bytes. This kernel widens each bfloat16 weight to
float32 in registers (a 16-bit shift) and accumulates in float32 with FMA, a few rows of activations at a time,
the weight rows split across PyTorch's intra-op threads. It is compiled once per machine with PyTorch's own
extension builder on first use (cached in ``TORCH_EXTENSIONS_DIR``); where that fails or the CPU lacks AVX2/FMA,
``kernel()`` says why and the backend keeps PyTorch's own product.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys

import torch

MAX_ROWS = 8  # activation rows per call: above this the product is compute-bound and float32 GEMM wins

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// out (M, N) float32 = x (M, K) float32 @ w (N, K) bfloat16 ^T, accumulated in float32.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv_bf16: shapes");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kBFloat16, "gemv_bf16: dtypes");
  TORCH_CHECK(x.size(0) <= 8, "gemv_bf16: at most 8 rows");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {  // the row stays in L1 across the rows of x
        const float* xr = xp + m * K;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
          __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
          __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 8)));
          acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_loadu_ps(xr + k), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), _mm256_loadu_ps(xr + k + 8), acc1);
        }
        __m256 sum = _mm256_add_ps(acc0, acc1);
        __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        half = _mm_hadd_ps(half, half);
        half = _mm_hadd_ps(half, half);
        float total = _mm_cvtss_f32(half);
        for (; k < K; ++k) {
          uint32_t bits = static_cast<uint32_t>(row[k]) << 16;
          float value;
          std::memcpy(&value, &bits, sizeof(value));
          total += value * xr[k];
        }
        op[m * N + n] = total;
      }
    }
  });
  return out;
}
"""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def kernel():
    """(gemv_bf16, None) or (None, the reason it is not available here); compiled on first use."""
    if os.environ.get("UMC_CPU_KERNELS", "1") == "0":
        return None, "UMC_CPU_KERNELS=0"
    if not {"avx2", "fma"} <= _cpu_flags():
        return None, "the CPU lacks AVX2/FMA"
    beside_python = os.path.join(os.path.dirname(sys.executable), "ninja")
    if shutil.which("ninja") is None and os.path.exists(beside_python):  # the pip ninja of an unactivated venv
        os.environ["PATH"] = os.path.dirname(beside_python) + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(name="umc_cpu_kernels", cpp_sources=SOURCE, functions=["gemv_bf16"],
                             extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler missing or failing is a reason, not a crash
        return None, f"compiling the C++ kernel failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return module.gemv_bf16, None


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) bfloat16 @ w (N, K) bfloat16 ^T, accumulated in float32 and rounded once to bfloat16, for at most
    MAX_ROWS rows of x (the caller checks)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return kernel()[0](flat, w).to(torch.bfloat16).reshape(*x.shape[:-1], w.shape[0])
