// Skinny matmuls for the CPU: y f32[M, N] = x f32[M, K] @ W for M <= 8 rows (decode steps),
// streaming the weights once at memory bandwidth.
//
// W is pre-packed into column panels of kPanel outputs, each panel contiguous over K
// (bf16[N / kPanel, K, kPanel]): one panel's weights are read as one sequential stream, and
// its M x kPanel partial sums stay in registers. Panels are shared out over XLA's intra-op
// thread pool (the calling thread works too, so the call completes even when the pool is busy).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

#if defined(__AVX512BF16__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// The AVX2 path (no 512-bit vectors): see panel_rows_avx2.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define XLASERVE_SKINNY_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // outputs per panel: one 512-bit vector of f32
#if defined(XLASERVE_SKINNY_AVX2)
constexpr int kMaxRows = 4;  // 8 accumulators of 8 outputs, with room for the loads
#else
constexpr int kMaxRows = 8;
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 widen_bf16(const uint16_t* p) {
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;
  f32x16 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// One panel: y[m, n0:n0+16] = sum_k x[m, k] * panel[k, :].
template <int M>
void panel_rows(const float* x, int64_t K, const uint16_t* panel, float* y, int64_t N) {
  f32x16 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = f32x16{};
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    __builtin_prefetch(panel + (k + 32) * kPanel);
    const f32x16 w0 = widen_bf16(panel + k * kPanel);
    const f32x16 w1 = widen_bf16(panel + (k + 1) * kPanel);
    for (int m = 0; m < M; ++m) acc[m] += x[m * K + k] * w0 + x[m * K + k + 1] * w1;
  }
  for (; k < K; ++k) {
    const f32x16 w0 = widen_bf16(panel + k * kPanel);
    for (int m = 0; m < M; ++m) acc[m] += x[m * K + k] * w0;
  }
  for (int m = 0; m < M; ++m) std::memcpy(y + m * N, &acc[m], sizeof(f32x16));
}

#if defined(__AVX512BF16__)
// With AVX512-BF16 the panel interleaves pairs of rows (bf16[K / 2, kPanel, 2]) and one
// vdpbf16ps adds two rows' products for 16 outputs; xp holds x as bf16 pairs [M, K / 2].
template <int M>
void panel_rows_dp(const uint32_t* xp, int64_t K, const uint16_t* panel, float* y, int64_t N) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __builtin_prefetch(panel + (kp + 16) * 2 * kPanel);
    const __m512bh w = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * kPanel);
    for (int m = 0; m < M; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp[m * pairs + kp]);
      acc[m] = _mm512_dpbf16_ps(acc[m], w, xb);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N, acc[m]);
}

// Two adjacent panels at once: two weight streams, and each broadcast of x serves 32 outputs.
template <int M>
void panel_pair_rows_dp(const uint32_t* xp, int64_t K, const uint16_t* panel, float* y,
                        int64_t N) {
  __m512 acc0[M], acc1[M];
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  const uint16_t* panel1 = panel + K * kPanel;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __builtin_prefetch(panel + (kp + 16) * 2 * kPanel);
    __builtin_prefetch(panel1 + (kp + 16) * 2 * kPanel);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + kp * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel1 + kp * 2 * kPanel);
    for (int m = 0; m < M; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp[m * pairs + kp]);
      acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, xb);
      acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, xb);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * N, acc0[m]);
    _mm512_storeu_ps(y + m * N + kPanel, acc1[m]);
  }
}
#endif

#if defined(XLASERVE_SKINNY_AVX2)
// With 256-bit vectors each panel row holds its 16 outputs in the order 0, 8, 1, 9, ..., 7, 15:
// one load gives outputs 0-7 as float32 (the low halves of its 32-bit lanes, shifted up) and
// outputs 8-15 (the high halves, masked), so widening bfloat16 costs two integer ops per 16
// weights. Explicit FMAs (the build turns off contraction for the GGUF kernel's rounding).
template <int M>
void panel_rows_avx2(const float* x, int64_t K, const uint16_t* panel, float* y, int64_t N) {
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  // Outputs 0-7 and 8-15 of each row. Every loop over the accumulators is unrolled: GCC 12
  // otherwise keeps a copy of the array on the stack, stored on every step of k.
  __m256 acc[2 * M];
#pragma GCC unroll 16
  for (int j = 0; j < 2 * M; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (k + 32) * kPanel);
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kPanel));
    const __m256 w_lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    const __m256 w_hi = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * K + k);
      acc[2 * m] = _mm256_fmadd_ps(xb, w_lo, acc[2 * m]);
      acc[2 * m + 1] = _mm256_fmadd_ps(xb, w_hi, acc[2 * m + 1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(y + m * N, acc[2 * m]);
    _mm256_storeu_ps(y + m * N + 8, acc[2 * m + 1]);
  }
}

// Two adjacent panels at once (two weight streams, four accumulator chains per row), for up
// to 3 rows: 4 x 3 accumulators and the loads fit the 16 registers.
template <int M>
void panel_pair_rows_avx2(const float* x, int64_t K, const uint16_t* panel, float* y,
                          int64_t N) {
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  const uint16_t* panel1 = panel + K * kPanel;
  __m256 acc[M][4];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (k + 32) * kPanel);
    __builtin_prefetch(panel1 + (k + 32) * kPanel);
    const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kPanel));
    const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel1 + k * kPanel));
    const __m256 w[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(r0, 16)),
                         _mm256_castsi256_ps(_mm256_and_si256(r0, high)),
                         _mm256_castsi256_ps(_mm256_slli_epi32(r1, 16)),
                         _mm256_castsi256_ps(_mm256_and_si256(r1, high))};
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_fmadd_ps(xb, w[j], acc[m][j]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(y + m * N + 8 * j, acc[m][j]);
}
#endif

#if defined(__AVX512BF16__)
constexpr int kPairRows = 2;
using XRow = uint32_t;  // x as bf16 pairs
#define PANEL_FN panel_rows_dp
#elif defined(XLASERVE_SKINNY_AVX2)
constexpr int kPairRows = 1;
using XRow = float;  // x widened to f32
#define PANEL_FN panel_rows_avx2
#else
constexpr int kPairRows = 1;
using XRow = float;  // x widened to f32
#define PANEL_FN panel_rows
#endif

using PanelFn = void (*)(const XRow*, int64_t, const uint16_t*, float*, int64_t);
constexpr PanelFn kPanelFns[8 + 1] = {
    nullptr,       PANEL_FN<1>, PANEL_FN<2>, PANEL_FN<3>, PANEL_FN<4>,
    PANEL_FN<5>, PANEL_FN<6>, PANEL_FN<7>, PANEL_FN<8>};
#if defined(__AVX512BF16__)
constexpr PanelFn kPanelPairFns[8 + 1] = {
    nullptr,
    panel_pair_rows_dp<1>, panel_pair_rows_dp<2>, panel_pair_rows_dp<3>, panel_pair_rows_dp<4>,
    panel_pair_rows_dp<5>, panel_pair_rows_dp<6>, panel_pair_rows_dp<7>, panel_pair_rows_dp<8>};
#elif defined(XLASERVE_SKINNY_AVX2)
constexpr PanelFn kPanelPairFns[8 + 1] = {
    nullptr, panel_pair_rows_avx2<1>, panel_pair_rows_avx2<2>, panel_pair_rows_avx2<3>};
#else
constexpr const PanelFn* kPanelPairFns = nullptr;
#endif

struct Job {
  const XRow* x;
  const uint16_t* w;
  float* y;
  int64_t M, K, N, panels, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (;;) {
      const int64_t start = next.fetch_add(chunk);
      if (start >= panels) return;
      const int64_t stop = std::min(panels, start + chunk);
      for (int64_t p = start; p < stop;) {
        // Two panels at a time where two remain (measured on a 2-core EPYC: two concurrent
        // weight streams per core read 20-25% faster than one, and each broadcast of x serves
        // 32 outputs); row groups of up to kMaxRows reuse the panels from cache.
        const bool pair = kPanelPairFns != nullptr && p + 1 < stop;
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          const int rows = int(std::min<int64_t>(kMaxRows, M - m0));
          const XRow* xs = x + m0 * (K / kPairRows);
          float* ys = y + m0 * N + p * kPanel;
          const uint16_t* ws = w + p * K * kPanel;
          if (pair && kPanelPairFns[rows] != nullptr) {
            kPanelPairFns[rows](xs, K, ws, ys, N);
          } else {
            kPanelFns[rows](xs, K, ws, ys, N);
            if (pair) kPanelFns[rows](xs, K, ws + K * kPanel, ys + kPanel, N);
          }
        }
        p += pair ? 2 : 1;
      }
      done.fetch_add(stop - start, std::memory_order_release);
    }
  }
};

// x bf16[M, K], w bf16[N / 16, K / kPairRows, 16 * kPairRows] -> y f32[M, N].
ffi::Error SkinnyMatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                            ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel * kPairRows ||
      wd[1] * kPairRows != xd[1]) {
    return ffi::Error::InvalidArgument("skinny_matmul: x[M, K] and w do not match the packing");
  }
  const int64_t M = xd[0], K = xd[1], panels = wd[0], N = panels * kPanel;
  auto job = std::make_shared<Job>();
  const uint16_t* xbits = reinterpret_cast<const uint16_t*>(x.typed_data());
#if defined(__AVX512BF16__)
  job->x = reinterpret_cast<const XRow*>(xbits);
#else
  auto widened = std::make_unique<float[]>(M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t bits = uint32_t(xbits[i]) << 16;
    std::memcpy(&widened[i], &bits, sizeof(float));
  }
  job->x = widened.get();
#endif
  job->M = M;
  job->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  job->y = y->typed_data();
  job->K = K;
  job->N = N;
  job->panels = panels;
  const int64_t workers = xlaserve_cpu::workers_for(pool);
  // About four chunks per worker balance the load; a chunk of panels is one contiguous stream.
  job->chunk = std::max<int64_t>(2, (panels / (4 * workers)) & ~int64_t(1));  // whole pairs
  const int64_t chunks = (panels + job->chunk - 1) / job->chunk;
  xlaserve_cpu::share_work(pool, job, workers, chunks, panels);
  return ffi::Error::Success();
}

}  // namespace

// Rows of W interleaved per panel row: 2 with AVX512-BF16 (see panel_rows_dp), else 1.
extern "C" int XlaserveSkinnyPairRows() { return kPairRows; }

// Whether a panel row holds its outputs in the order 0, 8, 1, 9, ... (the AVX2 path).
extern "C" int XlaserveSkinnyInterleavedOutputs() {
#if defined(XLASERVE_SKINNY_AVX2)
  return 1;
#else
  return 0;
#endif
}

// The widest vector the build targets: the packed path pays off with 512-bit vectors.
extern "C" int XlaserveSkinnyVectorBits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__)
  return 256;
#else
  return 128;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveSkinnyMatmulBf16, SkinnyMatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
