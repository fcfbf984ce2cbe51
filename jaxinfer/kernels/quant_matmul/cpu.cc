// x @ W on the CPU as XLA FFI custom calls, for quantized W (int8, int4) and float32 W (see cpu.py,
// which builds this file with the machine's C++ compiler on first use; reference.py is the
// specification).
//
// XLA's CPU backend has no matrix-vector product that reads int8 weights: its int8 dot is a
// scalar loop at M = 1 and its fused convert-multiply-reduce costs ~0.2 ms a call (both measured by
// experiments/quant_gemv.py). These kernels stream each weight byte once per call. Rows of W are
// contiguous in memory, so a task walks whole rows (or blocks of NB columns of wider ones): the K
// axis is cut into ranges, one task per (range, column block), shared out to XLA's intra-op
// threads, each writing partial sums the caller adds. A task loads four rows of W at a time
// (widening int8 / int4 to float32) and each loaded vector serves up to MT rows of x; larger M
// makes more passes. For float32 W the same loops beat XLA's dot at a few rows of x, where XLA
// reads W once per row.
// AVX-512 or AVX2 + FMA where the compiler targets them (-march), else plain loops.
//
// Layouts are reference.py's: int8 values [K, N] with scales [1, N]; int4 values [K/2, N] (even k
// in the low nibble, odd k in the high; signed, or unsigned with offsets), scales and offsets
// [K/group, N]; float32 W [K, N].

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu_common.h"

namespace {

constexpr int64_t NB = 8192;  // columns per task: whole rows where N <= NB (contiguous streams)
constexpr int64_t MT = 4;     // rows of x per pass over a block (MT x NB floats of accumulator)

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

// Four k-rows of W at columns [j, j + VW) (or one column j) as float32: the loaders.
struct F32Rows {
  const float* r[4];
#if VW
  void load(int64_t j, vf* w) const { for (int u = 0; u < 4; ++u) w[u] = vload(r[u] + j); }
#endif
  void load1(int64_t j, float* w) const { for (int u = 0; u < 4; ++u) w[u] = r[u][j]; }
};
struct S8Rows {
  const int8_t* r[4];
#if VW
  void load(int64_t j, vf* w) const { for (int u = 0; u < 4; ++u) w[u] = vs8(r[u] + j); }
#endif
  void load1(int64_t j, float* w) const { for (int u = 0; u < 4; ++u) w[u] = static_cast<float>(r[u][j]); }
};
template <bool kSigned>  // two packed rows: k, k + 1 from r[0]'s low and high nibbles, k + 2, k + 3 from r[1]'s
struct U4Rows {
  const uint8_t* r[2];
#if VW
  void load(int64_t j, vf* w) const {
    for (int u = 0; u < 2; ++u) {
      const vi v = vu8(r[u] + j);
      w[2 * u] = vcvt(kSigned ? vsra(vsll(v, 28), 28) : vand15(v));
      w[2 * u + 1] = vcvt(kSigned ? vsra(vsll(v, 24), 28) : vsrl(v, 4));
    }
  }
#endif
  void load1(int64_t j, float* w) const {
    for (int u = 0; u < 2; ++u) {
      const uint8_t v = r[u][j];
      w[2 * u] = kSigned ? static_cast<float>(static_cast<int8_t>(v << 4) >> 4) : static_cast<float>(v & 15);
      w[2 * u + 1] = kSigned ? static_cast<float>(static_cast<int8_t>(v) >> 4) : static_cast<float>(v >> 4);
    }
  }
};

// acc[m][j] += sum_u xs[m][u] * w_u[j] for m < kMt, j < nb: each loaded (widened) vector of W
// serves all kMt rows of x, so W is read and converted once per pass.
template <int64_t kMt, typename Rows>
static inline void accumulate4(float* const* acc, const float (*xs)[4], const Rows& rows, int64_t nb) {
  int64_t j = 0;
#if VW
  vf xv[kMt][4];
  for (int64_t m = 0; m < kMt; ++m)
    for (int u = 0; u < 4; ++u) xv[m][u] = vset1(xs[m][u]);
  for (; j + VW <= nb; j += VW) {
    vf w[4];
    rows.load(j, w);
    for (int64_t m = 0; m < kMt; ++m) {
      vf a = vload(acc[m] + j);
      a = vfma(xv[m][0], w[0], a);
      a = vfma(xv[m][1], w[1], a);
      a = vfma(xv[m][2], w[2], a);
      a = vfma(xv[m][3], w[3], a);
      vstore(acc[m] + j, a);
    }
  }
#endif
  for (; j < nb; ++j) {
    float w[4];
    rows.load1(j, w);
    for (int64_t m = 0; m < kMt; ++m) acc[m][j] += xs[m][0] * w[0] + xs[m][1] * w[1] + xs[m][2] * w[2] + xs[m][3] * w[3];
  }
}

// acc[m][j] += sum over k in [k0, k1) of x[m, k] * w[k, n0 + j], j < nb, four rows of W at a
// time (float32 or int8 W; a missing fourth row reads zeros against x = 0).
template <int64_t kMt, typename T, typename Rows>
inline void dense_rows(const float* x, int64_t K, const T* w, int64_t N, int64_t n0, int64_t nb, int64_t k0,
                       int64_t k1, float* const* acc) {
  static const T zeros[NB] = {};
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t ku = std::min<int64_t>(4, k1 - k);
    Rows rows;
    float xs[kMt][4];
    for (int64_t u = 0; u < 4; ++u) {
      rows.r[u] = u < ku ? w + (k + u) * N + n0 : zeros;
      for (int64_t m = 0; m < kMt; ++m) xs[m][u] = u < ku ? x[m * K + k + u] : 0.f;
    }
    accumulate4<kMt>(acc, xs, rows, nb);
  }
}

// int4: per group, the group's packed rows accumulate into part; then the group's scale (and
// offset x the group's sum of x) folds into acc.
template <bool kSigned, int64_t kMt>
void int4_rows(const float* x, int64_t K, const uint8_t* w, int64_t N, const float* scales,
               const float* offsets, int64_t group, int64_t n0, int64_t nb, int64_t k0, int64_t k1,
               float* const* acc, float* const* part) {
  static const uint8_t zeros[NB] = {};
  for (int64_t g0 = k0; g0 < k1; g0 += group) {
    for (int64_t m = 0; m < kMt; ++m) std::memset(part[m], 0, nb * sizeof(float));
    const int64_t end = (g0 + group) / 2;  // packed rows of this group: [g0 / 2, end)
    for (int64_t kk = g0 / 2; kk < end; kk += 2) {
      const bool two = kk + 1 < end;
      U4Rows<kSigned> rows{{w + kk * N + n0, two ? w + (kk + 1) * N + n0 : zeros}};
      float xs[kMt][4];
      for (int64_t m = 0; m < kMt; ++m)
        for (int64_t u = 0; u < 4; ++u) xs[m][u] = u < 2 || two ? x[m * K + 2 * kk + u] : 0.f;
      accumulate4<kMt>(part, xs, rows, nb);
    }
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

// This thread's scratch buffer `which` (0: the caller's partial sums, 1: a task's accumulators),
// at least n floats, kept from call to call: a fresh allocation per call maps fresh pages, and
// the kernel zeroing them cost more than the matmul (perf: clear_page at M = 4).
static float* buffer(int which, int64_t n) {
  thread_local std::vector<float> buffers[2];
  std::vector<float>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// Shared driver: rows(kMt, x_tile, k0, k1, n0, nb, acc, part) accumulates one tile; the summed
// result is then multiplied by col_scale if given (int8: the channel scale; int4 applies its
// scales per group inside rows and passes none).
template <typename Rows>
void drive(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N, int64_t unit,
           const float* col_scale, float* out, Rows rows) {
  const Plan plan(K, N, unit, pool.num_threads());
  float* dst = plan.splits > 1 ? buffer(0, plan.splits * M * N) : out;
  const float* partial = dst;
  parallel_tasks(pool, plan.splits * plan.blocks, [=, &plan](int64_t t) {
    const int64_t split = t / plan.blocks, b = t % plan.blocks;
    const int64_t n0 = b * NB, nb = std::min(NB, N - n0);
    const int64_t k0 = split * plan.unit_rows, k1 = std::min(K, k0 + plan.unit_rows);
    float* d = dst + split * M * N;
    float* scratch = buffer(1, 2 * MT * nb);  // accumulators, and int4's per-group partial sums
    float *acc[MT], *part[MT];
    for (int64_t m = 0; m < MT; ++m) acc[m] = scratch + m * nb, part[m] = acc[m] + MT * nb;
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int64_t mt = std::min(MT, M - m0);
      std::fill(scratch, scratch + MT * nb, 0.f);
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

// The blocked path, for many rows of x (M > MT; `rows_blocked` in cpu.py says when): the streaming
// loops above make M / MT passes over W, each reading and widening it again, and keep their sums
// in memory. Here each task owns a block of NC columns; per KC rows of K it widens (int8 / int4:
// dequantizes) that block of W once into a float panel, then multiplies every row of x against
// it with an MR x NR register tile (the sums stay in registers across the KC rows), the classic
// GEMM micro-kernel without packing x. Summation order differs from the streaming loops; both are
// float32 sums of the same products.
constexpr int64_t KC = 256;  // rows of K per panel (KC x NC floats: 128 KiB, inside L2)
constexpr int64_t NC = 128;  // columns per task
constexpr int64_t MR = 6;    // rows of x per register tile
#if VW
constexpr int64_t NR = 2 * VW;  // columns per register tile: two vectors
#else
constexpr int64_t NR = 8;
#endif

// c[m][0, NR) += sum_k a[m * lda + k] * panel[k * NR_stride + j] for k < kc: one register tile.
template <int64_t kMr>
static inline void tile(const float* a, int64_t lda, const float* panel, int64_t ldp, int64_t kc, float* c,
                        int64_t ldc, int64_t ncols, bool first) {
#if VW
  vf acc[kMr][2];
  for (int64_t m = 0; m < kMr; ++m) acc[m][0] = acc[m][1] = vset1(0.f);
  for (int64_t k = 0; k < kc; ++k) {
    const vf w0 = vload(panel + k * ldp), w1 = vload(panel + k * ldp + VW);
    for (int64_t m = 0; m < kMr; ++m) {
      const vf xv = vset1(a[m * lda + k]);
      acc[m][0] = vfma(xv, w0, acc[m][0]);
      acc[m][1] = vfma(xv, w1, acc[m][1]);
    }
  }
  float tmp[NR];
  for (int64_t m = 0; m < kMr; ++m) {
    vstore(tmp, acc[m][0]);
    vstore(tmp + VW, acc[m][1]);
    float* cm = c + m * ldc;
    for (int64_t j = 0; j < ncols; ++j) cm[j] = first ? tmp[j] : cm[j] + tmp[j];
  }
#else
  float acc[kMr][NR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t m = 0; m < kMr; ++m)
      for (int64_t j = 0; j < NR; ++j) acc[m][j] += a[m * lda + k] * panel[k * ldp + j];
  for (int64_t m = 0; m < kMr; ++m)
    for (int64_t j = 0; j < ncols; ++j) c[m * ldc + j] = first ? acc[m][j] : c[m * ldc + j] + acc[m][j];
#endif
}

template <typename F>
inline void by_tile_rows(int64_t mr, F f) {  // f(std::integral_constant<int64_t, mr>) for mr in 1..MR
  switch (mr) {
    case 1: return f(std::integral_constant<int64_t, 1>());
    case 2: return f(std::integral_constant<int64_t, 2>());
    case 3: return f(std::integral_constant<int64_t, 3>());
    case 4: return f(std::integral_constant<int64_t, 4>());
    case 5: return f(std::integral_constant<int64_t, 5>());
    default: return f(std::integral_constant<int64_t, 6>());
  }
}

// widen(k0, kc, n0, nb, panel, ldp) writes W[k0 : k0 + kc, n0 : n0 + nb] as float32 (dequantized)
// into panel rows of ldp floats; columns nb..ldp are zero.
template <typename Widen>
void drive_blocked(ffi::ThreadPool& pool, const float* x, int64_t M, int64_t K, int64_t N, int64_t unit, float* out,
                   Widen widen) {
  const int64_t kc_step = std::max<int64_t>(unit, KC / unit * unit);
  const int64_t blocks = (N + NC - 1) / NC;
  parallel_tasks(pool, blocks, [=](int64_t b) {
    const int64_t n0 = b * NC, nb = std::min(NC, N - n0), ldp = (nb + NR - 1) / NR * NR;
    float* panel = buffer(1, kc_step * ldp);
    for (int64_t k0 = 0; k0 < K; k0 += kc_step) {
      const int64_t kc = std::min(kc_step, K - k0);
      widen(k0, kc, n0, nb, panel, ldp);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t mr = std::min(MR, M - m0);
        for (int64_t j0 = 0; j0 < nb; j0 += NR)
          by_tile_rows(mr, [&](auto kMr) {
            tile<decltype(kMr)::value>(x + m0 * K + k0, K, panel + j0, ldp, kc, out + m0 * N + n0 + j0, N,
                                       std::min(NR, nb - j0), k0 == 0);
          });
      }
    }
  });
}

// Widening int8 / float32 W (times the channel scale, if any) into a panel.
template <typename T>
void widen_dense(const T* w, int64_t N, const float* col_scale, int64_t k0, int64_t kc, int64_t n0, int64_t nb,
                 float* panel, int64_t ldp) {
  for (int64_t k = 0; k < kc; ++k) {
    const T* src = w + (k0 + k) * N + n0;
    float* dst = panel + k * ldp;
    if (col_scale) {
      for (int64_t j = 0; j < nb; ++j) dst[j] = static_cast<float>(src[j]) * col_scale[n0 + j];
    } else {
      for (int64_t j = 0; j < nb; ++j) dst[j] = static_cast<float>(src[j]);
    }
    for (int64_t j = nb; j < ldp; ++j) dst[j] = 0.f;
  }
}

// Widening packed int4 W (scales, and offsets if asymmetric, per group of rows) into a panel.
template <bool kSigned>
void widen_int4(const uint8_t* w, int64_t N, const float* scales, const float* offsets, int64_t group, int64_t k0,
                int64_t kc, int64_t n0, int64_t nb, float* panel, int64_t ldp) {
  for (int64_t k = 0; k < kc; ++k) {
    const int64_t kk = k0 + k, g = kk / group;
    const uint8_t* src = w + (kk / 2) * N + n0;
    const float* s = scales + g * N + n0;
    const float* o = offsets ? offsets + g * N + n0 : nullptr;
    float* dst = panel + k * ldp;
    const int shift = (kk & 1) * 4;
    for (int64_t j = 0; j < nb; ++j) {
      const uint8_t v = src[j];
      const float q = kSigned ? static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(v << (4 - shift))) >> 4)
                              : static_cast<float>((v >> shift) & 15);
      dst[j] = o ? q * s[j] + o[j] : q * s[j];
    }
    for (int64_t j = nb; j < ldp; ++j) dst[j] = 0.f;
  }
}

// int8 and float32 W: four rows of W at a time (Rows loads and widens them), then int8's channel
// scales (col_scale; none for float32).
template <typename Rows, typename T>
void dense_matmul(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const T* wp, int64_t N, const float* col_scale,
                  ffi::ResultBuffer<ffi::F32>& out) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  if (M > MT) {
    drive_blocked(pool, x.typed_data(), M, K, N, 1, out->typed_data(),
                  [=](int64_t k0, int64_t kc, int64_t n0, int64_t nb, float* panel, int64_t ldp) {
                    widen_dense(wp, N, col_scale, k0, kc, n0, nb, panel, ldp);
                  });
    return;
  }
  drive(pool, x.typed_data(), M, K, N, std::min<int64_t>(K, 64), col_scale, out->typed_data(),
        [=](auto kMt, const float* xt, int64_t k0, int64_t k1, int64_t n0, int64_t nb, float* const* acc,
            float* const*) { dense_rows<decltype(kMt)::value, T, Rows>(xt, K, wp, N, n0, nb, k0, k1, acc); });
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out) {
  dense_matmul<S8Rows>(pool, x, w.typed_data(), w.dimensions()[1], scales.typed_data(), out);
  return ffi::Error::Success();
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> out) {
  dense_matmul<F32Rows>(pool, x, w.typed_data(), w.dimensions()[1], nullptr, out);
  return ffi::Error::Success();
}

ffi::Error Int4Common(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::U8>& w,
                      const float* sp, const float* offp, int64_t group, ffi::ResultBuffer<ffi::F32>& out) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  if (group <= 0 || group % 2 || K % group) return ffi::Error::InvalidArgument("int4: group must be even and divide K");
  const uint8_t* wp = w.typed_data();
  if (M > MT) {
    drive_blocked(pool, x.typed_data(), M, K, N, group, out->typed_data(),
                  [=](int64_t k0, int64_t kc, int64_t n0, int64_t nb, float* panel, int64_t ldp) {
                    if (offp)
                      widen_int4<false>(wp, N, sp, offp, group, k0, kc, n0, nb, panel, ldp);
                    else
                      widen_int4<true>(wp, N, sp, nullptr, group, k0, kc, n0, nb, panel, ldp);
                  });
    return ffi::Error::Success();
  }
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

// W8A8: int8 x [M, K] times int8 W [K, N] with exact int32 sums (cpu.py quantizes x per row and
// applies both scales after, as reference.py does, so the result equals the reference's bit for
// bit). AVX-512 VNNI's vpdpbusd multiplies 64 unsigned x signed byte pairs and adds each four into
// an int32 lane: 4x the multiplies of a float32 FMA an instruction. Its unsigned operand is W with
// the sign bit flipped (W + 128) and its signed one x, so the sums carry 128 * sum(x[m]) extra,
// subtracted at the end (one number a row). A lane needs four consecutive k of one column, so W's
// rows are interleaved four at a time as they are read (the stored layout is unchanged):
// - up to MT rows of x (decode): whole rows of W streamed as the other kernels do, 4 x 64 bytes
//   interleaved in registers, the sums kept in L1 in that interleaved column order and put back
//   in order at the end;
// - more rows: the blocked structure above over int8 panels [KC / 4][NC][4] each task packs.
// Without VNNI, plain loops compute the same sums in plain column order.
#if defined(__AVX512VNNI__) && VW == 16
#define S8_VNNI 1
#else
#define S8_VNNI 0
#endif
constexpr int64_t S8_KC = 512;  // rows of K per int8 panel (S8_KC x NC bytes: 64 KiB)
constexpr int64_t S8_NR = 32;   // columns per int8 register tile
constexpr int64_t S8_STRIP = 64;  // columns a streaming step interleaves (four vectors of 16 lanes)

// 4 rows x 64 bytes of W (r[b] + j) as four vectors of 16 int32 lanes of four (W + 128) bytes: lane
// i of vector s holds column j + 16 * (i / 4) + 4 * s + i % 4 (the byte unpacks work per 128-bit lane).
#if S8_VNNI
static inline void interleave4(const int8_t* const* r, int64_t j, __m512i* u) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i a[4];
  for (int b = 0; b < 4; ++b) a[b] = _mm512_xor_si512(_mm512_loadu_si512(r[b] + j), flip);
  const __m512i t0 = _mm512_unpacklo_epi8(a[0], a[1]), t1 = _mm512_unpackhi_epi8(a[0], a[1]);
  const __m512i t2 = _mm512_unpacklo_epi8(a[2], a[3]), t3 = _mm512_unpackhi_epi8(a[2], a[3]);
  u[0] = _mm512_unpacklo_epi16(t0, t2), u[1] = _mm512_unpackhi_epi16(t0, t2);
  u[2] = _mm512_unpacklo_epi16(t1, t3), u[3] = _mm512_unpackhi_epi16(t1, t3);
}
#endif

// The column a streamed sum at position p of a strip belongs to (see interleave4).
static inline int64_t strip_column(int64_t p) {
  return S8_VNNI ? 16 * ((p % 16) / 4) + 4 * (p / 16) + p % 4 : p;
}

// acc[m * nb + j] = sum over k in [k0, k1) of x[m, k] * (W[k, n0 + j] + 128), k stepping by four
// (x padded with zeros to a multiple of four), for kMt rows of x: full strips in strip order.
template <int64_t kMt>
static void s8_rows(const int8_t* x, int64_t ldx, const int8_t* w, int64_t K, int64_t N, int64_t n0, int64_t nb,
                    int64_t k0, int64_t k1, int32_t* acc) {
  static const int8_t zeros[NB] = {};
  std::fill(acc, acc + kMt * nb, 0);
  for (int64_t k = k0; k < k1; k += 4) {
    const int8_t* r[4];
    for (int b = 0; b < 4; ++b) r[b] = k + b < K ? w + (k + b) * N + n0 : zeros;
    int64_t j = 0;
#if S8_VNNI
    __m512i xv[kMt];
    for (int64_t m = 0; m < kMt; ++m) {
      int32_t four;
      std::memcpy(&four, x + m * ldx + k, 4);
      xv[m] = _mm512_set1_epi32(four);
    }
    for (; j + S8_STRIP <= nb; j += S8_STRIP) {
      __m512i u[4];
      interleave4(r, j, u);
      for (int64_t m = 0; m < kMt; ++m)
        for (int v = 0; v < 4; ++v) {
          int32_t* a = acc + m * nb + j + 16 * v;
          _mm512_storeu_si512(a, _mm512_dpbusd_epi32(_mm512_loadu_si512(a), u[v], xv[m]));
        }
    }
#endif
    for (; j < nb; ++j)
      for (int64_t m = 0; m < kMt; ++m) {
        int32_t sum = 0;
        for (int b = 0; b < 4; ++b) sum += int32_t(x[m * ldx + k + b]) * (int32_t(r[b][j]) + 128);
        acc[m * nb + j] += sum;
      }
  }
}

// Packs W[k0 : k0 + kc, n0 : n0 + nb] + 128 into panel[(g * ldp + j) * 4 + b] = W[k0 + 4g + b, n0 + j]
// + 128 (128, i.e. W = 0, past K and past nb).
static void pack_s8(const int8_t* w, int64_t K, int64_t N, int64_t k0, int64_t kc, int64_t n0, int64_t nb,
                    uint8_t* panel, int64_t ldp) {
  static const int8_t zeros[NC] = {};
  for (int64_t g = 0; g < kc / 4; ++g) {
    const int8_t* r[4];
    for (int b = 0; b < 4; ++b) r[b] = k0 + 4 * g + b < K ? w + (k0 + 4 * g + b) * N + n0 : zeros;
    uint8_t* dst = panel + g * ldp * 4;
    int64_t j = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
    for (; j + 16 <= nb; j += 16) {  // 4 rows x 16 columns -> 16 columns x 4 rows
      __m128i a[4];
      for (int b = 0; b < 4; ++b) a[b] = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[b] + j)), flip);
      const __m128i t0 = _mm_unpacklo_epi8(a[0], a[1]), t1 = _mm_unpackhi_epi8(a[0], a[1]);
      const __m128i t2 = _mm_unpacklo_epi8(a[2], a[3]), t3 = _mm_unpackhi_epi8(a[2], a[3]);
      __m128i* out = reinterpret_cast<__m128i*>(dst + j * 4);
      _mm_storeu_si128(out, _mm_unpacklo_epi16(t0, t2));
      _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(t0, t2));
      _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(t1, t3));
      _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(t1, t3));
    }
#endif
    for (; j < nb; ++j)
      for (int b = 0; b < 4; ++b) dst[j * 4 + b] = static_cast<uint8_t>(r[b][j] + 128);
    for (j = nb; j < ldp; ++j)
      for (int b = 0; b < 4; ++b) dst[j * 4 + b] = 128;
  }
}

// c[m][0, ncols) (+)= sum over the panel's groups of x[m] . panel: one register tile of kMr rows
// x S8_NR columns (two vectors of int32 lanes).
template <int64_t kMr>
static inline void tile_s8(const int8_t* x, int64_t ldx, const uint8_t* panel, int64_t ldp, int64_t groups,
                           int32_t* c, int64_t ldc, int64_t ncols, bool first) {
#if S8_VNNI
  __m512i acc[kMr][2];
  for (int64_t m = 0; m < kMr; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i w0 = _mm512_loadu_si512(panel + g * ldp * 4), w1 = _mm512_loadu_si512(panel + g * ldp * 4 + 64);
    for (int64_t m = 0; m < kMr; ++m) {
      int32_t four;
      std::memcpy(&four, x + m * ldx + 4 * g, 4);
      const __m512i xv = _mm512_set1_epi32(four);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xv);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xv);
    }
  }
  int32_t tmp[S8_NR];
  for (int64_t m = 0; m < kMr; ++m) {
    _mm512_storeu_si512(tmp, acc[m][0]);
    _mm512_storeu_si512(tmp + 16, acc[m][1]);
    int32_t* cm = c + m * ldc;
    for (int64_t j = 0; j < ncols; ++j) cm[j] = first ? tmp[j] : cm[j] + tmp[j];
  }
#else
  for (int64_t m = 0; m < kMr; ++m)
    for (int64_t j = 0; j < ncols; ++j) {
      int32_t sum = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int b = 0; b < 4; ++b) sum += int32_t(x[m * ldx + 4 * g + b]) * panel[(g * ldp + j) * 4 + b];
      c[m * ldc + j] = first ? sum : c[m * ldc + j] + sum;
    }
#endif
}

// Up to MT rows: (K range, column block) tasks as in drive(), int32 partial sums per K range,
// added and put back in column order by the caller.
static void s8_stream(ffi::ThreadPool& pool, const int8_t* x, int64_t M, int64_t K4, const int8_t* w, int64_t K,
                      int64_t N, int32_t* out) {
  const Plan plan(K4, N, 4, pool.num_threads());
  thread_local std::vector<int32_t> partial_buf;
  if (static_cast<int64_t>(partial_buf.size()) < plan.splits * M * N) partial_buf.resize(plan.splits * M * N);
  int32_t* partial = partial_buf.data();
  parallel_tasks(pool, plan.splits * plan.blocks, [=, &plan](int64_t t) {
    const int64_t split = t / plan.blocks, n0 = (t % plan.blocks) * NB, nb = std::min(NB, N - n0);
    const int64_t k0 = split * plan.unit_rows, k1 = std::min(K4, k0 + plan.unit_rows);
    int32_t* acc = partial + split * M * N + M * n0;  // this block's [M, nb]
    by_rows(M, [&](auto kMt) { s8_rows<decltype(kMt)::value>(x, K4, w, K, N, n0, nb, k0, k1, acc); });
  });
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nb = std::min(NB, N - n0), full = S8_VNNI ? nb / S8_STRIP * S8_STRIP : 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nb; ++j) {
        int32_t sum = 0;
        for (int64_t s = 0; s < plan.splits; ++s) sum += partial[s * M * N + M * n0 + m * nb + j];
        const int64_t col = j < full ? j / S8_STRIP * S8_STRIP + strip_column(j % S8_STRIP) : j;
        out[m * N + n0 + col] = sum;
      }
  }
}

ffi::Error S8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                    ffi::ResultBuffer<ffi::S32> out) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  const int64_t K4 = (K + 3) / 4 * 4;
  std::vector<int8_t> xpad(M * K4, 0);  // x with K padded to whole groups of four
  std::vector<int32_t> xsum(M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m] += xpad[m * K4 + k] = x.typed_data()[m * K + k];
  const int8_t* wp = w.typed_data();
  const int8_t* xp = xpad.data();
  int32_t* o = out->typed_data();
  if (M <= MT) {
    s8_stream(pool, xp, M, K4, wp, K, N, o);
  } else {
    parallel_tasks(pool, (N + NC - 1) / NC, [=](int64_t b) {
      const int64_t n0 = b * NC, nb = std::min(NC, N - n0), ldp = (nb + S8_NR - 1) / S8_NR * S8_NR;
      thread_local std::vector<uint8_t> panel_buf;
      if (static_cast<int64_t>(panel_buf.size()) < S8_KC * ldp) panel_buf.resize(S8_KC * ldp);
      uint8_t* panel = panel_buf.data();
      for (int64_t k0 = 0; k0 < K4; k0 += S8_KC) {
        const int64_t kc = std::min(S8_KC, K4 - k0);
        pack_s8(wp, K, N, k0, kc, n0, nb, panel, ldp);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int64_t mr = std::min(MR, M - m0);
          for (int64_t j0 = 0; j0 < nb; j0 += S8_NR)
            by_tile_rows(mr, [&](auto kMr) {
              tile_s8<decltype(kMr)::value>(xp + m0 * K4 + k0, K4, panel + j0 * 4, ldp, kc / 4, o + m0 * N + n0 + j0,
                                            N, std::min(S8_NR, nb - j0), k0 == 0);
            });
        }
      }
    });
  }
  for (int64_t m = 0; m < M; ++m)  // the sums hold (W + 128) . x
    for (int64_t n = 0; n < N; ++n) o[m * N + n] -= 128 * xsum[m];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferF32Matmul, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferS8Matmul, S8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
