// Ragged paged attention for the CPU: the contract of
// xlaserve/kernels_pallas/ragged_paged_attention/reference.py (prefill, chunked prefill and
// decode rows mixed in one call, causal, optional sliding window and soft cap), for float32
// and bfloat16 caches.
//
// The reference gathers every query row's pages and loops over them in small XLA ops; here
// one work item is (sequence, kv head, run of up to kRowRun query rows): it reads each of the
// sequence's pages once, and each page's keys and values meet every query row of the run and
// every query head of the group while in cache (online softmax per row, float32). Items are
// shared out over XLA's intra-op thread pool; the calling thread works too.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

// Fused multiply-adds here (the library builds with contraction off for the GGUF kernel).
#pragma GCC optimize("fp-contract=fast")

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowRun = 32;  // query rows per work item
constexpr int64_t kInlineMacs = 1 << 16;  // below this, no pool threads (see PagedAttention)

// One vector of float32 lanes: 512 bits with AVX512, else 256 (GCC splits a 512-bit generic
// vector on AVX2 through memory: measured ~1 us per key at one decode row). Unaligned loads
// go through the may-alias typedefs.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef float fvec_u __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef uint16_t hvec_u __attribute__((vector_size(2 * kLanes), aligned(2), may_alias));
typedef uint32_t uvec __attribute__((vector_size(4 * kLanes)));

inline fvec load(const float* p) { return *reinterpret_cast<const fvec_u*>(p); }

inline fvec load(const uint16_t* p) {  // bfloat16 -> float32, exact
  const uvec wide = __builtin_convertvector(*reinterpret_cast<const hvec_u*>(p), uvec) << 16;
  return reinterpret_cast<const fvec&>(wide);
}

inline void store(float* p, fvec v) { *reinterpret_cast<fvec_u*>(p) = v; }

inline float hsum(fvec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(__m512(v));
#elif defined(__AVX__)
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(__m256(v)), _mm256_extractf128_ps(__m256(v), 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#else
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// The sums of kLanes vectors, one per lane (lane j: the sum of a[j]'s lanes): pairs of vectors
// are folded into one by adding neighbouring lanes of their concatenation, log2(kLanes) times,
// which takes kLanes - 1 folds where one horizontal sum per vector took kLanes of them.
inline fvec pair_sums(fvec a, fvec b) {
#if defined(__AVX512F__)
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

inline fvec lane_sums(fvec* a) {  // destroys a[0..kLanes)
  for (int width = kLanes; width > 1; width /= 2) {
    for (int i = 0; i < width / 2; ++i) a[i] = pair_sums(a[2 * i], a[2 * i + 1]);
  }
  return a[0];
}

struct Problem {
  const float* q;  // [T, N, H]
  const void* kv;  // [P, page_size, 2K, H]
  const int32_t *kv_lens, *page_indices, *cu_q_lens;
  float* out;  // [T, N, H]
  int64_t T, N, K, H, page_size, pages_per_seq;
  float sm_scale, soft_cap;
  int32_t sliding_window;  // 0: none
};

struct Item {
  int64_t seq, head, row0, row1;  // rows [row0, row1) of sequence seq, kv head `head`
};

// e^x for x <= 0, all lanes at once (x = -inf gives 0): 2^n * a degree-6 polynomial of the
// remainder, relative error ~2e-7, against one libm call per key before.
inline fvec exp_nonpositive(fvec x) {
  const fvec clamped = x < -87.0f ? fvec{} - 87.0f : x;
  const fvec magic = fvec{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const fvec t = clamped * 1.44269504f + magic;
  const fvec n = t - magic;
  const fvec r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  fvec poly = fvec{} + 1.0f / 720;
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const uvec bits = reinterpret_cast<const uvec&>(t) - reinterpret_cast<const uvec&>(magic);
  const uvec scale = (bits + 127u) << 23;  // 2^n
  const fvec out = poly * reinterpret_cast<const fvec&>(scale);
  return x < -87.0f ? fvec{} : out;
}

// Scores of keys [from, to] (positions; key j at `keys + j * token_stride`) against one query
// head `qv` (Vecs vectors), into sc[0..n): each key's products stay a vector until kLanes keys
// are folded into one vector of sums at once (lane_sums).
template <typename KV, int Vecs>
inline void page_scores(const float* qv, const KV* keys, int64_t token_stride, int64_t n,
                        float sm_scale, float soft_cap, float* sc) {
  fvec q[Vecs];
#pragma GCC unroll 32
  for (int v = 0; v < Vecs; ++v) q[v] = load(qv + v * kLanes);
  fvec partial[kLanes];
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - j0);
    for (int64_t j = 0; j < kLanes; ++j) {
      fvec acc = fvec{};
      if (j < m) {
        const KV* key = keys + (j0 + j) * token_stride;
#pragma GCC unroll 32
        for (int v = 0; v < Vecs; ++v) acc += q[v] * load(key + v * kLanes);
      }
      partial[j] = acc;
    }
    fvec sums = lane_sums(partial) * sm_scale;
    if (soft_cap > 0) {
      for (int i = 0; i < kLanes; ++i) sums[i] = soft_cap * std::tanh(sums[i] / soft_cap);
    }
    store(sc + j0, sums);
  }
}

// acc (Vecs vectors, in registers) += sum over keys j of w[j] * value j.
template <typename KV, int Vecs>
inline void page_values(const float* w, const KV* values, int64_t token_stride, int64_t n,
                        float rescale, float* out) {
  fvec acc[Vecs];
#pragma GCC unroll 32
  for (int v = 0; v < Vecs; ++v) acc[v] = load(out + v * kLanes) * rescale;
  for (int64_t j = 0; j < n; ++j) {
    const KV* value = values + j * token_stride;
    const fvec wj = fvec{} + w[j];
#pragma GCC unroll 32
    for (int v = 0; v < Vecs; ++v) acc[v] += wj * load(value + v * kLanes);
  }
#pragma GCC unroll 32
  for (int v = 0; v < Vecs; ++v) store(out + v * kLanes, acc[v]);
}

template <typename KV, int Vecs>
void attend(const Problem& p, const Item& it, std::vector<float>& state,
            std::vector<float>& scores) {
  const int64_t G = p.N / p.K, H = p.H, rows = it.row1 - it.row0;
  const int64_t q_start = p.cu_q_lens[it.seq];
  const int64_t q_len = p.cu_q_lens[it.seq + 1] - q_start, kv_len = p.kv_lens[it.seq];
  const int64_t first_pos = kv_len - q_len + (it.row0 - q_start);  // query position of row0
  const int64_t last_pos = first_pos + rows - 1;
  const int64_t lo = p.sliding_window > 0 ? std::max<int64_t>(0, first_pos - p.sliding_window + 1)
                                          : 0;
  const int64_t hi = std::min<int64_t>(last_pos, kv_len - 1);  // last key any row sees
  // Per (row, group head): running max, denominator, and H accumulated values.
  const int64_t stride = H + 2;
  state.assign(rows * G * stride, 0.0f);
  for (int64_t i = 0; i < rows * G; ++i) state[i * stride] = -std::numeric_limits<float>::infinity();
  // Scores of one page for each group head, padded to whole vectors.
  const int64_t span = (p.page_size + kLanes - 1) / kLanes * kLanes;
  scores.resize(G * span);
  const KV* cache = static_cast<const KV*>(p.kv);
  const int64_t token_stride = 2 * p.K * H, page_stride = p.page_size * token_stride;
  for (int64_t page_no = lo / p.page_size; hi >= 0 && page_no <= hi / p.page_size; ++page_no) {
    const int64_t page = p.page_indices[it.seq * p.pages_per_seq + page_no];
    const KV* base = cache + page * page_stride;
    const int64_t pos0 = page_no * p.page_size;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t q_pos = first_pos + r;
      const int64_t from = std::max<int64_t>(
          pos0, p.sliding_window > 0 ? q_pos - p.sliding_window + 1 : 0);
      const int64_t to = std::min<int64_t>({pos0 + p.page_size - 1, q_pos, kv_len - 1});
      if (from > to) continue;
      const int64_t n = to - from + 1, padded = (n + kLanes - 1) / kLanes * kLanes;
      const float* q_row = p.q + ((it.row0 + r) * p.N + it.head * G) * H;
      // The page's keys and values stay in cache for all G query heads of their group.
      const KV* keys = base + (from - pos0) * token_stride + (2 * it.head) * H;
      const KV* values = keys + H;
      for (int64_t g = 0; g < G; ++g) {
        float* sc = scores.data() + g * span;
        page_scores<KV, Vecs>(q_row + g * H, keys, token_stride, n, p.sm_scale, p.soft_cap, sc);
        for (int64_t j = n; j < padded; ++j) sc[j] = -std::numeric_limits<float>::infinity();
        float* st = state.data() + (r * G + g) * stride;
        const float block_max = *std::max_element(sc, sc + n);
        const float new_max = std::max(st[0], block_max);
        const float rescale = std::isfinite(st[0]) ? std::exp(st[0] - new_max) : 0.0f;
        fvec sum = fvec{};
        for (int64_t j = 0; j < padded; j += kLanes) {
          const fvec w = exp_nonpositive(load(sc + j) - new_max);
          store(sc + j, w);
          sum += w;
        }
        st[0] = new_max;
        st[1] = st[1] * rescale + hsum(sum);
        page_values<KV, Vecs>(sc, values, token_stride, n, rescale, st + 2);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* st = state.data() + (r * G + g) * stride;
      const float inv = st[1] > 0 ? 1.0f / st[1] : 0.0f;  // rows with no keys stay 0
      float* o = p.out + ((it.row0 + r) * p.N + it.head * G + g) * H;
      for (int64_t h = 0; h < H; ++h) o[h] = st[2 + h] * inv;
    }
  }
}

using AttendFn = void (*)(const Problem&, const Item&, std::vector<float>&, std::vector<float>&);

// attend<KV, H / kLanes> for every head dim the kernel takes (multiples of 16 up to
// kMaxHeadDim): the query and the accumulators of one head stay in registers.
constexpr int64_t kMaxHeadDim = 256;
constexpr int kStep = 16 / kLanes;  // vectors per 16 values

template <typename KV, int... I>
constexpr std::array<AttendFn, sizeof...(I)> attend_table(std::integer_sequence<int, I...>) {
  return {attend<KV, (I + 1) * kStep>...};
}

template <typename KV>
AttendFn attend_for(int64_t head_dim) {
  static constexpr auto table = attend_table<KV>(std::make_integer_sequence<int, kMaxHeadDim / 16>{});
  if (head_dim % 16 || head_dim < 16 || head_dim > kMaxHeadDim) return nullptr;
  return table[head_dim / 16 - 1];
}

struct Job {
  Problem problem;
  std::vector<Item> items;
  AttendFn attend;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    std::vector<float> state, scores;
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= int64_t(items.size())) return;
      attend(problem, items[i], state, scores);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                          ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                          int32_t sliding_window) {
  const auto qd = q.dimensions(), kd = kv.dimensions(), pd = page_indices.dimensions();
  const bool bf16 = kv.element_type() == ffi::DataType::BF16;
  if (!bf16 && kv.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("paged_attention: the cache must be float32 or bfloat16");
  }
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2 || kd[3] != qd[2] || kd[2] % 2 ||
      qd[2] % kLanes || qd[1] % (kd[2] / 2)) {
    return ffi::Error::InvalidArgument("paged_attention: q[T, N, H] and the cache do not match");
  }
  auto job = std::make_shared<Job>();
  Problem& p = job->problem;
  p = Problem{q.typed_data(), kv.untyped_data(), kv_lens.typed_data(),
              page_indices.typed_data(), cu_q_lens.typed_data(), out->typed_data(),
              qd[0], qd[1], kd[2] / 2, qd[2], kd[1], pd[1], sm_scale, soft_cap, sliding_window};
  job->attend = bf16 ? attend_for<uint16_t>(p.H) : attend_for<float>(p.H);
  if (job->attend == nullptr) {
    return ffi::Error::InvalidArgument("paged_attention: the head dim must be 16-256, a multiple of 16");
  }
  std::memset(p.out, 0, sizeof(float) * p.T * p.N * p.H);  // padding rows stay 0
  const int64_t seqs = std::min<int64_t>(num_seqs.typed_data()[0], kv_lens.dimensions()[0]);
  int64_t macs = 0;  // query-key pairs times head dim, over all items (an upper bound)
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t r0 = p.cu_q_lens[s], r1 = std::min<int64_t>(p.cu_q_lens[s + 1], p.T);
    macs += std::max<int64_t>(0, r1 - r0) * p.kv_lens[s] * p.N * p.H;
    for (int64_t head = 0; head < p.K; ++head) {
      for (int64_t r = r0; r < r1; r += kRowRun) {
        job->items.push_back({s, head, r, std::min(r1, r + kRowRun)});
      }
    }
  }
  const int64_t n = job->items.size();
  // A small call (a few decode rows) runs on the calling thread alone: waking a pool thread
  // costs more than the work.
  const int64_t workers = macs < kInlineMacs ? 1 : xlaserve_cpu::workers_for(pool);
  xlaserve_cpu::share_work(pool, job, workers, n, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaservePagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("sliding_window"));
