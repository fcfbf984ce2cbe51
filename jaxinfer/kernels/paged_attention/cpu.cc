// Paged attention on the CPU as an XLA FFI custom call (see cpu.py; reference.py is the
// specification, and its contract holds here: mixed batches of T query slots a row, GQA, sliding
// window, soft cap, float32 / int8 / fp8 e4m3 pages with scales, and slots past kv_lens never read).
//
// The jnp reference gathers every page of every row into a [B, S, K, H] copy, transposes it and
// multiplies small batched matrices; on the CPU the gather and the transposes cost as much as the
// products. Here one task per (row, kv head) walks that row's block table and reads each page in
// place: a page's C positions are scored against the task's T * G queries, then folded into each
// query's running softmax (max, sum, weighted sum of V: the online softmax of flash attention),
// so K and V are read once a step and nothing of size S is written. Quantized pages are widened
// (times their scales) a page at a time into a per-thread buffer.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../cpu_common.h"

namespace {

// float8 e4m3fn -> float32: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7f /
// 0xff are NaN.
struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float x = e == 0 ? std::ldexp(m / 8.f, -6) : std::ldexp(1.f + m / 8.f, e - 7);
      if (e == 15 && m == 7) x = std::numeric_limits<float>::quiet_NaN();
      v[b] = b & 128 ? -x : x;
    }
  }
};
static const E4m3Table kE4m3;

enum class Pages { kF32, kS8, kE4m3 };

// Rows [0, n) of one page (C x H, contiguous) as float32: float pages in place, quantized ones
// widened times their per-position scales into buf.
template <Pages kind>
static inline const float* page_rows(const void* pages, const float* scales, int64_t offset, int64_t n, int64_t h,
                                     float* buf) {
  if constexpr (kind == Pages::kF32) {
    return static_cast<const float*>(pages) + offset * h;
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const float s = scales[offset + c];
      float* dst = buf + c * h;
      if constexpr (kind == Pages::kS8) {
        const int8_t* src = static_cast<const int8_t*>(pages) + (offset + c) * h;
        for (int64_t i = 0; i < h; ++i) dst[i] = static_cast<float>(src[i]) * s;
      } else {
        const uint8_t* src = static_cast<const uint8_t*>(pages) + (offset + c) * h;
        for (int64_t i = 0; i < h; ++i) dst[i] = kE4m3.v[src[i]] * s;
      }
    }
    return buf;
  }
}

struct Shape {
  int64_t B, T, N, H, K, P, C, W;
};

template <Pages kind>
ffi::Error attend(ffi::ThreadPool& pool, const Shape& d, const float* q, const void* kp, const void* vp,
                  const float* ks, const float* vs, const int32_t* table, const int32_t* lens, const int32_t* qpos,
                  int64_t window, float soft_cap, float* out) {
  const int64_t G = d.N / d.K, R = d.T * G, H = d.H, C = d.C;
  const float inv_sqrt_h = 1.f / std::sqrt(static_cast<float>(H));
  std::atomic<bool> bad_page{false};
  parallel_tasks(pool, d.B * d.K, [&, G, R, H, C](int64_t task) {
    const int64_t b = task / d.K, kh = task % d.K;
    const int64_t len = std::min<int64_t>(lens[b], d.W * C);
    thread_local std::vector<float> scratch;
    const int64_t need = R * (H + 2) + 2 * C * H + C;
    if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
    float* acc = scratch.data();   // [R, H] weighted sums of V
    float* mx = acc + R * H;       // [R] running max score
    float* sum = mx + R;           // [R] running sum of exp(score - max)
    float* kbuf = sum + R;         // [C, H] widened K page
    float* vbuf = kbuf + C * H;    // [C, H] widened V page
    float* p = vbuf + C * H;       // [C] one query's weights over the page
    std::fill(acc, acc + R * H, 0.f);
    std::fill(mx, mx + R, -std::numeric_limits<float>::infinity());
    std::fill(sum, sum + R, 0.f);
    // kv positions any query of the row can see: [lo, hi)
    int64_t lo = len, hi = 0;
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t pos = qpos[b * d.T + t];
      const int64_t h_t = std::min<int64_t>(len, pos + 1), l_t = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      if (l_t < h_t) lo = std::min(lo, l_t), hi = std::max(hi, h_t);
    }
    for (int64_t pg = lo / C; pg * C < hi; ++pg) {
      const int64_t page = table[b * d.W + pg];
      if (page < 0 || page >= d.P) {
        bad_page = true;
        return;
      }
      const int64_t s0 = pg * C, n = std::min<int64_t>(C, len - s0);
      const int64_t offset = (kh * d.P + page) * C;  // position index into [K, P, C]
      const float* kr = page_rows<kind>(kp, ks, offset, n, H, kbuf);
      const float* vr = page_rows<kind>(vp, vs, offset, n, H, vbuf);
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t pos = qpos[b * d.T + t];
        const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        const int64_t c0 = std::max<int64_t>(0, first - s0), c1 = std::min<int64_t>(n, pos + 1 - s0);
        if (c0 >= c1) continue;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = t * G + g;
          const float* qr = q + ((b * d.T + t) * d.N + kh * G + g) * H;
          float m = mx[r];
          for (int64_t c = c0; c < c1; ++c) {
            float sc = vdot(qr, kr + c * H, H) * inv_sqrt_h;
            if (soft_cap > 0.f) sc = soft_cap * std::tanh(sc / soft_cap);
            p[c] = sc;
            m = std::max(m, sc);
          }
          const float alpha = std::exp(mx[r] - m);  // exp(-inf) = 0 on the first visible page
          float* ar = acc + r * H;
          if (alpha != 1.f) vscale(ar, alpha, H);
          float s = sum[r] * alpha;
          for (int64_t c = c0; c < c1; ++c) {
            const float w = std::exp(p[c] - m);
            s += w;
            vaxpy(w, vr + c * H, ar, H);
          }
          sum[r] = s, mx[r] = m;
        }
      }
    }
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g;
        float* o = out + ((b * d.T + t) * d.N + kh * G + g) * H;
        const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;  // a query that sees nothing: zeros
        for (int64_t i = 0; i < H; ++i) o[i] = acc[r * H + i] * inv;
      }
  });
  if (bad_page) return ffi::Error::InvalidArgument("paged attention: a block table entry is not a page of the cache");
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                          ffi::AnyBuffer v_pages, ffi::Buffer<ffi::F32> k_scales, ffi::Buffer<ffi::F32> v_scales,
                          ffi::Buffer<ffi::S32> block_table, ffi::Buffer<ffi::S32> kv_lens,
                          ffi::Buffer<ffi::S32> q_positions, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> out, int64_t sliding_window, float soft_cap) {
  // pages [L, K, P, C, H] (scales [L, K, P, C] if quantized): the layer's are read in place
  const auto qd = q.dimensions(), kd = k_pages.dimensions();
  const Shape d{qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], kd[3], block_table.dimensions()[1]};
  if (d.N % d.K) return ffi::Error::InvalidArgument("paged attention: query heads must be a multiple of kv heads");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= kd[0]) return ffi::Error::InvalidArgument("paged attention: layer index out of range");
  const int64_t positions = d.K * d.P * d.C, width = ffi::ByteWidth(k_pages.element_type());
  const bool quantized = k_pages.element_type() != ffi::DataType::F32;
  const char* kp = static_cast<const char*>(k_pages.untyped_data()) + l * positions * d.H * width;
  const char* vp = static_cast<const char*>(v_pages.untyped_data()) + l * positions * d.H * width;
  const float* ks = quantized ? k_scales.typed_data() + l * positions : nullptr;
  const float* vs = quantized ? v_scales.typed_data() + l * positions : nullptr;
  auto run = [&](auto kind) {
    return attend<decltype(kind)::value>(pool, d, q.typed_data(), kp, vp, ks, vs, block_table.typed_data(),
                                         kv_lens.typed_data(), q_positions.typed_data(), sliding_window, soft_cap,
                                         out->typed_data());
  };
  switch (k_pages.element_type()) {
    case ffi::DataType::F32: return run(std::integral_constant<Pages, Pages::kF32>());
    case ffi::DataType::S8: return run(std::integral_constant<Pages, Pages::kS8>());
    case ffi::DataType::F8E4M3FN: return run(std::integral_constant<Pages, Pages::kE4m3>());
    default: return ffi::Error::InvalidArgument("paged attention: pages must be float32, int8 or float8_e4m3fn");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
