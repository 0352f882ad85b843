// How the CPU kernels share a call's work with XLA's intra-op thread pool: the calling
// thread and (workers - 1) pool tasks claim chunks from one atomic counter, then the caller
// waits for the chunks still in flight.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace xlaserve_cpu {

// One worker per core: the calling thread and num_threads - 1 pool tasks (XLA's intra-op
// pool has a thread per core). One worker more measured 1.7x slower and erratic at one row
// on 2 cores: a preempted worker holds a chunk the others then wait for.
inline int64_t workers_for(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// Waits until `done` reaches `total`. It spins briefly (the others are mid-chunk), then
// yields its core: a worker the OS has descheduled (behind the engine's host thread, say)
// then finishes its chunk here instead of after a scheduler time slice. Spinning alone
// measured a 4x slower attention call at batch 32 with the host thread busy.
inline void wait_until(const std::atomic<int64_t>& done, int64_t total) {
  for (int spins = 0; done.load(std::memory_order_acquire) < total; ++spins) {
    if (spins < 2000) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// How far ahead of its row a worker prefetches a matmul's weight rows: 1-8 KB measured alike
// (SmolLM2's MLP at one row, 2-core Xeon, GGUF kernel: 9.6 ms without, 5.3-5.6 ms with), 2 KB
// the best of them. At decode the rows stream from memory.
constexpr int64_t kPrefetchBytes = 2048;

// A worker's share of a matmul over N weight rows (row_bytes each, from w): claims chunks of
// `chunk` rows from `next` until none is left, calls row(n) for each row of its chunks with
// that row prefetched ahead, and adds each finished chunk to `done`.
template <typename Row>
inline void claim_rows(std::atomic<int64_t>& next, std::atomic<int64_t>& done, int64_t N,
                       int64_t chunk, const uint8_t* w, int64_t row_bytes, Row&& row) {
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / row_bytes);  // rows
  const auto prefetch_rows = [&](int64_t first, int64_t last) {
    const uint8_t* end = w + last * row_bytes;
    for (const uint8_t* p = w + first * row_bytes; p < end; p += 64) __builtin_prefetch(p);
  };
  for (;;) {
    const int64_t start = next.fetch_add(chunk);
    if (start >= N) return;
    const int64_t stop = std::min(N, start + chunk);
    prefetch_rows(start, std::min(stop, start + ahead));
    for (int64_t n = start; n < stop; ++n) {
      if (n + ahead < stop) prefetch_rows(n + ahead, n + ahead + 1);
      row(n);
    }
    done.fetch_add(stop - start, std::memory_order_release);
  }
}

// Runs job->work() on the calling thread and on pool tasks up to `workers` in all (no more
// than `tasks`, the chunks there are to claim), then waits until job->done reaches `total`.
// The job is shared with the tasks: one may start after the caller has finished every chunk.
template <typename Job>
inline void share_work(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job,
                       int64_t workers, int64_t tasks, int64_t total) {
  for (int64_t i = 1; i < std::min(workers, tasks); ++i) pool.Schedule([job] { job->work(); });
  job->work();
  wait_until(job->done, total);
}

// share_work for a job of `total` units claimed in chunks: about 8 claims per worker
// (job->chunk), so a worker the OS preempts holds back little of the call.
template <typename Job>
inline void share_in_chunks(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job,
                            int64_t total) {
  const int64_t workers = workers_for(pool);
  job->chunk = std::max<int64_t>(1, total / (8 * workers));
  share_work(pool, job, workers, (total + job->chunk - 1) / job->chunk, total);
}

}  // namespace xlaserve_cpu
