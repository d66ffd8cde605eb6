// ferry's own worker pool for the CPU kernels, in place of OpenMP parallel regions.
//
// Why not OpenMP: a region ends at a barrier that every thread of the team must reach,
// so when another process holds the core of one team thread, the whole step waits for
// the scheduler to give that thread its core back (a time slice, milliseconds), once per
// region, and a decode step opens dozens of regions. Serving on 2 cores with a busy
// neighbour ran 6-10x slower than quiet for that reason (issue 12's profile: 66% of the
// engine thread in libgomp's barrier and team-start waits).
//
// Here a job is done when its ITEMS are done, not when its threads have checked in: the
// calling thread takes items itself from the start, and a worker that has not woken up
// yet simply finds none left. The caller only ever waits for items a worker has already
// claimed and is running, so a descheduled worker costs its own share and never blocks.
//
// Workers spin briefly between jobs (the ops of one step follow each other within
// microseconds), yielding the core while they spin so that a neighbour (or MKL's own
// OpenMP thread during a matmul) runs first, and then sleep on a futex until the next job.
#pragma once

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ferry {

class ThreadPool {
 public:
  // fn(ctx, item, worker): worker is 0 for the calling thread, 1.. for pool threads.
  using ItemFn = void (*)(void* ctx, int64_t item, int worker);

  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();   // never destroyed: workers outlive exit
    return *pool;
  }

  // Runs fn(ctx, i, worker) for every i in [0, n) on the caller and up to num_threads - 1
  // workers; returns when all n items are done.
  void run(int64_t n, int num_threads, ItemFn fn, void* ctx) {
    const int helpers = std::min(num_threads - 1, kMaxWorkers);
    if (n <= 1 || helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i, 0);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    ensure_workers(helpers);
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    items_.store(n, std::memory_order_relaxed);
    helpers_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint32_t job = ++job_id_;
    ticket_.store(static_cast<uint64_t>(job) << 32, std::memory_order_release);
    // seq_cst pairs with the worker's sleepers_ increment: either it sees this bump
    // before it sleeps, or this load sees it asleep.
    wake_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAKE_PRIVATE, helpers,
              nullptr, nullptr, 0);
    }
    work_on(job, 0);
    wait_done(n);
  }

 private:
  static constexpr int kMaxWorkers = 63;
  // How long an idle worker looks for the next job before it sleeps: long enough to
  // bridge the Python between the ops of one step. FERRY_POOL_SPIN_US overrides it.
  static constexpr int64_t kDefaultSpinMicros = 200;

  ThreadPool() {
    const char* env = std::getenv("FERRY_POOL_SPIN_US");
    spin_for_ = std::chrono::microseconds(env ? std::max<int64_t>(0, std::atoll(env))
                                              : kDefaultSpinMicros);
  }

  // Starts pool threads up to `count`. A thread that cannot be started is not an error:
  // the caller then does more of the items itself.
  void ensure_workers(int count) {
    while (started_ < count && !start_failed_) {
      auto* start = new WorkerStart{this, started_ + 1};
      pthread_t thread;
      if (pthread_create(&thread, nullptr, &ThreadPool::thread_main, start) != 0) {
        delete start;
        start_failed_ = true;
        return;
      }
      pthread_detach(thread);
      ++started_;
    }
  }

  struct WorkerStart {
    ThreadPool* pool;
    int index;
  };

  static void* thread_main(void* arg) {
    const WorkerStart start = *static_cast<WorkerStart*>(arg);
    delete static_cast<WorkerStart*>(arg);
    start.pool->worker_loop(start.index);
    return nullptr;
  }

  // Claims and runs items of `job` until none is left (or the job is no longer current).
  void work_on(uint32_t job, int worker) {
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    while (true) {
      if (static_cast<uint32_t>(ticket >> 32) != job) return;
      // Read after the ticket's acquire: the fields of `job` (written before it).
      const int64_t n = items_.load(std::memory_order_relaxed);
      const ItemFn fn = fn_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      const int64_t item = static_cast<int64_t>(ticket & 0xffffffffu);
      if (item >= n) return;
      // The claim succeeds only while the ticket still belongs to `job`, so the fields
      // read above were that job's (the next job is set up only once this item is done).
      if (ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        fn(ctx, item, worker);
        done_.fetch_add(1, std::memory_order_release);
        ticket = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void wait_done(int64_t n) {
    // Only items a running worker claimed are left: short, unless that worker was just
    // preempted, in which case yielding lets it back onto this core sooner.
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 256) {
        pause();
      } else {
        sched_yield();
      }
    }
  }

  void worker_loop(int index) {
    uint32_t seen = wake_.load(std::memory_order_acquire);
    while (true) {
      seen = wait_for_job(seen);
      const uint64_t ticket = ticket_.load(std::memory_order_acquire);
      if (index > helpers_.load(std::memory_order_relaxed)) continue;   // this job asked for fewer threads
      work_on(static_cast<uint32_t>(ticket >> 32), index);
    }
  }

  // Returns the new wake_ value once it differs from `seen`.
  uint32_t wait_for_job(uint32_t seen) {
    const auto until = std::chrono::steady_clock::now() + spin_for_;
    for (int spins = 0;; ++spins) {
      const uint32_t now = wake_.load(std::memory_order_acquire);
      if (now != seen) return now;
      if (spins % 16 == 15) {
        if (std::chrono::steady_clock::now() > until) break;
        sched_yield();   // a neighbour that wants this core gets it
      } else {
        pause();
      }
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    uint32_t now;
    while ((now = wake_.load(std::memory_order_seq_cst)) == seen) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAIT_PRIVATE, seen,
              nullptr, nullptr, 0);
    }
    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
    return now;
  }

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  std::chrono::microseconds spin_for_;
  std::mutex job_mutex_;
  int started_ = 0;            // under job_mutex_
  bool start_failed_ = false;
  // (job id << 32) | next item: claimed with compare-and-swap.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> wake_{0};   // futex word: bumped once per job
  std::atomic<int> sleepers_{0};
  uint32_t job_id_ = 0;   // under job_mutex_
  // The current job; atomics because a late worker may read them while the next job is
  // being set up (its claim then fails and it reads again).
  std::atomic<ItemFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> items_{0};
  std::atomic<int> helpers_{0};
};

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");

// fn(i, worker) for i in [0, n) on the pool (worker in [0, num_threads)).
template <typename Fn>
inline void pool_for(int64_t n, int num_threads, Fn&& fn) {
  using F = std::remove_reference_t<Fn>;
  ThreadPool::instance().run(n, num_threads, [](void* ctx, int64_t i, int worker) {
    (*static_cast<F*>(ctx))(i, worker);
  }, static_cast<void*>(&fn));
}

}  // namespace ferry
