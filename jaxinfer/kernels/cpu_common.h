// What the CPU kernels (quant_matmul/cpu.cc, paged_attention/cpu.cc) share: running tasks on
// XLA's intra-op threads, and the vector layer. Built with them into one library (see
// kernels/quant_matmul/cpu.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// The vector layer: 16 lanes with AVX-512, 8 with AVX2 + FMA, else none (plain loops only).
#if defined(__AVX512F__)
#define VW 16
using vf = __m512;
using vi = __m512i;
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vs8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline vi vu8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline vf vcvt(vi v) { return _mm512_cvtepi32_ps(v); }
static inline vi vsll(vi v, int n) { return _mm512_slli_epi32(v, n); }
static inline vi vsra(vi v, int n) { return _mm512_srai_epi32(v, n); }
static inline vi vsrl(vi v, int n) { return _mm512_srli_epi32(v, n); }
static inline vi vand15(vi v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
using vf = __m256;
using vi = __m256i;
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vs8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline vi vu8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
static inline vf vcvt(vi v) { return _mm256_cvtepi32_ps(v); }
static inline vi vsll(vi v, int n) { return _mm256_slli_epi32(v, n); }
static inline vi vsra(vi v, int n) { return _mm256_srai_epi32(v, n); }
static inline vi vsrl(vi v, int n) { return _mm256_srli_epi32(v, n); }
static inline vi vand15(vi v) { return _mm256_and_si256(v, _mm256_set1_epi32(15)); }
#else
#define VW 0
#endif

// Row helpers over n floats: the dot product, y += a * x, y *= a.
static inline float vdot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if VW
  vf acc = vset1(0.f);
  for (; i + VW <= n; i += VW) acc = vfma(vload(a + i), vload(b + i), acc);
  float lanes[VW];
  vstore(lanes, acc);
  for (int j = 0; j < VW; ++j) sum += lanes[j];
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

static inline void vaxpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if VW
  const vf av = vset1(a);
  for (; i + VW <= n; i += VW) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

static inline void vscale(float* y, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

}  // namespace
