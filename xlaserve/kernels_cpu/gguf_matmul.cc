// GGUF block matmuls for the CPU: y f32[M, N] = x bf16[M, K] @ W^T, where W holds a GGUF
// tensor's own rows (uint8[N, row_bytes]: one output channel per row, blocks along K).
//
// Each output row is dequantized once into a bfloat16 scratch row, value for value as
// xlaserve/quantization/gguf_blocks.py does it (float32 operations in the same order, no
// fused multiply-adds: built with -ffp-contract=off; rounded to bfloat16 to nearest even, as
// `astype` does), so the product equals the dequantized model's up to summation order. The
// scratch row then meets every row of x (vdpbf16ps with AVX512-BF16); up to 8 rows of x take
// the weights straight from registers, and 4-bit blocks dequantize by table (one permute per
// 32 weights). Output rows are shared out over XLA's intra-op thread pool; each worker
// prefetches the rows ~2 KB ahead of the one it computes (the weights stream from memory at
// decode: without it a 2-core Xeon read them at 5 GB/s of its 29).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "gguf_blocks.h"
#include "parallel.h"

#if defined(__AVX512BF16__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

using namespace xlaserve_gguf;

inline uint16_t bf16_rne(float f) {  // round to nearest even, as jnp's astype(bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline void store_bf16(const float* v, int n, uint16_t* out) {
  for (int i = 0; i < n; ++i) out[i] = bf16_rne(v[i]);
}

void dequant_block(int32_t qtype, const uint8_t* b, uint16_t* out) {
  float v[256];
  switch (qtype) {
    case kQ8_0: {
      const float d = f16_to_f32(b);
      for (int i = 0; i < 32; ++i) v[i] = float(int8_t(b[2 + i])) * d;
      return store_bf16(v, 32, out);
    }
    case kQ4_0: {
      const float d = f16_to_f32(b);
      for (int i = 0; i < 16; ++i) {
        v[i] = d * float(int(b[2 + i] & 0x0F) - 8);
        v[16 + i] = d * float(int(b[2 + i] >> 4) - 8);
      }
      return store_bf16(v, 32, out);
    }
    case kQ4_1: {
      const float d = f16_to_f32(b), m = f16_to_f32(b + 2);
      for (int i = 0; i < 16; ++i) {
        v[i] = d * float(b[4 + i] & 0x0F) + m;
        v[16 + i] = d * float(b[4 + i] >> 4) + m;
      }
      return store_bf16(v, 32, out);
    }
    case kQ5_0: {  // d, 32 high bits (bit i: value i), 16 bytes of nibbles as Q4_0
      const float d = f16_to_f32(b);
      uint32_t qh;
      std::memcpy(&qh, b + 2, 4);
      for (int i = 0; i < 16; ++i) {
        v[i] = d * float(int((b[6 + i] & 0x0F) | (((qh >> i) & 1) << 4)) - 16);
        v[16 + i] = d * float(int((b[6 + i] >> 4) | (((qh >> (16 + i)) & 1) << 4)) - 16);
      }
      return store_bf16(v, 32, out);
    }
    case kQ4_K: {
      const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
      const uint8_t* s = b + 4;  // 12 bytes of 6-bit scales and mins
      const uint8_t* qs = b + 16;
      for (int j = 0; j < 8; ++j) {
        const auto [sc, mn] = k_scale_min(s, j);
        const float dj = d * float(sc), mj = dmin * float(mn);
        const uint8_t* q = qs + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        for (int i = 0; i < 32; ++i) v[32 * j + i] = dj * float((q[i] >> shift) & 0x0F) - mj;
      }
      return store_bf16(v, 256, out);
    }
    case kQ6_K: {
      const uint8_t *ql = b, *qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16_to_f32(b + 208);
      for (int half = 0; half < 2; ++half) {
        for (int r = 0; r < 4; ++r) {  // four runs of 32 values per half
          for (int i = 0; i < 32; ++i) {
            const int low = (ql[64 * half + 32 * (r % 2) + i] >> (4 * (r / 2))) & 0x0F;
            const int high = (qh[32 * half + i] >> (2 * r)) & 0x03;
            const int idx = 128 * half + 32 * r + i;
            v[idx] = (d * float(sc[idx / 16])) * float(int8_t((low | (high << 4)) - 32));
          }
        }
      }
      return store_bf16(v, 256, out);
    }
  }
}


#if defined(__AVX512BF16__)
// Vectorized dequantization: each call yields 32 consecutive weights as bfloat16, computed
// with the same float32 operations as dequant_block (so the same bits).
inline __m512bh pack32(__m512 lo, __m512 hi) { return _mm512_cvtne2ps_pbh(hi, lo); }

// 4-bit blocks by table: the 16 values a run of nibbles can take (`values`, the same float32
// operations per value as dequant_block) rounded to bfloat16 once, then one word permute
// picks all 32 weights: 3 operations per 32 weights after the table, where widening,
// converting and scaling each weight took 9. The table fills both 16-word halves, so an
// index's bit 4 (a low nibble's neighbour) picks the same value.
inline __m512i nibble_table(__m512 values) { return (__m512i)_mm512_cvtne2ps_pbh(values, values); }
inline __m512 nibble_iota() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
// Words 0-15: the 16 bytes at q (low nibble in bits 0-3); words 16-31: their high nibbles.
inline __m512i low_then_high_nibbles(const uint8_t* q) {
  const __m512i bytes =
      _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)q)));
  return _mm512_srlv_epi16(bytes, _mm512_mask_set1_epi16(_mm512_setzero_si512(), 0xFFFF0000u, 4));
}
inline __m512bh pick(__m512i table, __m512i nibbles) {
  return (__m512bh)_mm512_permutexvar_epi16(nibbles, table);
}

// The 32 weights of a Q8_0, Q4_0 or Q4_1 block at b, given its scale d (and Q4_1 min m)
// already in float32.
template <int32_t QType>
inline __m512bh small_block(const uint8_t* b, __m512 d, __m512 m) {
  if constexpr (QType == kQ8_0) {
    const __m128i q0 = _mm_loadu_si128((const __m128i*)(b + 2));
    const __m128i q1 = _mm_loadu_si128((const __m128i*)(b + 18));
    return pack32(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d),
                  _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d));
  } else if constexpr (QType == kQ4_0) {
    const __m512 centered = _mm512_sub_ps(nibble_iota(), _mm512_set1_ps(8.0f));  // exact
    return pick(nibble_table(_mm512_mul_ps(d, centered)), low_then_high_nibbles(b + 2));
  } else if constexpr (QType == kQ5_0) {
    // 32 values by a 32-word table: word i is d * (i - 16); a weight's index is its nibble
    // plus 16 where its high bit (bit i of the 32-bit field, word i) is set.
    const __m512 centered = _mm512_sub_ps(nibble_iota(), _mm512_set1_ps(16.0f));  // exact
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(
        _mm512_mul_ps(d, _mm512_add_ps(centered, _mm512_set1_ps(16.0f))), _mm512_mul_ps(d, centered));
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const __m512i low = _mm512_and_si512(low_then_high_nibbles(b + 6), _mm512_set1_epi16(0x0F));
    return pick(table, _mm512_mask_add_epi16(low, (__mmask32)qh, low, _mm512_set1_epi16(16)));
  } else {
    const __m512i table = nibble_table(_mm512_add_ps(_mm512_mul_ps(d, nibble_iota()), m));
    return pick(table, low_then_high_nibbles(b + 4));
  }
}

// Calls emit(v, j) with v the j-th run of 32 weights of the block at b.
template <typename Emit>
inline void dequant_block_vec(int32_t qtype, const uint8_t* b, Emit&& emit) {
  switch (qtype) {
    case kQ8_0:
      emit(small_block<kQ8_0>(b, _mm512_set1_ps(f16_to_f32(b)), _mm512_setzero_ps()), 0);
      return;
    case kQ4_0:
      emit(small_block<kQ4_0>(b, _mm512_set1_ps(f16_to_f32(b)), _mm512_setzero_ps()), 0);
      return;
    case kQ4_1:
      emit(small_block<kQ4_1>(b, _mm512_set1_ps(f16_to_f32(b)), _mm512_set1_ps(f16_to_f32(b + 2))),
           0);
      return;
    case kQ5_0:
      emit(small_block<kQ5_0>(b, _mm512_set1_ps(f16_to_f32(b)), _mm512_setzero_ps()), 0);
      return;
    case kQ4_K: {
      const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
      const uint8_t* s = b + 4;
      for (int j = 0; j < 8; ++j) {
        const auto [sc, mn] = k_scale_min(s, j);
        const __m512 dj = _mm512_set1_ps(d * float(sc)), mj = _mm512_set1_ps(dmin * float(mn));
        const __m512i table = nibble_table(_mm512_sub_ps(_mm512_mul_ps(dj, nibble_iota()), mj));
        // 32 bytes, one nibble each: the low ones for even j, the high ones for odd j.
        __m512i nibbles = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(b + 16 + 32 * (j / 2))));
        if (j % 2) nibbles = _mm512_srli_epi16(nibbles, 4);
        emit(pick(table, nibbles), j);
      }
      return;
    }
    case kQ6_K: {
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16_to_f32(b + 208);
      const __m512i mask4 = _mm512_set1_epi32(15), mask2 = _mm512_set1_epi32(3);
      const __m512i bias = _mm512_set1_epi32(32);
      for (int half = 0; half < 2; ++half) {
        for (int r = 0; r < 4; ++r) {
          __m512 v[2];
          for (int h = 0; h < 2; ++h) {  // 16 values each, one scale each
            const int i0 = 16 * h;
            const __m512i ql = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i*)(b + 64 * half + 32 * (r % 2) + i0)));
            const __m512i qh = _mm512_cvtepu8_epi32(
                _mm_loadu_si128((const __m128i*)(b + 128 + 32 * half + i0)));
            const __m512i low = _mm512_and_si512(_mm512_srli_epi32(ql, 4 * (r / 2)), mask4);
            const __m512i high = _mm512_and_si512(_mm512_srli_epi32(qh, 2 * r), mask2);
            const __m512i q = _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32(high, 4)),
                                               bias);
            const int idx = 128 * half + 32 * r + i0;
            v[h] = _mm512_mul_ps(_mm512_set1_ps(d * float(sc[idx / 16])), _mm512_cvtepi32_ps(q));
          }
          emit(pack32(v[0], v[1]), 4 * half + r);
        }
      }
      return;
    }
  }
}

// One output row n against rows m0.. of x: the block's weights meet every row in registers.
template <int Rows>
inline void row_dot_vec(int32_t qtype, const uint8_t* row, int64_t nblocks, int32_t values,
                        int32_t bytes, const uint16_t* x, int64_t K, float* y, int64_t N) {
  __m512 acc[Rows];
  for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const uint16_t* xb = x + blk * values;
    dequant_block_vec(qtype, row + blk * bytes, [&](__m512bh w, int j) {
      for (int m = 0; m < Rows; ++m) {
        acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_loadu_si512(xb + m * K + 32 * j));
      }
    });
  }
  for (int m = 0; m < Rows; ++m) y[m * N] = _mm512_reduce_add_ps(acc[m]);
}

using RowDotFn = void (*)(int32_t, const uint8_t*, int64_t, int32_t, int32_t, const uint16_t*,
                          int64_t, float*, int64_t);
constexpr RowDotFn kRowDots[9] = {nullptr,         row_dot_vec<1>, row_dot_vec<2>,
                                  row_dot_vec<3>, row_dot_vec<4>, row_dot_vec<5>,
                                  row_dot_vec<6>, row_dot_vec<7>, row_dot_vec<8>};
#endif

#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XLASERVE_GGUF_AVX2 1
// The AVX2 path (no bfloat16 dot instruction): each run of 8 weights is computed in float32
// with dequant_block's operations, rounded to bfloat16 to nearest even with integer
// operations (kept in float32 lanes, low 16 bits zero), and multiplied with x converted to
// float32 once per call; products are exact in float32 and summed with FMAs.
inline __m256 round_to_bf16(__m256 v) {  // finite values, as bf16_rne
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int(0xFFFF0000u))));
}
inline __m256 bytes_to_ps(__m128i eight_bytes_low) {  // 8 unsigned bytes -> float32
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight_bytes_low));
}

// Calls emit(v, g) with v the g-th run of 8 weights of the block at b.
template <typename Emit>
inline void dequant_block_avx2(int32_t qtype, const uint8_t* b, Emit&& emit) {
  const __m128i mask4 = _mm_set1_epi8(0x0F);
  switch (qtype) {
    case kQ8_0: {
      const __m256 d = _mm256_set1_ps(f16_to_f32(b));
      for (int g = 0; g < 4; ++g) {
        const __m128i q = _mm_loadl_epi64((const __m128i*)(b + 2 + 8 * g));
        emit(round_to_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)), g);
      }
      return;
    }
    case kQ4_0:
    case kQ4_1: {
      // By table: the 16 values a nibble can take (dequant_block's operations), rounded
      // once; two 8-entry permutes and a blend by the nibble's bit 3 pick 8 weights.
      const bool q4_1 = qtype == kQ4_1;
      const __m256 d = _mm256_set1_ps(f16_to_f32(b));
      const __m256 low_iota = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 high_iota = _mm256_add_ps(low_iota, _mm256_set1_ps(8.0f));
      __m256 table[2];
      if (q4_1) {
        const __m256 m = _mm256_set1_ps(f16_to_f32(b + 2));
        table[0] = round_to_bf16(_mm256_add_ps(_mm256_mul_ps(d, low_iota), m));
        table[1] = round_to_bf16(_mm256_add_ps(_mm256_mul_ps(d, high_iota), m));
      } else {
        const __m256 eight = _mm256_set1_ps(8.0f);
        table[0] = round_to_bf16(_mm256_mul_ps(d, _mm256_sub_ps(low_iota, eight)));
        table[1] = round_to_bf16(_mm256_mul_ps(d, _mm256_sub_ps(high_iota, eight)));
      }
      const __m128i bytes = _mm_loadu_si128((const __m128i*)(b + (q4_1 ? 4 : 2)));
      const __m128i nibbles[2] = {_mm_and_si128(bytes, mask4),
                                  _mm_and_si128(_mm_srli_epi16(bytes, 4), mask4)};
      for (int g = 0; g < 4; ++g) {  // values 8g..: low nibbles of bytes 0-15, then high
        const __m256i q = _mm256_cvtepu8_epi32(g % 2 ? _mm_srli_si128(nibbles[g / 2], 8)
                                                     : nibbles[g / 2]);
        const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));  // bit 3 -> sign
        emit(_mm256_blendv_ps(_mm256_permutevar8x32_ps(table[0], q),
                              _mm256_permutevar8x32_ps(table[1], q), high), g);
      }
      return;
    }
    case kQ5_0: {
      const __m256 d = _mm256_set1_ps(f16_to_f32(b));
      uint32_t qh;
      std::memcpy(&qh, b + 2, 4);
      const __m128i bytes = _mm_loadu_si128((const __m128i*)(b + 6));
      const __m128i nibbles[2] = {_mm_and_si128(bytes, mask4),
                                  _mm_and_si128(_mm_srli_epi16(bytes, 4), mask4)};
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int g = 0; g < 4; ++g) {  // values 8g..8g+7; their high bits are bits 8g..8g+7
        const __m256i low = _mm256_cvtepu8_epi32(g % 2 ? _mm_srli_si128(nibbles[g / 2], 8)
                                                       : nibbles[g / 2]);
        const __m256i high = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(int(qh >> (8 * g))), lane), _mm256_set1_epi32(1));
        const __m256i q = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)),
                                           _mm256_set1_epi32(16));
        emit(round_to_bf16(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q))), g);
      }
      return;
    }
    case kQ4_K: {
      const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
      const uint8_t* s = b + 4;
      for (int j = 0; j < 8; ++j) {
        const auto [sc, mn] = k_scale_min(s, j);
        const __m256 dj = _mm256_set1_ps(d * float(sc)), mj = _mm256_set1_ps(dmin * float(mn));
        for (int h = 0; h < 2; ++h) {  // 16 bytes of the sub-block's 32, one nibble each
          __m128i q = _mm_loadu_si128((const __m128i*)(b + 16 + 32 * (j / 2) + 16 * h));
          if (j % 2) q = _mm_srli_epi16(q, 4);
          q = _mm_and_si128(q, mask4);
          for (int part = 0; part < 2; ++part) {
            const __m256 v = bytes_to_ps(part ? _mm_srli_si128(q, 8) : q);
            emit(round_to_bf16(_mm256_sub_ps(_mm256_mul_ps(dj, v), mj)), 4 * j + 2 * h + part);
          }
        }
      }
      return;
    }
    case kQ6_K: {
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16_to_f32(b + 208);
      const __m256i mask2 = _mm256_set1_epi32(3), bias = _mm256_set1_epi32(32);
      for (int half = 0; half < 2; ++half) {
        for (int r = 0; r < 4; ++r) {
          for (int i0 = 0; i0 < 32; i0 += 8) {
            const __m256i ql = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64((const __m128i*)(b + 64 * half + 32 * (r % 2) + i0)));
            const __m256i qh = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64((const __m128i*)(b + 128 + 32 * half + i0)));
            const __m256i low =
                _mm256_and_si256(_mm256_srli_epi32(ql, 4 * (r / 2)), _mm256_set1_epi32(15));
            const __m256i high = _mm256_and_si256(_mm256_srli_epi32(qh, 2 * r), mask2);
            const __m256i q =
                _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)), bias);
            const int idx = 128 * half + 32 * r + i0;
            const __m256 v =
                _mm256_mul_ps(_mm256_set1_ps(d * float(sc[idx / 16])), _mm256_cvtepi32_ps(q));
            emit(round_to_bf16(v), idx / 8);
          }
        }
      }
      return;
    }
  }
}

// One output row n against Rows rows of x (float32 [Rows, K]): the weights meet every row in
// registers. One row keeps four running sums and two rows two (FMA latency, not the loads,
// would bound a single chain).
template <int Rows>
inline void row_dot_avx2(int32_t qtype, const uint8_t* row, int64_t nblocks, int32_t values,
                         int32_t bytes, const float* x, int64_t K, float* y, int64_t N) {
  constexpr int kSums = Rows == 1 ? 4 : Rows == 2 ? 2 : 1;
  __m256 acc[Rows][kSums];
  for (int m = 0; m < Rows; ++m)
    for (int a = 0; a < kSums; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const float* xb = x + blk * values;
    dequant_block_avx2(qtype, row + blk * bytes, [&](__m256 w, int g) {
      for (int m = 0; m < Rows; ++m) {
        __m256& sum = acc[m][g % kSums];
        sum = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + m * K + 8 * g), sum);
      }
    });
  }
  for (int m = 0; m < Rows; ++m) {
    __m256 total = acc[m][0];
    for (int a = 1; a < kSums; ++a) total = _mm256_add_ps(total, acc[m][a]);
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    y[m * N] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
  }
}

// y[m, n] for Rows rows of x (float32) against one dequantized weight row w (float32[K]).
template <int Rows>
void dot_rows_f32(const float* x, int64_t K, const float* w, float* y, int64_t N) {
  __m256 acc[Rows];
  for (int m = 0; m < Rows; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int m = 0; m < Rows; ++m) acc[m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m]);
  }
  for (int m = 0; m < Rows; ++m) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    y[m * N] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
  }
}
using DotRowsF32Fn = void (*)(const float*, int64_t, const float*, float*, int64_t);
constexpr DotRowsF32Fn kDotRowsF32[9] = {nullptr,         dot_rows_f32<1>, dot_rows_f32<2>,
                                         dot_rows_f32<3>, dot_rows_f32<4>, dot_rows_f32<5>,
                                         dot_rows_f32<6>, dot_rows_f32<7>, dot_rows_f32<8>};

using RowDotAvx2Fn = void (*)(int32_t, const uint8_t*, int64_t, int32_t, int32_t, const float*,
                              int64_t, float*, int64_t);
constexpr RowDotAvx2Fn kRowDotsAvx2[9] = {nullptr,           row_dot_avx2<1>, row_dot_avx2<2>,
                                          row_dot_avx2<3>,   row_dot_avx2<4>, row_dot_avx2<5>,
                                          row_dot_avx2<6>,   row_dot_avx2<7>, row_dot_avx2<8>};
#endif

constexpr int kTile = 8;  // rows of x per pass over a scratch row

// y[m, n] for Rows rows of x against one dequantized weight row w (bf16[K]).
template <int Rows>
void dot_rows(const uint16_t* x, int64_t K, const uint16_t* w, float* y, int64_t N) {
#if defined(__AVX512BF16__)
  __m512 acc[Rows];
  for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < Rows; ++m) {
      acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k));
    }
  }
  for (int m = 0; m < Rows; ++m) y[m * N] = _mm512_reduce_add_ps(acc[m]);
#else
  for (int m = 0; m < Rows; ++m) {
    float acc[16] = {};
    for (int64_t k = 0; k < K; k += 16) {
      for (int i = 0; i < 16; ++i) {
        uint32_t a = uint32_t(w[k + i]) << 16, b = uint32_t(x[m * K + k + i]) << 16;
        float fa, fb;
        std::memcpy(&fa, &a, 4);
        std::memcpy(&fb, &b, 4);
        acc[i] += fa * fb;
      }
    }
    float sum = 0;
    for (int i = 0; i < 16; ++i) sum += acc[i];
    y[m * N] = sum;
  }
#endif
}

using DotRowsFn = void (*)(const uint16_t*, int64_t, const uint16_t*, float*, int64_t);
constexpr DotRowsFn kDotRows[kTile + 1] = {nullptr,     dot_rows<1>, dot_rows<2>,
                                           dot_rows<3>, dot_rows<4>, dot_rows<5>,
                                           dot_rows<6>, dot_rows<7>, dot_rows<8>};

struct Job {
  const uint16_t* x;
  std::vector<float> x_f32;  // the AVX2 path's copy of x in float32
  const uint8_t* w;
  float* y;
  int64_t M, K, N, row_bytes, chunk;
  int32_t qtype;
  Format fmt;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    std::vector<uint16_t> scratch(K);
#if defined(XLASERVE_GGUF_AVX2)
    std::vector<float> scratch_f32(K);
#endif
    xlaserve_cpu::claim_rows(next, done, N, chunk, w, row_bytes, [&](int64_t n) {
      const uint8_t* row = w + n * row_bytes;
#if defined(__AVX512BF16__)
      if (M <= kTile) {  // one row group: dequantize in registers, once
        for (int64_t m0 = 0; m0 < M; m0 += kTile) {
          kRowDots[std::min<int64_t>(kTile, M - m0)](qtype, row, K / fmt.values, fmt.values,
                                                    fmt.bytes, x + m0 * K, K,
                                                    y + m0 * N + n, N);
        }
        return;
      }
#elif defined(XLASERVE_GGUF_AVX2)
      if (M <= kTile) {
        kRowDotsAvx2[M](qtype, row, K / fmt.values, fmt.values, fmt.bytes, x_f32.data(), K,
                        y + n, N);
      } else {  // dequantize the row once into float32 scratch, then every row of x
        for (int64_t b = 0; b < K / fmt.values; ++b) {
          float* out = scratch_f32.data() + b * fmt.values;
          dequant_block_avx2(qtype, row + b * fmt.bytes,
                             [&](__m256 v, int g) { _mm256_storeu_ps(out + 8 * g, v); });
        }
        for (int64_t m0 = 0; m0 < M; m0 += kTile) {
          kDotRowsF32[std::min<int64_t>(kTile, M - m0)](x_f32.data() + m0 * K, K,
                                                       scratch_f32.data(), y + m0 * N + n, N);
        }
      }
      return;
#endif
      for (int64_t b = 0; b < K / fmt.values; ++b) {
#if defined(__AVX512BF16__)
        uint16_t* out = scratch.data() + b * fmt.values;
        dequant_block_vec(qtype, row + b * fmt.bytes, [&](__m512bh v, int j) {
          _mm512_storeu_si512(out + 32 * j, (__m512i)v);
        });
#else
        dequant_block(qtype, row + b * fmt.bytes, scratch.data() + b * fmt.values);
#endif
      }
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        kDotRows[std::min<int64_t>(kTile, M - m0)](x + m0 * K, K, scratch.data(),
                                                   y + m0 * N + n, N);
      }
    });
  }
};

ffi::Error GgufMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> w,
                      ffi::ResultBuffer<ffi::F32> y, int32_t qtype) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const Format fmt = format_of(qtype);
  if (fmt.values == 0) return ffi::Error::InvalidArgument("gguf_matmul: unsupported GGUF type");
  if (xd.size() != 2 || wd.size() != 2 || wd[1] % fmt.bytes != 0 ||
      wd[1] / fmt.bytes * fmt.values != xd[1] || xd[1] % 32 != 0) {
    return ffi::Error::InvalidArgument("gguf_matmul: x[M, K] and w[N, row_bytes] do not match");
  }
  auto job = std::make_shared<Job>();
  job->x = reinterpret_cast<const uint16_t*>(x.typed_data());
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->M = xd[0];
  job->K = xd[1];
  job->N = wd[0];
  job->row_bytes = wd[1];
  job->qtype = qtype;
  job->fmt = fmt;
#if defined(XLASERVE_GGUF_AVX2)
  {
    job->x_f32.resize(job->M * job->K);
    for (int64_t i = 0; i < job->M * job->K; ++i) {
      const uint32_t bits = uint32_t(job->x[i]) << 16;
      std::memcpy(&job->x_f32[i], &bits, 4);
    }
  }
#endif
  xlaserve_cpu::share_in_chunks(pool, job, job->N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaserveGgufMatmul, GgufMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("qtype"));
