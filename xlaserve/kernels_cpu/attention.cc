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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
constexpr int64_t kRowRun = 32;  // query rows per work item
constexpr int64_t kInlineMacs = 1 << 20;  // below this, no pool threads (see PagedAttention)
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load(const uint16_t* p) {  // bfloat16 -> float32, exact
  u16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  u32x16 wide = __builtin_convertvector(raw, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

inline float hsum(f32x16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(__m512(v));
#else
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
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

template <typename KV>
void attend(const Problem& p, const Item& it, std::vector<float>& state) {
  const int64_t G = p.N / p.K, H = p.H, vecs = H / kLanes, rows = it.row1 - it.row0;
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
  const KV* cache = static_cast<const KV*>(p.kv);
  const int64_t token_stride = 2 * p.K * H, page_stride = p.page_size * token_stride;
  std::vector<float> scores(p.page_size);
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
      for (int64_t g = 0; g < G; ++g) {
        const float* qv = p.q + ((it.row0 + r) * p.N + it.head * G + g) * H;
        float* st = state.data() + (r * G + g) * stride;
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t pos = from; pos <= to; ++pos) {
          const KV* key = base + (pos - pos0) * token_stride + (2 * it.head) * H;
          f32x16 acc = f32x16{};
          for (int64_t v = 0; v < vecs; ++v) acc += load(qv + v * kLanes) * load(key + v * kLanes);
          float s = hsum(acc) * p.sm_scale;
          if (p.soft_cap > 0) s = p.soft_cap * std::tanh(s / p.soft_cap);
          scores[pos - from] = s;
          block_max = std::max(block_max, s);
        }
        const float new_max = std::max(st[0], block_max);
        const float rescale = std::isfinite(st[0]) ? std::exp(st[0] - new_max) : 0.0f;
        float* acc = st + 2;
        if (rescale != 1.0f) {
          for (int64_t h = 0; h < H; ++h) acc[h] *= rescale;
        }
        float denom = st[1] * rescale;
        for (int64_t pos = from; pos <= to; ++pos) {
          const float w = std::exp(scores[pos - from] - new_max);
          denom += w;
          const KV* value = base + (pos - pos0) * token_stride + (2 * it.head + 1) * H;
          for (int64_t v = 0; v < vecs; ++v) {
            const f32x16 sum = load(acc + v * kLanes) + w * load(value + v * kLanes);
            std::memcpy(acc + v * kLanes, &sum, sizeof(sum));
          }
        }
        st[0] = new_max;
        st[1] = denom;
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

struct Job {
  Problem problem;
  std::vector<Item> items;
  bool bf16;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    std::vector<float> state;
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= int64_t(items.size())) return;
      if (bf16) {
        attend<uint16_t>(problem, items[i], state);
      } else {
        attend<float>(problem, items[i], state);
      }
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
  job->bf16 = bf16;
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
  for (int64_t i = 1; i < std::min(workers, n); ++i) pool.Schedule([job] { job->work(); });
  job->work();
  xlaserve_cpu::wait_until(job->done, n);
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
