// Int8 matmuls for the CPU, for quantization="int8" (weight-only) and "w8a8":
//
//   w8a16: y f32[M, N] = x bf16[M, K] @ W. Each run of weights widens exactly to bfloat16
//          once, in registers, and meets every row of x (vdpbf16ps); products are exact in
//          float32, so only the summation order differs from XLA's reference.
//   w8a8:  y s32[M, N] = x s8[M, K] @ W, exact. vpdpbusd multiplies unsigned by signed
//          bytes: x is offset by 128 into unsigned bytes, and 128 * the column sums of W
//          (summed by the same instruction against ones) are taken back off.
//
// Projections come packed in panels of 16 output channels (see the panel kernels below);
// a quantized LM head keeps the embedding table's rows (int8[N, K]) and runs the row kernel,
// four rows (weight streams) per pass with lane sums reduced at the end. Work is shared out
// over XLA's intra-op thread pool; the calling thread works too, so a busy pool cannot
// stall a call.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define XLASERVE_INT8_KERNELS 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kRowsPerPass = 4;  // output rows (weight streams) per pass
constexpr int kMaxRows = 4;      // rows of x per pass: 4 x 4 accumulators stay in registers

constexpr int64_t kPanel = 16;  // outputs per panel: one 512-bit vector of 32-bit sums

#if defined(XLASERVE_INT8_KERNELS)

// Sums of each of four vectors' 16 lanes, as the 4 lanes of one 128-bit vector.
inline __m128i sum4_epi32(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

inline __m128 sum4_ps(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512 u = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// 32 int8 weights -> 32 bfloat16 (exact: |w| <= 128 needs 8 significant bits).
inline __m512bh widen32(const int8_t* w) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w)));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// y[m, n0 + r] for Rows rows of x (bf16[Rows, K]) against the 4 weight rows at w.
template <int Rows>
void w8a16_rows(const uint16_t* x, const int8_t* w, int64_t K, float* y, int64_t N) {
  __m512 acc[Rows][kRowsPerPass];
  for (int m = 0; m < Rows; ++m)
    for (int r = 0; r < kRowsPerPass; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    for (int r = 0; r < kRowsPerPass; ++r) {
      __builtin_prefetch(w + r * K + k + 512);
      const __m512bh wv = widen32(w + r * K + k);
      for (int m = 0; m < Rows; ++m) {
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));
      }
    }
  }
  for (int m = 0; m < Rows; ++m) {
    _mm_storeu_ps(y + m * N, sum4_ps(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
  }
}

// Panel layout for projections (packed once at load): 16 output channels per panel, each
// panel contiguous over K, with the K-run a 32-bit lane consumes interleaved (w8a8: 4 bytes
// for vpdpbusd, int8[N / 16, K / 4, 64]; w8a16: 2 values for vdpbf16ps,
// int8[N / 16, K / 2, 32]). One broadcast of x then serves 16 outputs and no lanes need
// summing at the end. Two panels per pass: two weight streams, 32 outputs per broadcast.
template <int Rows>
void w8a8_panels(const uint8_t* xu, const int8_t* w, int64_t K, int32_t* y, int64_t N,
                 const int32_t* offset) {
  __m512i acc0[Rows], acc1[Rows];
  for (int m = 0; m < Rows; ++m) acc0[m] = acc1[m] = _mm512_setzero_si512();
  const int8_t* w1 = w + K * kPanel;
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(xu);
  for (int64_t kq = 0; kq < K / 4; ++kq) {
    __builtin_prefetch(w + (kq + 16) * 64);
    __builtin_prefetch(w1 + (kq + 16) * 64);
    const __m512i wv0 = _mm512_loadu_si512(w + kq * 64);
    const __m512i wv1 = _mm512_loadu_si512(w1 + kq * 64);
    for (int m = 0; m < Rows; ++m) {
      const __m512i xb = _mm512_set1_epi32(int(x32[m * (K / 4) + kq]));
      acc0[m] = _mm512_dpbusd_epi32(acc0[m], xb, wv0);
      acc1[m] = _mm512_dpbusd_epi32(acc1[m], xb, wv1);
    }
  }
  const __m512i off0 = _mm512_loadu_si512(offset), off1 = _mm512_loadu_si512(offset + kPanel);
  for (int m = 0; m < Rows; ++m) {
    _mm512_storeu_si512(y + m * N, _mm512_sub_epi32(acc0[m], off0));
    _mm512_storeu_si512(y + m * N + kPanel, _mm512_sub_epi32(acc1[m], off1));
  }
}

// 128 * the sum over K of each of the two panels' 32 outputs (the unsigned offset of x).
void panel_offsets(const int8_t* w, int64_t K, int32_t* offset) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
  const int8_t* w1 = w + K * kPanel;
  for (int64_t kq = 0; kq < K / 4; ++kq) {
    s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512(w + kq * 64));
    s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_loadu_si512(w1 + kq * 64));
  }
  _mm512_storeu_si512(offset, _mm512_slli_epi32(s0, 7));
  _mm512_storeu_si512(offset + kPanel, _mm512_slli_epi32(s1, 7));
}

// 16 outputs x 2 values of int8 -> 32 bfloat16 in the same order (exact).
inline __m512bh widen_pairs(const int8_t* w) { return widen32(w); }

template <int Rows>
void w8a16_panels(const uint16_t* x, const int8_t* w, int64_t K, float* y, int64_t N,
                  const int32_t*) {
  __m512 acc0[Rows], acc1[Rows];
  for (int m = 0; m < Rows; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  const int8_t* w1 = w + K * kPanel;
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __builtin_prefetch(w + (kp + 32) * 32);
    __builtin_prefetch(w1 + (kp + 32) * 32);
    const __m512bh wv0 = widen_pairs(w + kp * 32);
    const __m512bh wv1 = widen_pairs(w1 + kp * 32);
    for (int m = 0; m < Rows; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(x32[m * (K / 2) + kp]));
      acc0[m] = _mm512_dpbf16_ps(acc0[m], wv0, xb);
      acc1[m] = _mm512_dpbf16_ps(acc1[m], wv1, xb);
    }
  }
  for (int m = 0; m < Rows; ++m) {
    _mm512_storeu_ps(y + m * N, acc0[m]);
    _mm512_storeu_ps(y + m * N + kPanel, acc1[m]);
  }
}

constexpr int kPanelRows = 8;  // rows of x per panel pass (2 x 8 accumulators)

using RowsPass = void (*)(const uint16_t*, const int8_t*, int64_t, float*, int64_t);
constexpr RowsPass kW8A16Rows[kMaxRows + 1] = {
    nullptr, w8a16_rows<1>, w8a16_rows<2>, w8a16_rows<3>, w8a16_rows<4>};

template <typename X, typename Y>
using PanelPass = void (*)(const X*, const int8_t*, int64_t, Y*, int64_t, const int32_t*);
#define PANEL_PASSES(fn) {nullptr, fn<1>, fn<2>, fn<3>, fn<4>, fn<5>, fn<6>, fn<7>, fn<8>}
constexpr PanelPass<uint8_t, int32_t> kW8A8Panels[kPanelRows + 1] = PANEL_PASSES(w8a8_panels);
constexpr PanelPass<uint16_t, float> kW8A16Panels[kPanelRows + 1] = PANEL_PASSES(w8a16_panels);
#undef PANEL_PASSES

// Units of work (4 weight rows, or a pair of panels) claimed in contiguous chunks by the
// calling thread and XLA's intra-op pool.
struct Job {
  std::function<void(int64_t)> unit;
  int64_t units, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (;;) {
      const int64_t start = next.fetch_add(chunk);
      if (start >= units) return;
      const int64_t stop = std::min(units, start + chunk);
      for (int64_t u = start; u < stop; ++u) unit(u);
      done.fetch_add(stop - start, std::memory_order_release);
    }
  }
};

void run(ffi::ThreadPool& pool, int64_t units, std::function<void(int64_t)> unit) {
  auto job = std::make_shared<Job>();
  job->unit = std::move(unit);
  job->units = units;
  xlaserve_cpu::share_in_chunks(pool, job, units);
}
#endif

#if !defined(XLASERVE_INT8_KERNELS)
ffi::Error not_built() {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "int8_matmul needs AVX512-BF16 and VNNI");
}
#endif

// The head: x bf16[M, K] @ w int8[N, K]^T -> f32[M, N], weights as rows (N % 4, K % 32 == 0).
ffi::Error Int8RowsW8A16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S8> w,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[1] % 32 || wd[0] % kRowsPerPass) {
    return ffi::Error::InvalidArgument("int8 rows matmul: needs x[M, K], w[N, K], K % 32 == 0, "
                                       "N % 4 == 0");
  }
#if defined(XLASERVE_INT8_KERNELS)
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.typed_data());
  const int8_t* wb = w.typed_data();
  float* yb = y->typed_data();
  run(pool, N / kRowsPerPass, [=](int64_t u) {
    const int64_t n = u * kRowsPerPass;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      kW8A16Rows[std::min<int64_t>(kMaxRows, M - m0)](xb + m0 * K, wb + n * K, K,
                                                     yb + m0 * N + n, N);
    }
  });
  return ffi::Error::Success();
#else
  return not_built();
#endif
}

// Projections: w int8[N / 16, K / lanes, 16 * lanes] with lanes the K-run per 32-bit lane.
bool panels_fit(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, int64_t lanes) {
  return xd.size() == 2 && wd.size() == 3 && wd[2] == kPanel * lanes && wd[1] * lanes == xd[1] &&
         wd[0] % 2 == 0;
}

#if defined(XLASERVE_INT8_KERNELS)
template <typename X, typename Y>
void run_panels(ffi::ThreadPool& pool, const PanelPass<X, Y>* passes, const X* x,
                const int8_t* w, Y* y, int64_t M, int64_t K, int64_t panels, bool offsets) {
  const int64_t N = panels * kPanel;
  run(pool, panels / 2, [=](int64_t u) {
    const int8_t* pair = w + 2 * u * K * kPanel;
    alignas(64) int32_t offset[2 * kPanel];
    if (offsets) panel_offsets(pair, K, offset);
    for (int64_t m0 = 0; m0 < M; m0 += kPanelRows) {
      passes[std::min<int64_t>(kPanelRows, M - m0)](x + m0 * K, pair, K,
                                                   y + m0 * N + 2 * u * kPanel, N, offset);
    }
  });
}
#endif

ffi::Error Int8PanelsW8A16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                           ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::F32> y) {
  if (!panels_fit(x.dimensions(), w.dimensions(), 2)) {
    return ffi::Error::InvalidArgument("int8 w8a16 matmul: x[M, K] and w do not match the panels");
  }
#if defined(XLASERVE_INT8_KERNELS)
  run_panels<uint16_t, float>(pool, kW8A16Panels,
                              reinterpret_cast<const uint16_t*>(x.typed_data()), w.typed_data(),
                              y->typed_data(), x.dimensions()[0], x.dimensions()[1],
                              w.dimensions()[0], false);
  return ffi::Error::Success();
#else
  return not_built();
#endif
}

ffi::Error Int8PanelsW8A8(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> y) {
  if (!panels_fit(x.dimensions(), w.dimensions(), 4)) {
    return ffi::Error::InvalidArgument("int8 w8a8 matmul: x[M, K] and w do not match the panels");
  }
#if defined(XLASERVE_INT8_KERNELS)
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1];
  std::vector<uint8_t> xu(M * K);  // x + 128 as unsigned bytes
  const int8_t* xs = x.typed_data();
  for (int64_t i = 0; i < M * K; ++i) xu[i] = uint8_t(xs[i]) ^ 0x80u;
  run_panels<uint8_t, int32_t>(pool, kW8A8Panels, xu.data(), w.typed_data(), y->typed_data(), M,
                               K, w.dimensions()[0], true);
  return ffi::Error::Success();
#else
  return not_built();
#endif
}

}  // namespace

// Whether this build has the int8 kernels (AVX512-BF16 and AVX512-VNNI).
extern "C" int XlaserveInt8KernelsBuilt() {
#if defined(XLASERVE_INT8_KERNELS)
  return 1;
#else
  return 0;
#endif
}

#define INT8_HANDLER(symbol, fn, X, Y)                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,            \
                                ffi::Ffi::Bind()       \
                                    .Ctx<ffi::ThreadPool>() \
                                    .Arg<ffi::Buffer<X>>()  \
                                    .Arg<ffi::Buffer<ffi::S8>>() \
                                    .Ret<ffi::Buffer<Y>>());
INT8_HANDLER(XlaserveInt8RowsW8A16, Int8RowsW8A16, ffi::BF16, ffi::F32)
INT8_HANDLER(XlaserveInt8PanelsW8A16, Int8PanelsW8A16, ffi::BF16, ffi::F32)
INT8_HANDLER(XlaserveInt8PanelsW8A8, Int8PanelsW8A8, ffi::S8, ffi::S32)
