// GGUF block matmuls with 8-bit activations (quantization="gguf_a8"): y f32[M, N] = x[M, K]
// @ W^T, W a GGUF tensor's own rows (uint8[N, row_bytes]), with x quantized first, per row and
// run of 32 values, to int8 and one float32 scale (llama.cpp's and vLLM's GGUF arithmetic):
//
//   amax = max |x_i|,  dx = amax / 127,  q_i = round_half_even(x_i * (127 / amax))  (0 if amax = 0)
//
// (gguf_a8_activations.h; xlaserve/quantization/int8.py quantize_blocks does the same in
// jnp). Every block type is read as runs of 32 unsigned quants u with w = a * u + b (a, b
// float32, one pair per 16 or 32 weights; Q8_0 keeps its signed quants and b = 0), so a run
// of 32 weights against a run of x is one integer dot and two multiply-adds:
//
//   sum_i w_i * dx * q_i = dx * a * (sum_i u_i * q_i) + b * dx * (sum_i q_i)
//
// The integer dot is vpdpbusd (AVX512-VNNI / AVX-VNNI) or vpmaddubsw + vpmaddwd (AVX2), 32
// products in one or two instructions, where the exact kernel (gguf_matmul.cc) rounds every
// weight to bfloat16 first. x's products are exact; only the float32 sums differ from
// "dequantize, then dot" (kernels_pallas/gguf_matmul/reference.py with int8_activations).
//
// Paths: one row of x (row_dot), 2-8 rows with one scale per run (tile_dot), Q4_0 / Q4_1
// rows laid out planar at load (planar_dot, 8 blocks at a time), and plain C++ where the CPU
// has no AVX2 (row_dot_scalar).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "gguf_a8_activations.h"
#include "gguf_blocks.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using namespace xlaserve_gguf;
using namespace xlaserve_gguf_a8;

// A run of 32 weights of a block: u[i] the unsigned quants (Q8_0: its signed ones), and per
// int32 lane l (weights 4l .. 4l + 3) w = a[l] * u + b[l].
struct ScalarRun {
  uint8_t u[kRun];
  float a[kLanes], b[kLanes];
};

// Calls emit(run, j) for the j-th run of 32 weights of the block at p.
template <typename Emit>
void unpack_scalar(int32_t qtype, const uint8_t* p, Emit&& emit) {
  ScalarRun run;
  const auto fill = [&](float a, float b) {
    std::fill(run.a, run.a + kLanes, a);
    std::fill(run.b, run.b + kLanes, b);
  };
  switch (qtype) {
    case kQ8_0:
      std::memcpy(run.u, p + 2, kRun);
      fill(f16_to_f32(p), 0.0f);
      return emit(run, 0);
    case kQ4_0:
    case kQ4_1:
    case kQ5_0: {
      const float d = f16_to_f32(p);
      const uint8_t* nibbles = p + (qtype == kQ4_0 ? 2 : qtype == kQ4_1 ? 4 : 6);
      uint32_t qh = 0;
      if (qtype == kQ5_0) std::memcpy(&qh, p + 2, 4);
      for (int i = 0; i < 16; ++i) {
        run.u[i] = uint8_t((nibbles[i] & 0x0F) | (((qh >> i) & 1) << 4));
        run.u[16 + i] = uint8_t((nibbles[i] >> 4) | (((qh >> (16 + i)) & 1) << 4));
      }
      fill(d, qtype == kQ4_1 ? f16_to_f32(p + 2) : qtype == kQ4_0 ? -8.0f * d : -16.0f * d);
      return emit(run, 0);
    }
    case kQ4_K: {
      const float d = f16_to_f32(p), dmin = f16_to_f32(p + 2);
      for (int j = 0; j < 8; ++j) {
        const auto [sc, mn] = k_scale_min(p + 4, j);
        const uint8_t* q = p + 16 + 32 * (j / 2);
        for (int i = 0; i < kRun; ++i) run.u[i] = uint8_t((q[i] >> (4 * (j % 2))) & 0x0F);
        fill(d * float(sc), -(dmin * float(mn)));
        emit(run, j);
      }
      return;
    }
    case kQ6_K: {
      const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
      const float d = f16_to_f32(p + 208);
      for (int half = 0; half < 2; ++half) {
        for (int r = 0; r < 4; ++r) {
          for (int i = 0; i < kRun; ++i) {
            const int low = (p[64 * half + 32 * (r % 2) + i] >> (4 * (r / 2))) & 0x0F;
            const int high = (p[128 + 32 * half + i] >> (2 * r)) & 0x03;
            run.u[i] = uint8_t(low | (high << 4));
          }
          for (int l = 0; l < kLanes; ++l) {  // one scale per 16 weights
            run.a[l] = d * float(sc[8 * half + 2 * r + l / 4]);
            run.b[l] = -32.0f * run.a[l];
          }
          emit(run, 4 * half + r);
        }
      }
      return;
    }
  }
}

void row_dot_scalar(int32_t qtype, const uint8_t* row, int64_t nblocks, const Format& fmt,
                    const QuantizedX& x, int64_t m0, int64_t rows, float* y, int64_t N) {
  const int64_t runs_per_block = fmt.values / kRun;
  for (int64_t m = m0; m < m0 + rows; ++m) {
    float acc = 0.0f;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      unpack_scalar(qtype, row + blk * fmt.bytes, [&](const ScalarRun& run, int j) {
        const int64_t r = blk * runs_per_block + j;
        const int8_t* q = x.values(m, r);
        const float dx = x.scale[m * x.R + r];
        const float* sums = &x.lane_sums[(m * x.R + r) * kLanes];
        for (int l = 0; l < kLanes; ++l) {
          int32_t dot = 0;
          for (int i = 4 * l; i < 4 * l + 4; ++i) {
            dot += (qtype == kQ8_0 ? int32_t(int8_t(run.u[i])) : int32_t(run.u[i])) * q[i];
          }
          acc += float(dot) * (run.a[l] * dx) + run.b[l] * sums[l];
        }
      });
    }
    y[(m - m0) * N] = acc;
  }
}

#if defined(XLASERVE_GGUF_A8_VECTOR)
struct Run {  // as ScalarRun, in registers
  __m256i u;
  __m256 a, b;
};

inline __m256i nibbles_32(const uint8_t* p) {  // 16 bytes -> their low nibbles, then high
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
}

// Byte i = 0x10 where bit i of bits is set, else 0.
inline __m256i bit_bytes(uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_maskz_mov_epi8(__mmask32(bits), _mm256_set1_epi8(0x10));
#else
  const __m256i spread = _mm256_shuffle_epi8(  // byte i <- byte i / 8 of bits
      _mm256_set1_epi32(int(bits)),
      _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select),
                          _mm256_set1_epi8(0x10));
#endif
}

template <int32_t QType, typename Emit>
inline void unpack(const uint8_t* p, Emit&& emit) {
  if constexpr (QType == kQ8_0) {
    emit(Run{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)),
             _mm256_set1_ps(f16_to_f32(p)), _mm256_setzero_ps()}, 0);
  } else if constexpr (QType == kQ4_1) {
    int32_t scales;  // d and m, converted together
    std::memcpy(&scales, p, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(scales));
    emit(Run{nibbles_32(p + 4), _mm256_broadcastss_ps(dm),
             _mm256_broadcastss_ps(_mm_movehdup_ps(dm))}, 0);
  } else if constexpr (QType == kQ4_0 || QType == kQ5_0) {
    const float d = f16_to_f32(p);
    if constexpr (QType == kQ4_0) {
      emit(Run{nibbles_32(p + 2), _mm256_set1_ps(d), _mm256_set1_ps(-8.0f * d)}, 0);
    } else {
      uint32_t qh;
      std::memcpy(&qh, p + 2, 4);
      emit(Run{_mm256_or_si256(nibbles_32(p + 6), bit_bytes(qh)), _mm256_set1_ps(d),
               _mm256_set1_ps(-16.0f * d)}, 0);
    }
  } else if constexpr (QType == kQ4_K) {
    const float d = f16_to_f32(p), dmin = f16_to_f32(p + 2);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 8; j += 2) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 16 * j));
      const auto [sc0, mn0] = k_scale_min(p + 4, j);
      const auto [sc1, mn1] = k_scale_min(p + 4, j + 1);
      emit(Run{_mm256_and_si256(q, mask), _mm256_set1_ps(d * float(sc0)),
               _mm256_set1_ps(-(dmin * float(mn0)))}, j);
      emit(Run{_mm256_and_si256(_mm256_srli_epi16(q, 4), mask), _mm256_set1_ps(d * float(sc1)),
               _mm256_set1_ps(-(dmin * float(mn1)))}, j + 1);
    }
  } else {  // Q6_K
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const float d = f16_to_f32(p + 208);
    const __m256i low_mask = _mm256_set1_epi8(0x0F), high_mask = _mm256_set1_epi8(0x30);
    for (int half = 0; half < 2; ++half) {
      const __m256i qh =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * half));
      for (int r = 0; r < 4; ++r) {
        __m256i low = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(p + 64 * half + 32 * (r % 2)));
        if (r >= 2) low = _mm256_srli_epi16(low, 4);
        // bits 2r, 2r + 1 of each qh byte to bits 4, 5 (the shifts stay within each byte's
        // bits after the mask)
        const __m256i high = _mm256_and_si256(
            r == 2 ? qh : r < 2 ? _mm256_slli_epi16(qh, 4 - 2 * r) : _mm256_srli_epi16(qh, 2),
            high_mask);
        const int s = 8 * half + 2 * r;
        const __m256 a = _mm256_setr_m128(_mm_set1_ps(d * float(sc[s])),
                                          _mm_set1_ps(d * float(sc[s + 1])));
        emit(Run{_mm256_or_si256(_mm256_and_si256(low, low_mask), high), a,
                 _mm256_mul_ps(_mm256_set1_ps(-32.0f), a)}, 4 * half + r);
      }
    }
  }
}

inline float hsum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

// One weight row against Rows rows of x (from m0): each run of weights is unpacked once and
// meets every row in registers. The a- and b-terms keep separate sums; one row alternates two
// sets of them between even and odd blocks (four multiply-add chains, where one would wait on
// its own latency).
template <int32_t QType, int Rows>
void row_dot(const uint8_t* row, int64_t nblocks, const Format& fmt, const QuantizedX& x,
             int64_t m0, float* y, int64_t N) {
  constexpr int kRunsPerBlock = (QType == kQ4_K || QType == kQ6_K) ? 8 : 1;
  constexpr int kSets = Rows == 1 ? 2 : 1;
  const int64_t K = x.K, R = x.R;
  const int8_t* xq = x.q.data() + m0 * K;
  const float* xscale = x.scale.data() + m0 * R;
  const float* xsums = x.lane_sums.data() + m0 * R * kLanes;
  __m256 acc_a[kSets][Rows], acc_b[kSets][Rows];
  for (int c = 0; c < kSets; ++c)
    for (int m = 0; m < Rows; ++m) acc_a[c][m] = acc_b[c][m] = _mm256_setzero_ps();
  const auto block = [&](int64_t blk, auto set) {
    constexpr int c = decltype(set)::value;
    unpack<QType>(row + blk * fmt.bytes, [&](const Run& run, int j) {
      const int64_t r = blk * kRunsPerBlock + j;
      for (int m = 0; m < Rows; ++m) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + r * kRun));
        __m256i dot;
        if constexpr (QType == kQ8_0) {  // |w| * (q with w's sign)
          dot = dot_u8s8(_mm256_abs_epi8(run.u), _mm256_sign_epi8(q, run.u));
        } else {
          dot = dot_u8s8(run.u, q);
        }
        const __m256 ad = _mm256_mul_ps(run.a, _mm256_set1_ps(xscale[m * R + r]));
        acc_a[c][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), ad, acc_a[c][m]);
        if constexpr (QType != kQ8_0) {
          const __m256 sums = _mm256_loadu_ps(xsums + (m * R + r) * kLanes);
          acc_b[c][m] = _mm256_fmadd_ps(run.b, sums, acc_b[c][m]);
        }
      }
    });
  };
  int64_t blk = 0;
  if constexpr (kSets == 2) {
    for (; blk + 1 < nblocks; blk += 2) {
      block(blk, std::integral_constant<int, 0>());
      block(blk + 1, std::integral_constant<int, 1>());
    }
  }
  for (; blk < nblocks; ++blk) block(blk, std::integral_constant<int, 0>());
  for (int m = 0; m < Rows; ++m) {
    __m256 total = _mm256_add_ps(acc_a[0][m], acc_b[0][m]);
    for (int c = 1; c < kSets; ++c) {
      total = _mm256_add_ps(total, _mm256_add_ps(acc_a[c][m], acc_b[c][m]));
    }
    y[m * N] = hsum(total);
  }
}

// lane m = the sum of d[m]'s 8 lanes.
inline __m256i sum_each(const __m256i (&d)[kTile]) {
  const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                          _mm256_permute2x128_si256(u0, u1, 0x31));
}

// One weight row against Rows (2-8) rows of x, for types with one (a, b) per run (all but
// Q6_K): each row's integer dot is summed to one lane, so the 8 rows' dots are converted,
// scaled and accumulated with one instruction each, the b-term too: 5 instructions per run
// and tile instead of 5 per run and row.
template <int32_t QType, int Rows>
void tile_dot(const uint8_t* row, int64_t nblocks, const Format& fmt, const QuantizedX& x,
              int64_t m0, float* y, int64_t N) {
  constexpr int kRunsPerBlock = QType == kQ4_K ? 8 : 1;
  const int64_t K = x.K, R = x.R;
  const int8_t* xq = x.q.data() + m0 * K;
  const float* scales = x.tile_scale.data() + (m0 / kTile) * R * kTile;
  const float* sums = x.tile_sums.data() + (m0 / kTile) * R * kTile;
  __m256 acc_a = _mm256_setzero_ps(), acc_b = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    unpack<QType>(row + blk * fmt.bytes, [&](const Run& run, int j) {
      const int64_t r = blk * kRunsPerBlock + j;
      __m256i d[kTile];
      const __m256i u = QType == kQ8_0 ? _mm256_abs_epi8(run.u) : run.u;
      for (int m = 0; m < kTile; ++m) {
        if (m >= Rows) {
          d[m] = _mm256_setzero_si256();
          continue;
        }
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + r * kRun));
        d[m] = dot_u8s8(u, QType == kQ8_0 ? _mm256_sign_epi8(q, run.u) : q);
      }
      const __m256 ad = _mm256_mul_ps(run.a, _mm256_loadu_ps(scales + r * kTile));
      acc_a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_each(d)), ad, acc_a);
      if constexpr (QType != kQ8_0) {
        acc_b = _mm256_fmadd_ps(run.b, _mm256_loadu_ps(sums + r * kTile), acc_b);
      }
    });
  }
  alignas(32) float out[kTile];
  _mm256_store_ps(out, _mm256_add_ps(acc_a, acc_b));
  for (int m = 0; m < Rows; ++m) y[m * N] = out[m];
}

// Q4_0 / Q4_1 rows laid out planar (kernels_cpu/gguf.py planar_rows): every block's 16
// bytes of nibbles first, then the blocks' float16 d, then (Q4_1) their m. 32 bytes of
// nibbles are two blocks: their low nibbles meet the two runs' values 0-15 and their high
// nibbles values 16-31 (x.paired), two integer dots leaving block 2p in lanes 0-3 and
// 2p + 1 in lanes 4-7. Three horizontal adds turn 8 blocks' dots into one vector (blocks
// 0, 2, 4, 6, 1, 3, 5, 7), which one permuted load of 8 d (and of 8 m) scales: about 4.5
// instructions per block and row where the block-by-block path takes 15.
template <int32_t QType, int Rows>
void planar_dot(const uint8_t* row, int64_t nblocks, const Format&, const QuantizedX& x,
                int64_t m0, float* y, int64_t N) {
  const uint8_t* ds = row + nblocks * 16;
  const uint8_t* ms = ds + nblocks * 2;
  const int64_t P = x.P, G = x.G;
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[Rows];  // one sum per row (8 blocks' work between its two multiply-adds)
  float tail_b[Rows];
  for (int m = 0; m < Rows; ++m) {
    acc[m] = _mm256_setzero_ps();
    tail_b[m] = 0.0f;
  }
  const auto pair_dot = [&](int m, int64_t p, __m256i lo, __m256i hi) {
    const int8_t* xp = x.paired.data() + ((m0 + m) * P + p) * 64;
    const __m256i v = dot_u8s8_add(_mm256_setzero_si256(), lo,
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)));
    return dot_u8s8_add(v, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32)));
  };
  for (int64_t g = 0; g < G; ++g) {
    __m256i lo[4], hi[4];
    for (int k = 0; k < 4; ++k) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (8 * g + 2 * k) * 16));
      lo[k] = _mm256_and_si256(v, mask);
      hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    const __m256 d = _mm256_permutevar8x32_ps(
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ds + 16 * g))), order);
    __m256 b;
    if constexpr (QType == kQ4_1) {
      b = _mm256_permutevar8x32_ps(
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ms + 16 * g))), order);
    } else {
      b = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    }
    for (int m = 0; m < Rows; ++m) {
      __m256i v[4];
      for (int k = 0; k < 4; ++k) v[k] = pair_dot(m, 4 * g + k, lo[k], hi[k]);
      const __m256i sums =
          _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
      const int64_t at = ((m0 + m) * G + g) * 8;
      const __m256 ad = _mm256_mul_ps(d, _mm256_loadu_ps(x.group_scale.data() + at));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), ad, acc[m]);
      acc[m] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x.group_sums.data() + at), acc[m]);
    }
  }
  for (int64_t p = 4 * G; p < P; ++p) {  // the last pairs, fewer than 4
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * p * 16));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const float d0 = f16_to_f32(ds + 4 * p), d1 = f16_to_f32(ds + 4 * p + 2);
    const float b0 = QType == kQ4_1 ? f16_to_f32(ms + 4 * p) : -8.0f * d0;
    const float b1 = QType == kQ4_1 ? f16_to_f32(ms + 4 * p + 2) : -8.0f * d1;
    for (int m = 0; m < Rows; ++m) {
      const int64_t r = (m0 + m) * x.R + 2 * p;
      const __m256 scale = _mm256_setr_m128(_mm_set1_ps(d0 * x.scale[r]), _mm_set1_ps(d1 * x.scale[r + 1]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(m, p, lo, hi)), scale, acc[m]);
      tail_b[m] += b0 * x.run_sums[r] + b1 * x.run_sums[r + 1];
    }
  }
  for (int m = 0; m < Rows; ++m) y[m * N] = hsum(acc[m]) + tail_b[m];
}

using RowDotFn = void (*)(const uint8_t*, int64_t, const Format&, const QuantizedX&, int64_t,
                          float*, int64_t);

template <int32_t QType>
RowDotFn planar_dot_for_rows(int64_t rows) {
  constexpr RowDotFn table[9] = {nullptr,
                                 planar_dot<QType, 1>, planar_dot<QType, 2>, planar_dot<QType, 3>,
                                 planar_dot<QType, 4>, planar_dot<QType, 5>, planar_dot<QType, 6>,
                                 planar_dot<QType, 7>, planar_dot<QType, 8>};
  return table[rows];
}

template <int32_t QType>
RowDotFn row_dot_for_rows(int64_t rows) {
  if constexpr (QType == kQ6_K) {  // two scales per run: each row scales its own dot
    constexpr RowDotFn table[9] = {nullptr,
                                   row_dot<QType, 1>, row_dot<QType, 2>, row_dot<QType, 3>,
                                   row_dot<QType, 4>, row_dot<QType, 5>, row_dot<QType, 6>,
                                   row_dot<QType, 7>, row_dot<QType, 8>};
    return table[rows];
  }
  constexpr RowDotFn table[9] = {nullptr,
                                 row_dot<QType, 1>, tile_dot<QType, 2>, tile_dot<QType, 3>,
                                 tile_dot<QType, 4>, tile_dot<QType, 5>, tile_dot<QType, 6>,
                                 tile_dot<QType, 7>, tile_dot<QType, 8>};
  return table[rows];
}

RowDotFn row_dot_for(int32_t qtype, int64_t rows) {
  switch (qtype) {
    case kQ8_0: return row_dot_for_rows<kQ8_0>(rows);
    case kQ4_0: return row_dot_for_rows<kQ4_0>(rows);
    case kQ4_1: return row_dot_for_rows<kQ4_1>(rows);
    case kQ5_0: return row_dot_for_rows<kQ5_0>(rows);
    case kQ4_K: return row_dot_for_rows<kQ4_K>(rows);
    default: return row_dot_for_rows<kQ6_K>(rows);
  }
}
#endif

// A planar Q4_0 / Q4_1 row (see planar_dot) back in GGUF's block order.
void blocks_from_planar(int32_t qtype, const uint8_t* row, int64_t nblocks, uint8_t* out) {
  const int64_t scales = qtype == kQ4_1 ? 4 : 2, bytes = scales + 16;
  for (int64_t b = 0; b < nblocks; ++b) {
    std::memcpy(out + b * bytes, row + nblocks * 16 + 2 * b, 2);
    if (qtype == kQ4_1) std::memcpy(out + b * bytes + 2, row + nblocks * 18 + 2 * b, 2);
    std::memcpy(out + b * bytes + scales, row + 16 * b, 16);
  }
}

struct Job {
  QuantizedX x;
  const uint8_t* w;
  float* y;
  int64_t N, row_bytes, chunk;
  int32_t qtype;
  bool planar;
  Format fmt;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    const int64_t nblocks = row_bytes / fmt.bytes;
#if !defined(XLASERVE_GGUF_A8_VECTOR)
    std::vector<uint8_t> blocks(planar ? row_bytes : 0);
#endif
    xlaserve_cpu::claim_rows(next, done, N, chunk, w, row_bytes, [&](int64_t n) {
      const uint8_t* row = w + n * row_bytes;
      for (int64_t m0 = 0; m0 < x.M; m0 += kTile) {
        const int64_t rows = std::min<int64_t>(kTile, x.M - m0);
#if defined(XLASERVE_GGUF_A8_VECTOR)
        const RowDotFn dot = !planar          ? row_dot_for(qtype, rows)
                             : qtype == kQ4_1 ? planar_dot_for_rows<kQ4_1>(rows)
                                              : planar_dot_for_rows<kQ4_0>(rows);
        dot(row, nblocks, fmt, x, m0, y + m0 * N + n, N);
#else
        if (planar) blocks_from_planar(qtype, row, nblocks, blocks.data());
        row_dot_scalar(qtype, planar ? blocks.data() : row, nblocks, fmt, x, m0, rows,
                       y + m0 * N + n, N);
#endif
      }
    });
  }
};

ffi::Error GgufMatmulA8(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w,
                        ffi::ResultBuffer<ffi::F32> y, int32_t qtype, bool planar) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const Format fmt = format_of(qtype);
  if (fmt.values == 0) return ffi::Error::InvalidArgument("gguf_matmul_a8: unsupported GGUF type");
  if (xd.size() != 2 || wd.size() != 2 || wd[1] % fmt.bytes != 0 ||
      wd[1] / fmt.bytes * fmt.values != xd[1] || xd[1] % kRun != 0) {
    return ffi::Error::InvalidArgument("gguf_matmul_a8: x[M, K] and w[N, row_bytes] do not match");
  }
  if (planar && ((qtype != kQ4_0 && qtype != kQ4_1) || xd[1] % 64 != 0)) {
    return ffi::Error::InvalidArgument("gguf_matmul_a8: planar rows are Q4_0 / Q4_1 with K % 64 == 0");
  }
  auto job = std::make_shared<Job>();
  quantize_x(reinterpret_cast<const uint16_t*>(x.typed_data()), xd[0], xd[1], job->x);
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->N = wd[0];
  job->row_bytes = wd[1];
  job->qtype = qtype;
  job->planar = planar;
  job->fmt = fmt;
  if (planar) pair_runs(job->x);
  xlaserve_cpu::share_in_chunks(pool, job, job->N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveGgufMatmulA8, GgufMatmulA8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("qtype")
                                  .Attr<bool>("planar"));
