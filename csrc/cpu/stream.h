// The random stream on the CPU, a chunk of Philox blocks at a time (definition: ../philox.h).
//
// The words are those of philox.h, computed for kChunkBlocks blocks at once (AVX2/AVX-512 intrinsics,
// else a loop GCC vectorizes with SSE2's pmuludq). The Gaussians follow philox.h's Box-Muller in
// float32 step by step (uniforms, -2 log u, sqrt, phi = u * float32(2 pi), rho * cos, rho * sin) except
// that log, sin and cos are evaluated in float64 by branch-free polynomials and rounded once to float32:
// on every one of the 2^24 possible uniforms this gives the correctly rounded logf, sinf and cosf
// (checked exhaustively against float(log(double)) etc.), where glibc and SLEEF are within 1 ulp. The
// loops vectorize, and every ISA path gives bit-identical Gaussians. Defined in stream.cpp.
#pragma once

#include <cstdint>

namespace localvol {
namespace cpu {

// Philox blocks per chunk of the per-thread buffer (20 KiB: stays in L1).
constexpr int kChunkBlocks = 512;

// One chunk's buffers. The words of block i of a chunk of `count` blocks: radius[i] = x0,
// radius[count + i] = x2, angle[i] = x1, angle[count + i] = x3 (pair p = (radius[p], angle[p])).
struct StreamChunk {
  alignas(64) uint32_t radius[2 * kChunkBlocks];
  alignas(64) uint32_t angle[2 * kChunkBlocks];
  alignas(64) float rho[2 * kChunkBlocks];
  alignas(64) float z[4 * kChunkBlocks];  // element order: z[4 i + lane]
};

// The words of blocks [first, first + count) of direction `index` (count <= kChunkBlocks) into
// chunk.radius / chunk.angle, and its Gaussians (the words, then chunk.rho and chunk.z).
using WordsFn = void (*)(uint64_t seed, uint64_t index, uint64_t first, int count, StreamChunk& chunk);
using GaussiansFn = void (*)(uint64_t seed, uint64_t index, uint64_t first, int count, StreamChunk& chunk);

// The ISA path for this CPU (isa.h): picked once, called through the pointer.
WordsFn stream_words();
GaussiansFn stream_gaussians();

}  // namespace cpu
}  // namespace localvol
