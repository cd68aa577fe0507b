// How the stream ops split their work: (direction, run of kBlocksPerTask Philox blocks) tasks run in
// parallel (thread_pool.h), each walking its run a chunk of kChunkBlocks blocks at a time (stream.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>

#include "../philox.h"
#include "stream.h"
#include "thread_pool.h"

namespace localvol {
namespace cpu {

// Philox blocks per parallel task: big enough to amortize scheduling, small enough to balance. Also
// fixes direction_stats' summation order (one partial per task), whatever the thread count.
constexpr int64_t kBlocksPerTask = 1 << 12;
static_assert(kBlocksPerTask % kChunkBlocks == 0, "a task is whole chunks");

// Runs of kBlocksPerTask blocks per row covering `blocks` (at least 1).
inline int64_t runs_per_row(const BlockRange& blocks) {
  return std::max<int64_t>(1, (blocks.count + kBlocksPerTask - 1) / kBlocksPerTask);
}

// Runs task(task_id, row, first_block, last_block, chunk) over the (row, run of kBlocksPerTask blocks)
// tasks covering elements [start, start + length) of every row, in parallel, with a chunk buffer per
// worker. Tasks are numbered row * runs_per_row + run.
template <typename Task>
void parallel_tasks(int64_t rows, int64_t start, int64_t length, const Task& task) {
  const BlockRange blocks = block_range(start, length);
  const int64_t runs = runs_per_row(blocks);
  if (rows == 0 || blocks.count == 0) return;
  const int64_t tasks = rows * runs;
  run_workers(tasks, [&](const auto& next) {
    std::unique_ptr<StreamChunk> chunk(new StreamChunk);
    for (int64_t id = next(); id < tasks; id = next()) {
      const int64_t row = id / runs;
      const int64_t first = blocks.first + (id % runs) * kBlocksPerTask;
      const int64_t last = std::min(first + kBlocksPerTask, blocks.first + blocks.count);
      task(id, row, first, last, *chunk);
    }
  });
}

// Walks blocks [first, last) of direction `index` chunk by chunk: fill(chunk's first block, block count)
// computes the chunk, then consume(j, k0, m) gets its elements j .. j + m - 1 of [0, length), which are
// entries k0 .. k0 + m - 1 of the chunk (element 4 i + lane is entry 4 i + lane, i counted from the chunk).
template <typename Fill, typename Consume>
void walk_chunks(int64_t first, int64_t last, int64_t start, int64_t length, const Fill& fill, const Consume& consume) {
  for (int64_t block = first; block < last; block += kChunkBlocks) {
    const int count = static_cast<int>(std::min<int64_t>(kChunkBlocks, last - block));
    fill(static_cast<uint64_t>(block), count);
    const int64_t offset = 4 * block - start;  // element offset of the chunk's entry 0
    const int64_t lo = std::max<int64_t>(0, -offset);
    const int64_t hi = std::min<int64_t>(4 * count, length - offset);
    if (hi > lo) consume(offset + lo, lo, hi - lo);
  }
}

}  // namespace cpu
}  // namespace localvol
