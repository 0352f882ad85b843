// The activation side of the int8-activation GGUF kernel (gguf_matmul_a8.cc): x quantized
// per row and run of 32 values, with the per-run numbers each weight-side path reads, and the
// unsigned x signed 8-bit integer dots both sides share.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define XLASERVE_GGUF_A8_VECTOR 1
#endif

namespace xlaserve_gguf_a8 {

constexpr int kRun = 32;  // activations per scale
constexpr int kLanes = 8;  // runs of 4 values, one int32 lane of an integer dot each

constexpr int kTile = 8;  // rows of x per pass over a weight row

// x quantized, per row m and run r of 32 values (R runs per row). The tile_ arrays hold the
// same per-run numbers of each tile of 8 rows side by side (rows past M are 0), for the
// kernels that scale 8 rows' dots in one instruction.
struct QuantizedX {
  int64_t M = 0, K = 0, R = 0;
  std::vector<int8_t> q;          // [M, K]
  std::vector<float> scale;       // [M, R]: dx
  std::vector<float> lane_sums;   // [M, R, 8]: dx * (sum of q over values 4l .. 4l + 3)
  std::vector<float> run_sums;    // [M, R]: dx * (sum of the run's 32 q)
  std::vector<float> tile_scale;  // [tiles, R, 8]: dx of rows 8t .. 8t + 7
  std::vector<float> tile_sums;   // [tiles, R, 8]: run_sums of those rows
  // For the planar 4-bit rows (see planar_dot), per row: runs 2p and 2p + 1 as 64 bytes
  // (their values 0-15, then their values 16-31), and dx / run_sums of each 8 runs in the
  // order the 8 blocks' dots come out of the reduction (runs 0, 2, 4, 6, 1, 3, 5, 7).
  int64_t P = 0, G = 0;           // pairs of runs, groups of 8 runs
  std::vector<int8_t> paired;     // [M, P, 64]
  std::vector<float> group_scale;  // [M, G, 8]
  std::vector<float> group_sums;   // [M, G, 8]

  const int8_t* values(int64_t m, int64_t r) const { return q.data() + m * K + r * kRun; }
};

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Quantizes one run; returns the sum of its 32 q.
inline int32_t quantize_run(const uint16_t* x, int8_t* q, float* scale, float* lane_sums) {
  float v[kRun], amax = 0.0f;
  for (int i = 0; i < kRun; ++i) {
    v[i] = bf16_to_f32(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *scale = amax / 127.0f;
  for (int i = 0; i < kRun; ++i) q[i] = int8_t(std::nearbyint(v[i] * inv));  // to nearest even
  int32_t total = 0;
  for (int l = 0; l < kLanes; ++l) {
    const int32_t sum = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
    lane_sums[l] = *scale * float(sum);
    total += sum;
  }
  return total;
}

#if defined(XLASERVE_GGUF_A8_VECTOR)
// 8 int32 sums of 4 products of unsigned u (<= 128 where vpmaddubsw pairs them: 4-6-bit
// quants, or |Q8_0 quants|) and signed s.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i dot_u8s8_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, dot_u8s8(u, s));
#endif
}

// quantize_run with the same float32 operations, 8 values per instruction.
inline int32_t quantize_run_vector(const uint16_t* x, int8_t* q, float* scale, float* lane_sums) {
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int k = 0; k < 4; ++k) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * k));
    v[k] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], abs_mask));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
  const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
  *scale = top / 127.0f;
  __m256i i[4];
  for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));  // even ties
  // packs interleave the 128-bit halves: dwords come out as values 0-3, 8-11, 16-19, 24-27,
  // 4-7, ...; the permute puts them back in order.
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  const __m256i sums = dot_u8s8(_mm256_set1_epi8(1), bytes);
  _mm256_storeu_ps(lane_sums, _mm256_mul_ps(_mm256_set1_ps(*scale), _mm256_cvtepi32_ps(sums)));
  __m128i four = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  four = _mm_add_epi32(four, _mm_shuffle_epi32(four, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(four, _mm_shuffle_epi32(four, 0xB1)));
}
#endif

inline void quantize_x(const uint16_t* x, int64_t M, int64_t K, QuantizedX& out) {
  out.M = M;
  out.K = K;
  out.R = K / kRun;
  out.q.resize(M * K);
  out.scale.resize(M * out.R);
  out.lane_sums.resize(M * out.R * kLanes);
  out.run_sums.resize(M * out.R);
  const int64_t tiles = (M + kTile - 1) / kTile;
  out.tile_scale.assign(tiles * out.R * kTile, 0.0f);
  out.tile_sums.assign(tiles * out.R * kTile, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t r = 0; r < out.R; ++r) {
      const int64_t i = m * out.R + r;
#if defined(XLASERVE_GGUF_A8_VECTOR)
      const int32_t total = quantize_run_vector(
#else
      const int32_t total = quantize_run(
#endif
          x + m * K + r * kRun, out.q.data() + m * K + r * kRun, &out.scale[i],
          &out.lane_sums[i * kLanes]);
      const int64_t t = ((m / kTile) * out.R + r) * kTile + m % kTile;
      out.run_sums[i] = out.scale[i] * float(total);
      out.tile_scale[t] = out.scale[i];
      out.tile_sums[t] = out.run_sums[i];
    }
  }
}

// The paired and grouped arrays of QuantizedX (R even).
inline void pair_runs(QuantizedX& x) {
  constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  x.P = x.R / 2;
  x.G = x.R / 8;
  x.paired.resize(x.M * x.P * 64);
  x.group_scale.resize(x.M * x.G * 8);
  x.group_sums.resize(x.M * x.G * 8);
  for (int64_t m = 0; m < x.M; ++m) {
    for (int64_t p = 0; p < x.P; ++p) {
      const int8_t* a = x.values(m, 2 * p);
      int8_t* out = x.paired.data() + (m * x.P + p) * 64;
      std::memcpy(out, a, 16);
      std::memcpy(out + 16, a + kRun, 16);
      std::memcpy(out + 32, a + 16, 16);
      std::memcpy(out + 48, a + kRun + 16, 16);
    }
    for (int64_t g = 0; g < x.G; ++g) {
      for (int i = 0; i < 8; ++i) {
        const int64_t r = m * x.R + 8 * g + kOrder[i];
        x.group_scale[(m * x.G + g) * 8 + i] = x.scale[r];
        x.group_sums[(m * x.G + g) * 8 + i] = x.run_sums[r];
      }
    }
  }
}

}  // namespace xlaserve_gguf_a8
