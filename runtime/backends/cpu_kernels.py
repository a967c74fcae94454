"""C++ kernels for the "cpu" backend: matrix products of 1 to 8 activation rows that read the weights near memory
speed (float32 and bfloat16 weights), and the memory layer's selection and pooling in one call per op.

PyTorch's CPU GEMM at 1-8 rows runs below memory bandwidth on this project's machines (AMD, AVX2 only), and its
bfloat16 GEMV, without bfloat16 arithmetic, slower still; a decode step of a batch of a few sequences is exactly
that product. ``gemv_small`` loads each weight vector once for all rows (register-blocked: one float32 accumulator
vector per row), widens bfloat16 weights to float32 in registers (a 16-bit shift) and accumulates in float32 with
FMA. The memory layer's ops (``coarse_topm_small``, ``top_k_rows``, ``grid_topm``, ``gather_pool``) and a decode
step's attention (``decode_attention``) replace a dozen PyTorch calls each, whose per-call cost dominates a decode
step here; every index read from an input is bounds-checked (an error, never a read outside a tensor), and tensors
not in CPU memory are refused. Work is split across PyTorch's intra-op threads
(OpenMP: the extension is built with it, or ``at::parallel_for`` would run on one thread). Compiled once per
machine with PyTorch's own extension builder on first use (cached in ``TORCH_EXTENSIONS_DIR``); where that fails or
the CPU lacks AVX2/FMA, ``kernel()`` says why and the backend keeps PyTorch's implementations.
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
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

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
// every tensor a kernel reads must be in CPU memory (a CUDA tensor's pointer is not readable here)
static void on_cpu(std::initializer_list<torch::Tensor> tensors, const char* what) {
  for (const auto& t : tensors) TORCH_CHECK(t.device().is_cpu(), what, ": tensors must be on the CPU");
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
// row_block for a row count known at run time (1 to 8)
template <typename W>
static void rows_dot(int64_t M, const float* xp, const W* row, int64_t K, int64_t N, int64_t n, float* op) {
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
template <typename W>
static torch::Tensor gemv(torch::Tensor x, const W* wp, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>(); float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) rows_dot(M, xp, wp + n * K, K, N, n, op);
  });
  return out;
}
// x (..., K) @ w (N, K)^T -> (..., N) in x's dtype, for 1 to 8 rows of x; float32 or bfloat16 x and w, accumulated
// in float32 and rounded once
torch::Tensor gemv_small(torch::Tensor x, torch::Tensor w) {
  on_cpu({x, w}, "gemv_small");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1), "gemv_small: x (..., K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "gemv_small: x must be float32 or bfloat16");
  auto rows = x.reshape({-1, x.size(-1)}).to(torch::kFloat).contiguous();
  TORCH_CHECK(rows.size(0) >= 1 && rows.size(0) <= 8, "gemv_small: 1 to 8 rows");
  w = w.contiguous();
  torch::Tensor out;
  if (w.scalar_type() == torch::kFloat) {
    out = gemv<float>(rows, w.data_ptr<float>(), w.size(0));
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "gemv_small: w must be float32 or bfloat16");
    out = gemv<uint16_t>(rows, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.size(0));
  }
  auto shape = x.sizes().vec();
  shape.back() = w.size(0);
  return out.to(x.scalar_type()).reshape(shape);
}

// ---- the memory layer's selection and pooling: one call per op instead of a dozen torch ops
// a float's rank as an unsigned integer: larger floats larger, NaN above every number (as torch.topk ranks it),
// -0 equal to +0
static inline uint32_t rank_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  if (f == 0.f) f = 0.f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// the k best of s[0..n), best first, ties to the lower index. The least of the maxima of k disjoint sets of elements
// (element i in set i % k, a max per set lane by lane) is a lower bound of the k-th best: only elements at or above
// it (picked without branches) are ranked exactly; with a NaN anywhere, every element is.
static void top_k(const float* s, int64_t n, int64_t k, int64_t* index, float* value) {
  std::vector<float> most(k, -INFINITY);
  const int64_t whole = n / k * k;
  for (int64_t base = 0; base < whole; base += k)
    for (int64_t g = 0; g < k; ++g) most[g] = std::max(most[g], s[base + g]);
  const float bound = whole ? *std::min_element(most.begin(), most.end()) : -INFINITY;
  std::vector<int64_t> picked(n);
  int64_t count = 0;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) { picked[count] = i; count += s[i] >= bound; nan |= s[i] != s[i]; }
  if (nan) { std::iota(picked.begin(), picked.end(), int64_t{0}); count = n; }
  std::vector<std::pair<uint32_t, int64_t>> ranked(count);
  for (int64_t j = 0; j < count; ++j) ranked[j] = {rank_key(s[picked[j]]), picked[j]};
  auto before = [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; };
  std::nth_element(ranked.begin(), ranked.begin() + k, ranked.end(), before);
  std::sort(ranked.begin(), ranked.begin() + k, before);
  for (int64_t i = 0; i < k; ++i) { index[i] = ranked[i].second; if (value) value[i] = s[ranked[i].second]; }
}
template <typename W>
static float dot(const float* x, const W* w, int64_t K) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    a = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a);
    b = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), b);
  }
  float total = hsum(_mm256_add_ps(a, b));
  for (; k < K; ++k) total += widen(w[k]) * x[k];
  return total;
}
static void check_indices(const torch::Tensor& index, int64_t limit, const char* what) {
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < limit, what, ": index ", p[i], " outside [0, ", limit, ")");
}
// q (T, H, K) float32 (T <= 8), keys (H, n, K): each token's and head's top k of q . keys -> values (T, H, k),
// indices; the scores of all T tokens from one pass over each head's keys (row_block)
template <typename W>
static std::vector<torch::Tensor> coarse(torch::Tensor q, const W* keys, int64_t n, int64_t k) {
  const int64_t T = q.size(0), H = q.size(1), K = q.size(2);
  auto by_head = q.transpose(0, 1).contiguous();  // (H, T, K)
  auto scores = torch::empty({H, T, n}, q.options());
  auto values = torch::empty({T, H, k}, q.options());
  auto indices = torch::empty({T, H, k}, q.options().dtype(torch::kLong));
  const float* qp = by_head.data_ptr<float>(); float* sp = scores.data_ptr<float>();
  float* vp = values.data_ptr<float>(); int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, H * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t hj = begin; hj < end; ++hj) {
      const int64_t h = hj / n, j = hj % n;
      rows_dot(T, qp + h * T * K, keys + hj * K, K, n, j, sp + h * T * n);
    }
  });
  at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / H, h = th % H;
      top_k(sp + (h * T + t) * n, n, k, ip + th * k, vp + th * k);
    }
  });
  return {values, indices};
}
// each row's top k of scores (R, n) float32 -> values (R, k), indices (R, k)
std::vector<torch::Tensor> top_k_rows(torch::Tensor scores, int64_t k) {
  on_cpu({scores}, "top_k_rows");
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == torch::kFloat, "top_k_rows: scores (R, n) float32");
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "top_k_rows: k outside [1, n]");
  scores = scores.contiguous();
  const int64_t R = scores.size(0), n = scores.size(1);
  auto values = torch::empty({R, k}, scores.options());
  auto indices = torch::empty({R, k}, scores.options().dtype(torch::kLong));
  const float* sp = scores.data_ptr<float>(); float* vp = values.data_ptr<float>(); int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) top_k(sp + i * n, n, k, ip + i * k, vp + i * k);
  });
  return {values, indices};
}
std::vector<torch::Tensor> coarse_topm_small(torch::Tensor q, torch::Tensor keys, int64_t k) {
  on_cpu({q, keys}, "coarse_topm_small");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && keys.size(0) == q.size(1) && keys.size(2) == q.size(2),
              "coarse_topm_small: q (T, H, K) and keys (H, n, K)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat, "coarse_topm_small: q must be float32");
  TORCH_CHECK(k >= 1 && k <= keys.size(1), "coarse_topm_small: k outside [1, n]");
  TORCH_CHECK(q.size(0) >= 1 && q.size(0) <= 8, "coarse_topm_small: 1 to 8 tokens");
  q = q.contiguous(); keys = keys.contiguous();
  if (keys.scalar_type() == torch::kFloat) return coarse<float>(q, keys.data_ptr<float>(), keys.size(1), k);
  TORCH_CHECK(keys.scalar_type() == torch::kBFloat16, "coarse_topm_small: keys must be float32 or bfloat16");
  return coarse<uint16_t>(q, reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>()), keys.size(1), k);
}
// the winners' rank scores: out[i, a] = sum_d q[d] keys[h, index[i], a, d] (keys rank-major: each (a) a K-vector)
template <typename W>
static void rank_scores(const float* q, const W* keys, const int64_t* index, int64_t m, int64_t K, int64_t r,
                        float* out) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t a = 0; a < r; ++a) out[i * r + a] = dot(q, keys + (index[i] * r + a) * K, K);
}
// per token and head: the m x m Tucker grid of the kept rows and columns summed over cores, its top m (grid
// addresses i_row * n + i_col) and each core's score there. The grid is linear in the core, so the cores are summed
// first (mixed[i, b] = sum_c sum_a rows[i, a] core_c[a, b]) and each core's own grid is computed at the winners only.
template <typename W>
static std::vector<torch::Tensor> grid(torch::Tensor q_row, torch::Tensor q_col, const W* keys_row, const W* keys_col,
                                       int64_t head_stride, torch::Tensor i_row, torch::Tensor i_col,
                                       torch::Tensor cores, int64_t n) {
  const int64_t T = q_row.size(0), H = q_row.size(1), K = q_row.size(2), m = i_row.size(2);
  const int64_t C = cores.size(1), r = cores.size(2);
  auto address = torch::empty({T, H, m}, i_row.options());
  auto scores = torch::empty({T, H, m, C}, q_row.options());
  const float *qr = q_row.data_ptr<float>(), *qc = q_col.data_ptr<float>(), *cp = cores.data_ptr<float>();
  const int64_t *ir = i_row.data_ptr<int64_t>(), *ic = i_col.data_ptr<int64_t>();
  int64_t* ap = address.data_ptr<int64_t>(); float* sp = scores.data_ptr<float>();
  at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(m * r), cols(m * r), cols_by_rank(r * m), mixed(m * r), total(m * m);
    std::vector<int64_t> winners(m);
    for (int64_t th = begin; th < end; ++th) {
      const int64_t h = th % H;
      const float* core = cp + h * C * r * r;
      rank_scores(qr + th * K, keys_row + h * head_stride, ir + th * m, m, K, r, rows.data());
      rank_scores(qc + th * K, keys_col + h * head_stride, ic + th * m, m, K, r, cols.data());
      for (int64_t j = 0; j < m; ++j)
        for (int64_t b = 0; b < r; ++b) cols_by_rank[b * m + j] = cols[j * r + b];
      for (int64_t i = 0; i < m; ++i)
        for (int64_t b = 0; b < r; ++b) {
          float v = 0.f;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t a = 0; a < r; ++a) v += rows[i * r + a] * core[(c * r + a) * r + b];
          mixed[i * r + b] = v;
        }
      for (int64_t i = 0; i < m; ++i) {
        float* line = total.data() + i * m;
        for (int64_t j = 0; j < m; ++j) line[j] = 0.f;
        for (int64_t b = 0; b < r; ++b) {
          const float weight = mixed[i * r + b];
          const float* col = cols_by_rank.data() + b * m;
          for (int64_t j = 0; j < m; ++j) line[j] += weight * col[j];
        }
      }
      top_k(total.data(), m * m, m, winners.data(), nullptr);
      for (int64_t w = 0; w < m; ++w) {
        const int64_t i = winners[w] / m, j = winners[w] % m;
        ap[th * m + w] = ir[th * m + i] * n + ic[th * m + j];
        for (int64_t c = 0; c < C; ++c) {
          float v = 0.f;
          for (int64_t a = 0; a < r; ++a)
            for (int64_t b = 0; b < r; ++b) v += rows[i * r + a] * core[(c * r + a) * r + b] * cols[j * r + b];
          sp[(th * m + w) * C + c] = v;
        }
      }
    }
  });
  return {address, scores};
}
std::vector<torch::Tensor> grid_topm(torch::Tensor q_row, torch::Tensor q_col, torch::Tensor keys_row,
                                           torch::Tensor keys_col, torch::Tensor i_row, torch::Tensor i_col,
                                           torch::Tensor cores, int64_t n) {
  on_cpu({q_row, q_col, keys_row, keys_col, i_row, i_col, cores}, "grid_topm");
  TORCH_CHECK(q_row.dim() == 3 && q_col.sizes() == q_row.sizes(), "grid_topm: q_row, q_col (T, H, K)");
  TORCH_CHECK(q_row.scalar_type() == torch::kFloat && q_col.scalar_type() == torch::kFloat &&
              cores.scalar_type() == torch::kFloat, "grid_topm: q and cores must be float32");
  const int64_t H = q_row.size(1), K = q_row.size(2);
  TORCH_CHECK(keys_row.dim() == 4 && keys_row.sizes() == keys_col.sizes() && keys_row.size(0) == H &&
              keys_row.size(1) == n && keys_row.size(3) == K, "grid_topm: keys (H, n, r, K)");
  TORCH_CHECK(keys_row.scalar_type() == keys_col.scalar_type(), "grid_topm: keys of one dtype");
  TORCH_CHECK(cores.dim() == 4 && cores.size(0) == H && cores.size(2) == keys_row.size(2) &&
              cores.size(3) == keys_row.size(2), "grid_topm: cores (H, h, r, r)");
  TORCH_CHECK(i_row.dim() == 3 && i_row.sizes() == i_col.sizes() && i_row.size(0) == q_row.size(0) &&
              i_row.size(1) == H && i_row.scalar_type() == torch::kLong && i_col.scalar_type() == torch::kLong,
              "grid_topm: i_row, i_col (T, H, m) int64");
  q_row = q_row.contiguous(); q_col = q_col.contiguous(); i_row = i_row.contiguous(); i_col = i_col.contiguous();
  cores = cores.contiguous();
  // each head's (n, r, K) block must be dense; the heads may lie apart (the two sides' keys are one tensor)
  auto heads_apart = [](torch::Tensor t) {
    const bool dense = t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == t.size(2) * t.size(3);
    return dense && t.stride(0) >= t.size(1) * t.stride(1) ? t : t.contiguous();
  };
  keys_row = heads_apart(keys_row); keys_col = heads_apart(keys_col);
  TORCH_CHECK(keys_row.stride(0) == keys_col.stride(0), "grid_topm: keys of one layout");
  check_indices(i_row, n, "grid_topm: i_row");
  check_indices(i_col, n, "grid_topm: i_col");
  if (keys_row.scalar_type() == torch::kFloat)
    return grid<float>(q_row, q_col, keys_row.data_ptr<float>(), keys_col.data_ptr<float>(), keys_row.stride(0),
                       i_row, i_col, cores, n);
  TORCH_CHECK(keys_row.scalar_type() == torch::kBFloat16, "grid_topm: keys must be float32 or bfloat16");
  return grid<uint16_t>(q_row, q_col, reinterpret_cast<const uint16_t*>(keys_row.data_ptr<at::BFloat16>()),
                        reinterpret_cast<const uint16_t*>(keys_col.data_ptr<at::BFloat16>()), keys_row.stride(0),
                        i_row, i_col, cores, n);
}
// out[t, e, col] = sum over picks p of token t in block e of table[row p, col] * scores[t, p, core of col]; the row
// AHEAD picks later is prefetched while a row is summed (rows are random: their latency, not bandwidth, would bound)
template <typename W>
static torch::Tensor pool(const W* table, torch::Tensor virt, torch::Tensor scores, int64_t N, int64_t vdim, int64_t E) {
  constexpr int64_t AHEAD = 4;
  const int64_t T = virt.size(0), P = virt.size(1), C = scores.size(2), width = vdim / C;
  auto out = torch::zeros({T, E * vdim}, scores.options());
  const int64_t* vp = virt.data_ptr<int64_t>(); const float* sp = scores.data_ptr<float>(); float* op = out.data_ptr<float>();
  auto prefetch = [&](int64_t v) {
    const char* bytes = reinterpret_cast<const char*>(table + (v % N) * vdim);
    for (int64_t at = 0; at < vdim * static_cast<int64_t>(sizeof(W)); at += 64) _mm_prefetch(bytes + at, _MM_HINT_T0);
  };
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t* picks = vp + t * P;
      for (int64_t p = 0; p < std::min(AHEAD, P); ++p) prefetch(picks[p]);
      for (int64_t p = 0; p < P; ++p) {
        if (p + AHEAD < P) prefetch(picks[p + AHEAD]);
        const W* row = table + (picks[p] % N) * vdim;
        float* dst = op + (t * E + picks[p] / N) * vdim;
        for (int64_t c = 0; c < C; ++c) {
          const float score = sp[(t * P + p) * C + c];
          const __m256 s = _mm256_set1_ps(score);
          int64_t col = c * width;
          for (; col + 8 <= (c + 1) * width; col += 8)
            _mm256_storeu_ps(dst + col, _mm256_fmadd_ps(load8(row + col), s, _mm256_loadu_ps(dst + col)));
          for (; col < (c + 1) * width; ++col) dst[col] += widen(row[col]) * score;
        }
      }
    }
  });
  return out;
}
torch::Tensor gather_pool(torch::Tensor table, torch::Tensor virt, torch::Tensor scores, int64_t E) {
  on_cpu({table, virt, scores}, "gather_pool");
  TORCH_CHECK(table.dim() == 2 && virt.dim() == 2 && scores.dim() == 3 && scores.size(0) == virt.size(0) &&
              scores.size(1) == virt.size(1) && virt.scalar_type() == torch::kLong,
              "gather_pool: table (N, vdim), addresses (T, P) int64, scores (T, P, h)");
  TORCH_CHECK(scores.scalar_type() == torch::kFloat, "gather_pool: scores must be float32");
  TORCH_CHECK(E >= 1 && table.size(1) % scores.size(2) == 0, "gather_pool: E >= 1, vdim a multiple of h");
  table = table.contiguous(); virt = virt.contiguous(); scores = scores.contiguous();
  const int64_t N = table.size(0);
  check_indices(virt, N * E, "gather_pool: virtual address");
  if (table.scalar_type() == torch::kFloat) return pool<float>(table.data_ptr<float>(), virt, scores, N, table.size(1), E);
  TORCH_CHECK(table.scalar_type() == torch::kBFloat16, "gather_pool: table must be float32 or bfloat16");
  return pool<uint16_t>(reinterpret_cast<const uint16_t*>(table.data_ptr<at::BFloat16>()), virt, scores, N,
                        table.size(1), E);
}
// ---- one decode step of attention: RoPE, the new key and value written into the cache buffers, causal GQA
static inline void store(float* p, float v) { *p = v; }
static inline void store(uint16_t* p, float v) {  // round to nearest even, as torch rounds to bfloat16
  uint32_t bits; std::memcpy(&bits, &v, 4);
  *p = (v != v) ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
// x rotated by rotate-half RoPE: x * cos + (-x[half:], x[:half]) * sin
static void rope(const float* x, const float* cos, const float* sin, int64_t hd, float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) out[i] = x[i] * cos[i] + (i < half ? -x[i + half] : x[i - half]) * sin[i];
}
template <typename W>
static void attend(const float* q, const float* k, const float* v, W* keys, W* values, int64_t B, int64_t H,
                   int64_t G, int64_t hd, int64_t capacity, int64_t at, const float* cos, const float* sin,
                   const int64_t* first, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {  // the new key and value of each (sequence, kv head)
    std::vector<float> rotated(hd);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, g = bg % G;
      rope(k + (b * G + g) * hd, cos + b * hd, sin + b * hd, hd, rotated.data());
      W* key = keys + (bg * capacity + at) * hd;
      W* value = values + (bg * capacity + at) * hd;
      for (int64_t i = 0; i < hd; ++i) { store(key + i, rotated[i]); store(value + i, v[(b * G + g) * hd + i]); }
    }
  });
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(hd), weight(at + 1), sum(hd);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / (H / G), lo = first ? first[b] : 0;
      rope(q + bh * hd, cos + b * hd, sin + b * hd, hd, query.data());
      const W* key = keys + (b * G + g) * capacity * hd;
      const W* value = values + (b * G + g) * capacity * hd;
      float most = -INFINITY;
      for (int64_t j = lo; j <= at; ++j) { weight[j] = dot(query.data(), key + j * hd, hd) * scale; most = std::max(most, weight[j]); }
      float total = 0.f;
      for (int64_t j = lo; j <= at; ++j) { weight[j] = std::exp(weight[j] - most); total += weight[j]; }
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t j = lo; j <= at; ++j) {
        const W* row = value + j * hd;
        const float p = weight[j] / total;
        for (int64_t i = 0; i < hd; ++i) sum[i] += p * widen(row[i]);
      }
      std::copy(sum.begin(), sum.end(), out + bh * hd);
    }
  });
}
// q (B, H * hd), k and v (B, G * hd) of one step; keys and values (B, G, capacity, hd) buffers whose positions
// before ``at`` hold the past; cos and sin (B, hd) float32 at each sequence's position; first (B) int64 (a ragged
// batch: each sequence's first valid position) or empty. Writes the rotated key and the value at ``at`` and returns
// the attention output (B, H * hd) in q's dtype.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor keys,
                               torch::Tensor values, int64_t at, torch::Tensor cos, torch::Tensor sin,
                               torch::Tensor first) {
  on_cpu({q, k, v, keys, values, cos, sin, first}, "decode_attention");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.is_contiguous() && values.is_contiguous() &&
              keys.scalar_type() == values.scalar_type(), "decode_attention: keys, values (B, G, capacity, hd) buffers");
  const int64_t B = keys.size(0), G = keys.size(1), capacity = keys.size(2), hd = keys.size(3);
  TORCH_CHECK(at >= 0 && at < capacity, "decode_attention: position outside the buffer");
  TORCH_CHECK(q.dim() == 2 && q.size(0) == B && q.size(1) % (G * hd) == 0 && k.sizes() == v.sizes() &&
              k.dim() == 2 && k.size(0) == B && k.size(1) == G * hd && hd % 2 == 0, "decode_attention: q, k, v shapes");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == B && cos.size(1) == hd &&
              cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat, "decode_attention: cos, sin (B, hd)");
  const int64_t H = q.size(1) / hd;
  const int64_t* lo = nullptr;
  if (first.numel()) {
    TORCH_CHECK(first.dim() == 1 && first.size(0) == B && first.scalar_type() == torch::kLong, "decode_attention: first (B)");
    first = first.contiguous();
    lo = first.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(lo[b] >= 0 && lo[b] <= at, "decode_attention: first position outside [0, at]");
  }
  auto qf = q.to(torch::kFloat).contiguous(), kf = k.to(torch::kFloat).contiguous(), vf = v.to(torch::kFloat).contiguous();
  cos = cos.contiguous(); sin = sin.contiguous();
  auto out = torch::empty({B, H * hd}, qf.options());
  if (keys.scalar_type() == torch::kFloat) {
    attend<float>(qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), keys.data_ptr<float>(),
                  values.data_ptr<float>(), B, H, G, hd, capacity, at, cos.data_ptr<float>(), sin.data_ptr<float>(), lo,
                  out.data_ptr<float>());
  } else {
    TORCH_CHECK(keys.scalar_type() == torch::kBFloat16, "decode_attention: buffers must be float32 or bfloat16");
    attend<uint16_t>(qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(),
                     reinterpret_cast<uint16_t*>(keys.data_ptr<at::BFloat16>()),
                     reinterpret_cast<uint16_t*>(values.data_ptr<at::BFloat16>()), B, H, G, hd, capacity, at,
                     cos.data_ptr<float>(), sin.data_ptr<float>(), lo, out.data_ptr<float>());
  }
  return out.to(q.scalar_type());
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


FUNCTIONS = ["gemv_small", "coarse_topm_small", "top_k_rows", "grid_topm", "gather_pool", "decode_attention"]


@functools.cache
def kernel():
    """(the compiled module with ``FUNCTIONS``, None) or (None, the reason it is not available here); compiled on
    first use."""
    if os.environ.get("UMC_CPU_KERNELS", "1") == "0":
        return None, "UMC_CPU_KERNELS=0"
    if not {"avx2", "fma"} <= _cpu_flags():
        return None, "the CPU lacks AVX2/FMA"
    beside_python = os.path.join(os.path.dirname(sys.executable), "ninja")
    if shutil.which("ninja") is None and os.path.exists(beside_python):  # the pip ninja of an unactivated venv
        os.environ["PATH"] = os.path.dirname(beside_python) + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(name="umc_cpu_kernels_v15", cpp_sources=SOURCE, functions=FUNCTIONS,
                             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler missing or failing is a reason, not a crash
        return None, f"compiling the C++ kernels failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return module, None


def linear_small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K) ^T for float32 or bfloat16 x and w, accumulated in float32 and rounded once to x's dtype,
    for 1 to MAX_ROWS rows of x (the caller checks)."""
    return kernel()[0].gemv_small(x, w)


def _flat_tokens(x: torch.Tensor, trailing: int) -> torch.Tensor:
    """x with its leading (batch, step) dims merged into one, in float32 for floating tensors."""
    flat = x.reshape(-1, *x.shape[x.dim() - trailing:])
    return flat.float() if flat.is_floating_point() else flat


def coarse_topm_small(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """coarse_topm for q (..., H, kd) and folded keys (H, n, kd): each head's top k of q . keys, scores in float32
    rounded to q's dtype, ties to the lower index."""
    values, indices = kernel()[0].coarse_topm_small(_flat_tokens(q, 2), keys, k)
    lead = q.shape[:-1]
    return values.to(q.dtype).reshape(*lead, k), indices.reshape(*lead, k)


def top_k_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k along the last dim of float32 scores, best first, ties to the lower index (NaN above every number,
    as ``torch.topk``): values and int64 indices."""
    values, indices = kernel()[0].top_k_rows(scores.reshape(-1, scores.shape[-1]), k)
    return values.reshape(*scores.shape[:-1], k), indices.reshape(*scores.shape[:-1], k)


def grid_topm(q_row, q_col, keys_row, keys_col, i_row, i_col, cores, n: int):
    """grid_topm for q (..., H, kd), keys (H, n, kd, r), kept indices (..., H, m), cores (H, h, r, r): the top m of the
    Tucker grid summed over cores (ties to the lower grid position) and each core's score there."""
    rank_major = lambda keys: keys.transpose(-1, -2)  # (H, n, r, kd): a view of how the pipeline folds keys
    flat = [_flat_tokens(t, 2) for t in (q_row, q_col, i_row, i_col)]
    address, scores = kernel()[0].grid_topm(flat[0], flat[1], rank_major(keys_row), rank_major(keys_col), flat[2],
                                            flat[3], cores.float(), n)
    return address.reshape(i_row.shape), scores.to(q_row.dtype).reshape(*i_row.shape, cores.shape[1])


def gather_pool(table: torch.Tensor, virtual: torch.Tensor, scores: torch.Tensor, blocks: int) -> torch.Tensor:
    """lookup_pool after the shuffle: virtual addresses (B, T, H, m) into a table (N, vdim) split into (row
    address % N, block address // N), each row's core slices scaled by scores (B, T, H, m, h) and summed per block
    in float32 -> (B, T, blocks * vdim) in the table's dtype."""
    batch, steps = virtual.shape[:2]
    flat = virtual.reshape(batch * steps, -1)
    pooled = kernel()[0].gather_pool(table, flat, scores.reshape(*flat.shape, -1).float(), blocks)
    return pooled.to(table.dtype).reshape(batch, steps, -1)
