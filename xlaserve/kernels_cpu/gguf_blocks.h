// What the GGUF CPU kernels share about the blocks: ggml's type ids, bytes and values per
// block, float16 scales, Q4_K's packed 6-bit scales and mins (layouts:
// xlaserve/quantization/gguf_blocks.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace xlaserve_gguf {

// ggml type ids (gguf.GGMLQuantizationType)
enum : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

struct Format {
  int32_t values, bytes;  // per block
};

inline Format format_of(int32_t qtype) {
  switch (qtype) {
    case kQ8_0: return {32, 34};
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ4_K: return {256, 144};
    case kQ6_K: return {256, 210};
    default: return {0, 0};
  }
}

// Q4_K sub-block j's 6-bit scale and min from the block's 12 packed bytes s.
inline std::pair<int, int> k_scale_min(const uint8_t* s, int j) {
  if (j < 4) return {s[j] & 0x3F, s[j + 4] & 0x3F};
  return {(s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30), (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30)};
}

}  // namespace xlaserve_gguf
