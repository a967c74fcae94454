"""A C++ kernel for the "cpu" backend: matrix products of 1 to 8 activation rows that read the weights near memory
speed, for float32 and bfloat16 weights.

PyTorch's CPU GEMM at 2-8 rows runs far below memory bandwidth on this project's machines (AMD, AVX2 only:
1.4-2.5 GB/s for float32 against 9+ GB/s at one row), and its bfloat16 GEMV, without bfloat16 arithmetic,
slower still; a decode step of a batch of a few sequences is exactly that product. The kernel loads each weight
vector once for all rows (register-blocked: one float32 accumulator vector per row), widens bfloat16 weights to
float32 in registers (a 16-bit shift) and accumulates in float32 with FMA, the weight rows split across
PyTorch's intra-op threads. It is compiled once per machine with PyTorch's own
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
#include <cstring>

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
static inline float widen(float v) { return v; }
static inline float widen(uint16_t v) { uint32_t bits = static_cast<uint32_t>(v) << 16; float f; std::memcpy(&f, &bits, 4); return f; }
static inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_hadd_ps(h, h); h = _mm_hadd_ps(h, h); return _mm_cvtss_f32(h);
}
// out[m, n] = sum_k x[m, k] * w[n, k] for the M rows of x at once: each weight vector is loaded once. Up to 4 rows
// keep two accumulator chains per row (16 weights a step) so FMA latency does not bound them; more rows keep one
// (16 ymm registers hold no more).
template <int M, typename W>
static void row_block(const float* xp, const W* row, int64_t K, int64_t N, int64_t n, float* op) {
  constexpr int CHAINS = M <= 4 ? 2 : 1;
  __m256 acc[M * CHAINS];
  for (int i = 0; i < M * CHAINS; ++i) acc[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * CHAINS <= K; k += 8 * CHAINS) {
    for (int c = 0; c < CHAINS; ++c) {
      __m256 wv = load8(row + k + 8 * c);
      for (int m = 0; m < M; ++m)
        acc[m * CHAINS + c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + m * K + k + 8 * c), acc[m * CHAINS + c]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[m * CHAINS];
    for (int c = 1; c < CHAINS; ++c) sum = _mm256_add_ps(sum, acc[m * CHAINS + c]);
    float total = hsum(sum);
    for (int64_t j = k; j < K; ++j) total += widen(row[j]) * xp[m * K + j];
    op[m * N + n] = total;
  }
}
template <typename W>
static torch::Tensor gemv(torch::Tensor x, const W* wp, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const W* row = wp + n * K;
      switch (M) {
        case 1: row_block<1>(xp, row, K, N, n, op); break;
        case 2: row_block<2>(xp, row, K, N, n, op); break;
        case 3: row_block<3>(xp, row, K, N, n, op); break;
        case 4: row_block<4>(xp, row, K, N, n, op); break;
        case 5: row_block<5>(xp, row, K, N, n, op); break;
        case 6: row_block<6>(xp, row, K, N, n, op); break;
        case 7: row_block<7>(xp, row, K, N, n, op); break;
        default: row_block<8>(xp, row, K, N, n, op); break;
      }
    }
  });
  return out;
}
torch::Tensor gemv_small(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv_small: shapes");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "gemv_small: x must be float32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "gemv_small: 1 to 8 rows");
  x = x.contiguous(); w = w.contiguous();
  if (w.scalar_type() == torch::kFloat) return gemv<float>(x, w.data_ptr<float>(), w.size(0));
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "gemv_small: w must be float32 or bfloat16");
  return gemv<uint16_t>(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.size(0));
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
    """(gemv_small, None) or (None, the reason it is not available here); compiled on first use."""
    if os.environ.get("UMC_CPU_KERNELS", "1") == "0":
        return None, "UMC_CPU_KERNELS=0"
    if not {"avx2", "fma"} <= _cpu_flags():
        return None, "the CPU lacks AVX2/FMA"
    beside_python = os.path.join(os.path.dirname(sys.executable), "ninja")
    if shutil.which("ninja") is None and os.path.exists(beside_python):  # the pip ninja of an unactivated venv
        os.environ["PATH"] = os.path.dirname(beside_python) + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(name="umc_cpu_kernels_v3", cpp_sources=SOURCE, functions=["gemv_small"],
                             extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler missing or failing is a reason, not a crash
        return None, f"compiling the C++ kernel failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return module.gemv_small, None


def linear_small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K) ^T for float32 or bfloat16 weights (x in w's dtype), accumulated in float32 and rounded
    once to x's dtype, for 1 to MAX_ROWS rows of x (the caller checks)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return kernel()[0](flat, w).to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
