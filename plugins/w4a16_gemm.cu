// W4A16 GEMM kernels; the interface and the weight layout are documented in w4a16_gemm.cuh.
#include "w4a16_gemm.cuh"

#include <algorithm>
#include <atomic>
#include <cstring>

namespace {

constexpr int kGroupSize = QVGGT_W4A16_GROUP_SIZE;
constexpr int kTileN = 8;                                  // output columns per MMA tile
constexpr int kChunkLanes = 32;                            // uint4 per (tile, group) chunk
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTilesPerWarp = 4;
constexpr int kBlockN = kWarps * kTilesPerWarp * kTileN;   // 128 output columns per block
constexpr int kRowChunks = kGroupSize / 8;                 // 16-byte pieces of one X row in a group

// Dispatch and grid defaults. None of them has been measured yet (no GPU was available when they
// were written); scripts/gpu_check.py times both paths per shape and M and reports the crossover.
constexpr int kFusedMaxM = 64;
constexpr int kMaxSplits = 16;
constexpr int kTargetBlocksPerSm = 4;

constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Register-level dequantization.

__device__ __forceinline__ uint32_t and_or(uint32_t value, uint32_t mask, uint32_t bits) {
  uint32_t out;
  // lop3 truth table 0xEA = (a & b) | c
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(out) : "r"(value), "r"(mask), "r"(bits));
  return out;
}

__device__ __forceinline__ half2 bits_to_half2(uint32_t bits) {
  half2 h;
  memcpy(&h, &bits, sizeof(h));
  return h;
}

__device__ __forceinline__ uint32_t half2_to_bits(half2 h) {
  uint32_t bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}

// One word of 8 nibbles -> 4 fp16 pairs (nibbles 0|4, 1|5, 2|6, 3|7), each multiplied by the
// group scale. OR-ing a nibble v into the mantissa of fp16 1024 (0x6400) gives exactly 1024 + v;
// a nibble sitting 4 bits higher gives 1024 + 16 v. Subtracting 1032 (resp. fma with 1/16 and
// -72) yields v - 8 = q exactly, so the only rounding is the final q * scale.
__device__ __forceinline__ void dequant_word(uint32_t word, half2 scale, uint32_t (&out)[4]) {
  constexpr uint32_t kLowNibbles = 0x000f000f;
  constexpr uint32_t kHighNibbles = 0x00f000f0;
  constexpr uint32_t kFp16_1024 = 0x64006400;
  const half2 low_bias = bits_to_half2(0x64086408);    // 1032, 1032
  const half2 high_scale = bits_to_half2(0x2c002c00);  // 1/16, 1/16
  const half2 high_bias = bits_to_half2(0xd480d480);   // -72, -72
  const uint32_t shifted = word >> 8;
  const half2 q0 = __hsub2(bits_to_half2(and_or(word, kLowNibbles, kFp16_1024)), low_bias);
  const half2 q1 = __hfma2(bits_to_half2(and_or(word, kHighNibbles, kFp16_1024)), high_scale, high_bias);
  const half2 q2 = __hsub2(bits_to_half2(and_or(shifted, kLowNibbles, kFp16_1024)), low_bias);
  const half2 q3 = __hfma2(bits_to_half2(and_or(shifted, kHighNibbles, kFp16_1024)), high_scale, high_bias);
  out[0] = half2_to_bits(__hmul2(q0, scale));
  out[1] = half2_to_bits(__hmul2(q1, scale));
  out[2] = half2_to_bits(__hmul2(q2, scale));
  out[3] = half2_to_bits(__hmul2(q3, scale));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; valid == false zero-fills (rows past M).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address)
               : "memory");
}

__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// Fused small-M kernel.
//
// Block: 4 warps, 16 * kMTiles rows of X, 128 output columns (each warp 4 tiles of 8), a range of
// K groups (split-K along grid.z). Per group the block stages X[rows, 128] in shared memory with
// cp.async (double-buffered, 16-byte pieces XOR-swizzled by row so ldmatrix is conflict-free),
// while every lane loads its 16-byte slice of each tile's weight chunk straight into registers
// (coalesced: a warp reads 512 contiguous bytes per tile) and prefetches the next group's.
template <int kMTiles>
__global__ void __launch_bounds__(kThreads)
fused_w4a16_kernel(const __half* __restrict__ x, const uint4* __restrict__ weight,
                   const __half* __restrict__ scales, const __half* __restrict__ bias,
                   __half* __restrict__ y, float* __restrict__ partials, int m, int n, int k,
                   int groups_per_split) {
  constexpr int kBlockM = 16 * kMTiles;
  __shared__ __align__(16) uint4 x_stage[2][kBlockM * kRowChunks];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int groups = k / kGroupSize;
  const int n_tiles = n / kTileN;
  const int first_tile = (blockIdx.x * kWarps + warp) * kTilesPerWarp;
  const int m0 = blockIdx.y * kBlockM;
  const int g_begin = blockIdx.z * groups_per_split;
  const int g_end = min(groups, g_begin + groups_per_split);

  auto stage_x = [&](int g, int buffer) {
    for (int i = threadIdx.x; i < kBlockM * kRowChunks; i += kThreads) {
      const int row = i / kRowChunks;
      const int piece = i % kRowChunks;
      const bool valid = m0 + row < m;
      const __half* src = valid ? x + static_cast<size_t>(m0 + row) * k + g * kGroupSize + piece * 8 : x;
      cp_async_16(shared_address(&x_stage[buffer][row * kRowChunks + (piece ^ (row & 7))]), src, valid);
    }
    cp_async_commit();
  };
  auto load_weights = [&](int g, uint4 (&w)[kTilesPerWarp], half2 (&s)[kTilesPerWarp]) {
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
      const int tile = first_tile + t;
      if (tile < n_tiles) {
        w[t] = __ldg(weight + (static_cast<size_t>(tile) * groups + g) * kChunkLanes + lane);
        s[t] = __half2half2(scales[static_cast<size_t>(g) * n + tile * kTileN + lane / 4]);
      } else {
        w[t] = make_uint4(0, 0, 0, 0);
        s[t] = __float2half2_rn(0.0f);
      }
    }
  };

  float acc[kMTiles][kTilesPerWarp][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][t][e] = 0.0f;

  uint4 w_cur[kTilesPerWarp], w_next[kTilesPerWarp];
  half2 s_cur[kTilesPerWarp], s_next[kTilesPerWarp];
  stage_x(g_begin, 0);
  load_weights(g_begin, w_cur, s_cur);

  for (int g = g_begin; g < g_end; ++g) {
    const int buffer = (g - g_begin) & 1;
    const bool has_next = g + 1 < g_end;
    if (has_next) {
      stage_x(g + 1, buffer ^ 1);
      load_weights(g + 1, w_next, s_next);
    } else {
      cp_async_commit();  // an empty group keeps "all but the newest group" meaning "group g"
    }
    cp_async_wait<1>();
    __syncthreads();

    const uint4* tile_x = x_stage[buffer];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b[kTilesPerWarp][4];
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) dequant_word(word_of(w_cur[t], j), s_cur[t], b[t]);
#pragma unroll
      for (int sub = 0; sub < 2; ++sub) {
        const int step = 2 * j + sub;  // k16 step within the group
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          // ldmatrix.x4: lanes 0-7 / 8-15 / 16-23 / 24-31 address rows 0-7 / 8-15 / 0-7 / 8-15 at
          // k 0-7 / 0-7 / 8-15 / 8-15 of the step, which yields the A fragment registers a0..a3.
          const int quad = lane >> 3;
          const int row = mt * 16 + (quad & 1) * 8 + (lane & 7);
          const int piece = step * 2 + (quad >> 1);
          ldmatrix_x4(a[mt], shared_address(&tile_x[row * kRowChunks + (piece ^ (row & 7))]));
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int t = 0; t < kTilesPerWarp; ++t) mma_m16n8k16(acc[mt][t], a[mt], b[t][2 * sub], b[t][2 * sub + 1]);
      }
    }
    __syncthreads();  // the buffer is restaged two iterations later
    if (has_next) {
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t) {
        w_cur[t] = w_next[t];
        s_cur[t] = s_next[t];
      }
    }
  }

  // Accumulator layout of m16n8: c0,c1 at (row lane/4, cols 2*(lane%4) + 0/1), c2,c3 at row + 8.
  const int fragment_row = lane >> 2;
  const int fragment_col = 2 * (lane & 3);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
      const int tile = first_tile + t;
      if (tile >= n_tiles) continue;
      const int col = tile * kTileN + fragment_col;
#pragma unroll
      for (int half_rows = 0; half_rows < 2; ++half_rows) {
        const int row = m0 + mt * 16 + fragment_row + 8 * half_rows;
        if (row >= m) continue;
        float v0 = acc[mt][t][2 * half_rows];
        float v1 = acc[mt][t][2 * half_rows + 1];
        if (partials != nullptr) {
          *reinterpret_cast<float2*>(partials + (static_cast<size_t>(blockIdx.z) * m + row) * n + col) =
              make_float2(v0, v1);
        } else {
          if (bias != nullptr) {
            v0 += __half2float(bias[col]);
            v1 += __half2float(bias[col + 1]);
          }
          *reinterpret_cast<half2*>(y + static_cast<size_t>(row) * n + col) = __floats2half2_rn(v0, v1);
        }
      }
    }
  }
}

// Sums the split-K partials [splits, M, N] (fp32), adds the bias and writes Y in fp16.
__global__ void reduce_splits_kernel(const float* __restrict__ partials, const __half* __restrict__ bias,
                                     __half* __restrict__ y, int m, int n, int splits) {
  const size_t pairs = static_cast<size_t>(m) * n / 2;
  const size_t split_stride = static_cast<size_t>(m) * n / 2;
  const float2* partial_pairs = reinterpret_cast<const float2*>(partials);
  for (size_t p = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float2 sum = make_float2(0.0f, 0.0f);
    for (int s = 0; s < splits; ++s) {
      const float2 v = partial_pairs[s * split_stride + p];
      sum.x += v.x;
      sum.y += v.y;
    }
    if (bias != nullptr) {
      const int col = static_cast<int>((2 * p) % n);
      sum.x += __half2float(bias[col]);
      sum.y += __half2float(bias[col + 1]);
    }
    reinterpret_cast<half2*>(y)[p] = __floats2half2_rn(sum.x, sum.y);
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantization kernel of the large-M path: one warp per (tile, group) chunk. The 8 x 128 fp16
// tile is assembled in shared memory (rows padded by 8 halves so the fragment-ordered writes hit
// 32 distinct banks) and written out as 16-byte row pieces.
constexpr int kStageRowHalves = kGroupSize + 8;

__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const uint4* __restrict__ weight, const __half* __restrict__ scales,
                  __half* __restrict__ out, int n, int k) {
  __shared__ __align__(16) __half stage[kWarps][kTileN * kStageRowHalves];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int groups = k / kGroupSize;
  const size_t chunks = static_cast<size_t>(n / kTileN) * groups;
  const int column = lane / 4;  // r: column within the tile
  const int pair = lane % 4;    // c: which k pair within each 8-wide half step
  __half* tile_stage = stage[warp];

  for (size_t chunk = static_cast<size_t>(blockIdx.x) * kWarps + warp; chunk < chunks;
       chunk += static_cast<size_t>(gridDim.x) * kWarps) {
    const int tile = static_cast<int>(chunk / groups);
    const int g = static_cast<int>(chunk % groups);
    const uint4 w = __ldg(weight + chunk * kChunkLanes + lane);
    const half2 scale = __half2half2(scales[static_cast<size_t>(g) * n + tile * kTileN + column]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t values[4];
      dequant_word(word_of(w, j), scale, values);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int kk = (2 * j + (q >> 1)) * 16 + (q & 1) * 8 + 2 * pair;
        *reinterpret_cast<uint32_t*>(&tile_stage[column * kStageRowHalves + kk]) = values[q];
      }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int index = i * 32 + lane;
      const int row = index / kRowChunks;
      const int piece = index % kRowChunks;
      const uint4 v = *reinterpret_cast<const uint4*>(&tile_stage[row * kStageRowHalves + piece * 8]);
      *reinterpret_cast<uint4*>(out + static_cast<size_t>(tile * kTileN + row) * k + g * kGroupSize + piece * 8) = v;
    }
    __syncwarp();
  }
}

__global__ void fill_bias_kernel(const __half* __restrict__ bias, __half* __restrict__ y, int m, int n) {
  const size_t pairs = static_cast<size_t>(m) * n / 2;
  for (size_t p = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>((2 * p) % n);
    reinterpret_cast<half2*>(y)[p] = __halves2half2(bias[col], bias[col + 1]);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int streaming_multiprocessors() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // zero-initialized: 0 = not queried yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 1;
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) {
      count = 1;
    }
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

int grid_stride_blocks(size_t items, int threads) {
  const size_t wanted = (items + threads - 1) / threads;
  const size_t cap = static_cast<size_t>(streaming_multiprocessors()) * 32;
  return static_cast<int>(std::max<size_t>(1, std::min(wanted, cap)));
}

template <int kMTiles>
void launch_fused(dim3 grid, const __half* x, const int8_t* weight, const __half* scales, const __half* bias,
                  __half* y, float* partials, int m, int n, int k, int groups_per_split, cudaStream_t stream) {
  fused_w4a16_kernel<kMTiles><<<grid, kThreads, 0, stream>>>(x, reinterpret_cast<const uint4*>(weight), scales,
                                                             bias, y, partials, m, n, k, groups_per_split);
}

}  // namespace

extern "C" {

const char* qvggt_w4a16_kernel_layout(void) { return QVGGT_W4A16_KERNEL_LAYOUT; }

size_t qvggt_w4a16_workspace_bytes(int n, int k) { return static_cast<size_t>(n) * k * sizeof(__half); }

const char* qvggt_w4a16_argument_error(const void* x, const void* weight, const void* y, const void* workspace,
                                       int m, int n, int k) {
  if (m < 1) return "M (the rows of X) must be at least 1";
  if (n < kTileN || n % kTileN != 0) return "N must be a positive multiple of 8";
  if (k < kGroupSize || k % kGroupSize != 0) return "K must be a positive multiple of 128";
  if (!aligned(x, 16)) return "X must be 16-byte aligned (it is read with cp.async / ldmatrix)";
  if (!aligned(weight, 16)) return "the weight must be 16-byte aligned (it is read with 128-bit loads)";
  if (!aligned(y, 4)) return "Y must be 4-byte aligned (it is written as half2)";
  // Split-K partials (float2 at even columns) and the dequantized fp16 rows (16-byte stores) live here.
  if (!aligned(workspace, 16)) return "the workspace must be 16-byte aligned";
  return nullptr;
}

int qvggt_w4a16_use_fused(int m, int /*n*/, int /*k*/) { return m <= kFusedMaxM ? 1 : 0; }

cudaError_t qvggt_w4a16_fused(const __half* x, const int8_t* weight, const __half* scales, const __half* bias,
                              __half* y, int m, int n, int k, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  if (qvggt_w4a16_argument_error(x, weight, y, workspace, m, n, k) != nullptr) return cudaErrorInvalidValue;
  const int m_tiles = m <= 16 ? 1 : (m <= 32 ? 2 : 4);
  const int n_blocks = ceil_div(n, kBlockN);
  const int m_blocks = ceil_div(m, 16 * m_tiles);
  if (m_blocks > 65535) return cudaErrorInvalidValue;
  const int groups = k / kGroupSize;

  // Split K until the grid covers the GPU, as far as the groups and the workspace allow.
  int splits = 1;
  const int target_blocks = kTargetBlocksPerSm * streaming_multiprocessors();
  if (n_blocks * m_blocks < target_blocks) {
    splits = std::min({ceil_div(target_blocks, n_blocks * m_blocks), groups, kMaxSplits});
  }
  const size_t split_bytes = static_cast<size_t>(m) * n * sizeof(float);
  const size_t splits_that_fit = workspace == nullptr ? 1 : workspace_bytes / split_bytes;
  splits = static_cast<int>(std::max<size_t>(1, std::min<size_t>(splits, splits_that_fit)));
  const int groups_per_split = ceil_div(groups, splits);
  splits = ceil_div(groups, groups_per_split);

  float* partials = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const dim3 grid(n_blocks, m_blocks, splits);
  switch (m_tiles) {
    case 1: launch_fused<1>(grid, x, weight, scales, bias, y, partials, m, n, k, groups_per_split, stream); break;
    case 2: launch_fused<2>(grid, x, weight, scales, bias, y, partials, m, n, k, groups_per_split, stream); break;
    default: launch_fused<4>(grid, x, weight, scales, bias, y, partials, m, n, k, groups_per_split, stream); break;
  }
  if (splits > 1) {
    constexpr int kReduceThreads = 256;
    const size_t pairs = static_cast<size_t>(m) * n / 2;
    reduce_splits_kernel<<<grid_stride_blocks(pairs, kReduceThreads), kReduceThreads, 0, stream>>>(
        partials, bias, y, m, n, splits);
  }
  return cudaGetLastError();
}

cudaError_t qvggt_w4a16_dequantize(const int8_t* weight, const __half* scales, __half* weight_fp16, int n, int k,
                                   cudaStream_t stream) {
  if (weight_fp16 == nullptr || qvggt_w4a16_argument_error(nullptr, weight, nullptr, weight_fp16, 1, n, k) != nullptr) {
    return cudaErrorInvalidValue;
  }
  const size_t chunks = static_cast<size_t>(n / kTileN) * (k / kGroupSize);
  const int blocks = static_cast<int>(std::min<size_t>((chunks + kWarps - 1) / kWarps, 1u << 30));
  dequantize_kernel<<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(weight), scales, weight_fp16,
                                                     n, k);
  return cudaGetLastError();
}

cudaError_t qvggt_w4a16_fill_bias(const __half* bias, __half* y, int m, int n, cudaStream_t stream) {
  if (m < 1 || n < 2 || n % 2 != 0 || !aligned(y, 4)) return cudaErrorInvalidValue;
  constexpr int kFillThreads = 256;
  const size_t pairs = static_cast<size_t>(m) * n / 2;
  fill_bias_kernel<<<grid_stride_blocks(pairs, kFillThreads), kFillThreads, 0, stream>>>(bias, y, m, n);
  return cudaGetLastError();
}

const char* qvggt_w4a16_error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

}  // extern "C"
