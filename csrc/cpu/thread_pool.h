// The CPU kernels' worker threads: run_workers(tasks, run) runs run(next) on torch.get_num_threads()
// threads, each drawing task ids from one shared counter.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace localvol {
namespace cpu {

// Own threads: at least this many tasks per thread, else fewer threads.
constexpr int64_t kMinTasksPerThread = 4;

// Calls run(next) on `workers` threads (this one included), where next() hands out task ids 0, 1, ...
// (then values >= tasks). at::parallel_for is a header template that only runs in parallel when the
// including file is compiled with OpenMP (-fopenmp), which torch's extension build does not add, so
// without INTRA_OP_PARALLEL it would run everything on the calling thread: then this starts its own.
// Tasks are handed out dynamically, which also balances a machine shared with other processes.
template <typename Run>
void run_workers(int64_t tasks, const Run& run) {
  std::atomic<int64_t> counter{0};
  auto next = [&counter] { return counter.fetch_add(1, std::memory_order_relaxed); };
#if defined(INTRA_OP_PARALLEL)
  // One task list; parallel_for's ranges each run a worker that draws from it.
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks), 1,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t worker = begin; worker < end; ++worker) run(next);
                   });
#else
  at::internal::lazy_init_num_threads();
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks / kMinTasksPerThread);
  if (workers <= 1 || at::in_parallel_region()) {
    run(next);
    return;
  }
  std::vector<std::exception_ptr> errors(workers);
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int64_t w = 1; w < workers; ++w) {
    try {
      threads.emplace_back([&, w] {
        try {
          c10::ParallelGuard guard(true);
          run(next);
        } catch (...) {
          errors[w] = std::current_exception();
          counter.store(tasks);  // the others stop at their next task
        }
      });
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the ones running (and this one) do all the tasks
    }
  }
  try {
    c10::ParallelGuard guard(true);
    run(next);
  } catch (...) {
    errors[0] = std::current_exception();
    counter.store(tasks);
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
#endif
}

}  // namespace cpu
}  // namespace localvol
