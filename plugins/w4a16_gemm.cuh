// W4A16 GEMM for qvggt-export: Y[M, N] = X[M, K] · dequant(W)[N, K]ᵀ (+ bias[N]).
//
// X, Y and bias are fp16, row-major and contiguous. W is 4-bit with one fp16 scale per group of 128
// input channels, stored in the "kernel_v1" layout (the exact index map and its CPU reference live in
// qvggt_export/kernels/layout.py, which converts from and to the canonical format of DESIGN.md):
//
//   weight  int8 [N/8, K/128, 512]: one 512-byte chunk per (tile of 8 output columns t, group g).
//           Lane L = 4*r + c of a warp owns bytes [16*L, 16*L + 16) of a chunk: four little-endian
//           uint32 words j = 0..3 for column n = 8*t + r. Nibble i of word j holds (q + 8) for
//           k = 128*g + 16*(2*j + ((i >> 1) & 1)) + 8*(i & 1) + 2*c + (i >> 2),
//           so one word expands into the B fragments of two m16n8k16 MMA steps without any shuffle.
//   scales  fp16 [K/128, N].
//
// Shapes: M >= 1, N a multiple of 8, K a multiple of 128. Pointers: X, weight and workspace 16-byte
// aligned, Y 4-byte aligned (qvggt_w4a16_argument_error checks; TensorRT and PyTorch allocations are,
// views at an offset into a tensor may not be).
//
// This C interface is the one kernel-facing API: the TensorRT C++ plugin, the PyTorch binding
// (ctypes) and the TensorRT Python plugin (through the binding) all call these functions.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#define QVGGT_W4A16_KERNEL_LAYOUT "kernel_v1"
#define QVGGT_W4A16_GROUP_SIZE 128

#ifdef __cplusplus
extern "C" {
#endif

// The layout name this library was built for; bindings compare it with their own constant.
const char* qvggt_w4a16_kernel_layout(void);

// Scratch every call may use: the dequantized fp16 weight of the large-M path, N * K * 2 bytes.
// The small-M path uses at most the same space for its split-K partial sums.
size_t qvggt_w4a16_workspace_bytes(int n, int k);

// nullptr when the kernels can run these arguments (shapes and pointer alignment), else why not, in
// words; the kernel entry points return cudaErrorInvalidValue in that case. Pass nullptr for a pointer
// a path does not use (the workspace of an unsplit fused call, X and Y of qvggt_w4a16_dequantize).
const char* qvggt_w4a16_argument_error(const void* x, const void* weight, const void* y, const void* workspace,
                                       int m, int n, int k);

// Which path serves M rows: 1 = fused small-M kernel, 0 = dequantize into the workspace + a cuBLAS
// GEMM (the caller runs the GEMM: cuBLAS in the C++ plugin, torch.addmm in the PyTorch binding).
// The threshold is a default that scripts/gpu_check.py measures; it was not measured yet.
int qvggt_w4a16_use_fused(int m, int n, int k);

// Fused small-M path: tensor-core MMA on weights dequantized in registers, split-K over the
// workspace when the (M, N) grid alone cannot fill the GPU. Works for any M >= 1.
cudaError_t qvggt_w4a16_fused(const __half* x, const int8_t* weight, const __half* scales,
                              const __half* bias, __half* y, int m, int n, int k, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// Large-M path, first half: weight (kernel_v1) -> fp16 [N, K] row-major, i.e. W itself.
cudaError_t qvggt_w4a16_dequantize(const int8_t* weight, const __half* scales, __half* weight_fp16,
                                   int n, int k, cudaStream_t stream);

// Large-M path helper for a GEMM without a bias epilogue: Y[m, :] = bias for every row, so that a
// following GEMM with beta = 1 adds X · Wᵀ.
cudaError_t qvggt_w4a16_fill_bias(const __half* bias, __half* y, int m, int n, cudaStream_t stream);

const char* qvggt_w4a16_error_string(int status);

#ifdef __cplusplus
}
#endif
