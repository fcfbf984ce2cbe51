// x @ W for quantized W on the CPU, as XLA FFI custom calls (see cpu.py, which builds this file
// with the machine's C++ compiler on first use; reference.py is the specification).
//
// XLA's CPU backend has no matrix-vector product that reads int8 weights: its int8 dot is a scalar
// loop at M = 1 and its fused convert-multiply-reduce costs ~0.2 ms a call (both measured by
// experiments/quant_gemv.py). These kernels stream each weight byte once per call. Rows of W are
// contiguous in memory, so a task walks whole rows (or blocks of NB columns of wider ones): the K
// axis is cut into ranges, one task per (range, column block), shared out to XLA's intra-op
// threads, each writing partial sums the caller adds. A task widens four rows of int8 (or one
// packed int4 row: two k) to float32 and accumulates them for up to MT rows of x; larger M makes
// more passes.
// AVX2 + FMA where the compiler targets them (-march=native), else plain loops.
//
// Layouts are reference.py's: int8 values [K, N] with scales [1, N]; int4 values [K/2, N] (even k
// in the low nibble, odd k in the high; signed, or unsigned with offsets), scales and offsets
// [K/group, N].

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t NB = 8192;  // columns per task: whole rows where N <= NB (contiguous streams)
constexpr int64_t MT = 4;     // rows of x per pass over a block (MT x NB floats of accumulator)

// Runs body(task) for task in [0, tasks) on the calling thread and XLA's intra-op pool. The
// caller claims tasks too and waits only for tasks another thread has claimed, so a pool with no
// free thread cannot stall it; late helpers find nothing left and return.
template <typename F>
void parallel_tasks(ffi::ThreadPool& pool, int64_t tasks, F body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, body]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      body(t);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

// How the work is cut: column blocks of NB, and the K axis in `splits` ranges of whole `unit`s
// (a group for int4) so that narrow matrices still give every thread work. Each (split, block)
// task writes its partial sums to partial[split]; the caller adds the splits.
struct Plan {
  int64_t blocks, splits, unit_rows;
  Plan(int64_t K, int64_t N, int64_t unit, int64_t threads) {
    blocks = (N + NB - 1) / NB;
    const int64_t units = K / unit, want = 2 * (threads + 1);
    splits = std::max<int64_t>(1, std::min<int64_t>(units, (want + blocks - 1) / blocks));
    unit_rows = (units + splits - 1) / splits * unit;  // rows of K per split
    splits = (K + unit_rows - 1) / unit_rows;
  }
};

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// a[j] += x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j], j < nb.
static inline void axpy4(float* __restrict__ a, const int8_t* __restrict__ r0, const int8_t* __restrict__ r1,
                         const int8_t* __restrict__ r2, const int8_t* __restrict__ r3, float x0, float x1, float x2,
                         float x3, int64_t nb) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 v0 = _mm256_set1_ps(x0), v1 = _mm256_set1_ps(x1), v2 = _mm256_set1_ps(x2), v3 = _mm256_set1_ps(x3);
  for (; j + 8 <= nb; j += 8) {
    __m256 acc = _mm256_loadu_ps(a + j);
    acc = _mm256_fmadd_ps(v0, widen8(r0 + j), acc);
    acc = _mm256_fmadd_ps(v1, widen8(r1 + j), acc);
    acc = _mm256_fmadd_ps(v2, widen8(r2 + j), acc);
    acc = _mm256_fmadd_ps(v3, widen8(r3 + j), acc);
    _mm256_storeu_ps(a + j, acc);
  }
#endif
  for (; j < nb; ++j)
    a[j] += x0 * static_cast<float>(r0[j]) + x1 * static_cast<float>(r1[j]) + x2 * static_cast<float>(r2[j]) +
            x3 * static_cast<float>(r3[j]);
}

// acc[m][j] += sum over k in [k0, k1) of x[m, k] * w[k, n0 + j], j < nb, four rows of W at a time.
template <int64_t kMt>
inline void int8_rows(const float* x, int64_t K, const int8_t* w, int64_t N, int64_t n0, int64_t nb,
                      int64_t k0, int64_t k1, float* const* acc) {
  static const int8_t zeros[NB] = {};
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t ku = std::min<int64_t>(4, k1 - k);
    const int8_t* r[4];
    for (int64_t u = 0; u < 4; ++u) r[u] = u < ku ? w + (k + u) * N + n0 : zeros;
    for (int64_t m = 0; m < kMt; ++m) {
      const float* xm = x + m * K + k;
      axpy4(acc[m], r[0], r[1], r[2], r[3], xm[0], ku > 1 ? xm[1] : 0.f, ku > 2 ? xm[2] : 0.f,
            ku > 3 ? xm[3] : 0.f, nb);
    }
  }
}

// int4: per group, the even-k and odd-k halves accumulate from the low and high nibbles; then the
// group's scale (and offset x the group's sum of x) folds into acc.
// p[j] += xe * low(r[j]) + xo * high(r[j]), j < nb; nibbles signed or unsigned.
template <bool kSigned>
static inline void axpy_nibbles(float* __restrict__ p, const uint8_t* __restrict__ r, float xe, float xo, int64_t nb) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 ve = _mm256_set1_ps(xe), vo = _mm256_set1_ps(xo);
  for (; j + 8 <= nb; j += 8) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + j)));
    __m256i lo, hi;
    if (kSigned) {
      lo = _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28);
      hi = _mm256_srai_epi32(_mm256_slli_epi32(v, 24), 28);
    } else {
      lo = _mm256_and_si256(v, _mm256_set1_epi32(15));
      hi = _mm256_srli_epi32(v, 4);
    }
    __m256 acc = _mm256_loadu_ps(p + j);
    acc = _mm256_fmadd_ps(ve, _mm256_cvtepi32_ps(lo), acc);
    acc = _mm256_fmadd_ps(vo, _mm256_cvtepi32_ps(hi), acc);
    _mm256_storeu_ps(p + j, acc);
  }
#endif
  for (; j < nb; ++j) {
    const uint8_t v = r[j];
    const float lo = kSigned ? static_cast<float>(static_cast<int8_t>(v << 4) >> 4) : static_cast<float>(v & 15);
    const float hi = kSigned ? static_cast<float>(static_cast<int8_t>(v) >> 4) : static_cast<float>(v >> 4);
    p[j] += xe * lo + xo * hi;
  }
}

// int4: per group, the even-k and odd-k halves accumulate from the low and high nibbles into
// part; then the group's scale (and offset x the group's sum of x) folds into acc.
template <bool kSigned, int64_t kMt>
void int4_rows(const float* x, int64_t K, const uint8_t* w, int64_t N, const float* scales,
               const float* offsets, int64_t group, int64_t n0, int64_t nb, int64_t k0, int64_t k1,
               float* const* acc, float* const* part) {
  for (int64_t g0 = k0; g0 < k1; g0 += group) {
    for (int64_t m = 0; m < kMt; ++m) std::memset(part[m], 0, nb * sizeof(float));
    for (int64_t kk = g0 / 2; kk < (g0 + group) / 2; ++kk)
      for (int64_t m = 0; m < kMt; ++m)
        axpy_nibbles<kSigned>(part[m], w + kk * N + n0, x[m * K + 2 * kk], x[m * K + 2 * kk + 1], nb);
    const float* s = scales + (g0 / group) * N + n0;
    for (int64_t m = 0; m < kMt; ++m) {
      float* __restrict__ a = acc[m];
      const float* __restrict__ p = part[m];
      if (offsets) {
        float xsum = 0.f;
        for (int64_t k = g0; k < g0 + group; ++k) xsum += x[m * K + k];
        const float* o = offsets + (g0 / group) * N + n0;
        for (int64_t j = 0; j < nb; ++j) a[j] += p[j] * s[j] + xsum * o[j];
      } else {
        for (int64_t j = 0; j < nb; ++j) a[j] += p[j] * s[j];
      }
    }
  }
}

template <typename F>
inline void by_rows(int64_t mt, F f) {  // f(std::integral_constant<int64_t, mt>) for mt in 1..MT
  switch (mt) {
    case 1: return f(std::integral_constant<int64_t, 1>());
    case 2: return f(std::integral_constant<int64_t, 2>());
    case 3: return f(std::integral_constant<int64_t, 3>());
    default: return f(std::integral_constant<int64_t, 4>());
  }
}

// Shared driver: rows(kMt, x_tile, k0, k1, n0, nb, acc, part) accumulates one tile; the summed
// result is then multiplied by col_scale if given (int8: the channel scale; int4 applies its
// scales per group inside rows and passes none).
template <typename Rows>
void drive(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N, int64_t unit,
           const float* col_scale, float* out, Rows rows) {
  const Plan plan(K, N, unit, pool.num_threads());
  std::vector<float> partial(plan.splits > 1 ? plan.splits * M * N : 0);
  float* dst = plan.splits > 1 ? partial.data() : out;
  parallel_tasks(pool, plan.splits * plan.blocks, [=, &plan](int64_t t) {
    const int64_t split = t / plan.blocks, b = t % plan.blocks;
    const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
    const int64_t k0 = split * plan.unit_rows, k1 = std::min(K, k0 + plan.unit_rows);
    float* d = dst + split * M * N;
    std::vector<float> scratch(2 * MT * nb);  // accumulators, and int4's per-group partial sums
    float *acc[MT], *part[MT];
    for (int64_t m = 0; m < MT; ++m) acc[m] = scratch.data() + m * nb, part[m] = acc[m] + MT * nb;
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int64_t mt = std::min(MT, M - m0);
      std::fill(scratch.begin(), scratch.begin() + MT * nb, 0.f);
      by_rows(mt, [&](auto kMt) { rows(kMt, x + m0 * K, k0, k1, n0, nb, acc, part); });
      for (int64_t m = 0; m < mt; ++m) std::memcpy(d + (m0 + m) * N + n0, acc[m], nb * sizeof(float));
    }
  });
  if (plan.splits > 1) {
    for (int64_t i = 0; i < M * N; ++i) {
      float sum = 0.f;
      for (int64_t s = 0; s < plan.splits; ++s) sum += partial[s * M * N + i];
      out[i] = sum;
    }
  }
  if (col_scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * N + n] *= col_scale[n];
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  const int8_t* wp = w.typed_data();
  drive(pool, x.typed_data(), M, K, N, std::min<int64_t>(K, 64), scales.typed_data(), out->typed_data(),
        [=](auto kMt, const float* xt, int64_t k0, int64_t k1, int64_t n0, int64_t nb, float* const* acc,
            float* const*) {
          int8_rows<decltype(kMt)::value>(xt, K, wp, N, n0, nb, k0, k1, acc);
        });
  return ffi::Error::Success();
}

ffi::Error Int4Common(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::U8>& w,
                      const float* sp, const float* offp, int64_t group, ffi::ResultBuffer<ffi::F32>& out) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  if (group <= 0 || group % 2 || K % group) return ffi::Error::InvalidArgument("int4: group must be even and divide K");
  const uint8_t* wp = w.typed_data();
  drive(pool, x.typed_data(), M, K, N, group, nullptr, out->typed_data(),
        [=](auto kMt, const float* xt, int64_t k0, int64_t k1, int64_t n0, int64_t nb, float* const* acc,
            float* const* part) {
          if (offp)
            int4_rows<false, decltype(kMt)::value>(xt, K, wp, N, sp, offp, group, n0, nb, k0, k1, acc, part);
          else
            int4_rows<true, decltype(kMt)::value>(xt, K, wp, N, sp, nullptr, group, n0, nb, k0, k1, acc, part);
        });
  return ffi::Error::Success();
}

ffi::Error Int4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out, int64_t group) {
  return Int4Common(pool, x, w, scales.typed_data(), nullptr, group, out);
}

ffi::Error Int4AsymMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                          ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> offsets,
                          ffi::ResultBuffer<ffi::F32> out, int64_t group) {
  return Int4Common(pool, x, w, scales.typed_data(), offsets.typed_data(), group, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt4Matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt4AsymMatmul, Int4AsymMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));
