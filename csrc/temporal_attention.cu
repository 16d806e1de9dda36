// CUDA kernels of temporal attention for F <= 32 frames and head dim 64, forward and backward
// (meaning: turbo_kernels/reference/attention.py). They read and write the same native layouts and
// save the same logsumexp as the Triton kernels (turbo_kernels/triton_kernels/temporal_attention.py),
// so either backend's backward takes either backend's forward.
//
// Work: a (sequence, head) group is one attention of F rows of 64 channels. One warp owns one group
// at a time (a grid-stride loop over groups, heads fastest), so nothing crosses warps: no
// __syncthreads, no atomics, every output row is written by exactly one warp.
//
// Addressing: element c of head h of token (sequence s = b*N + n, frame f) lives at
// b*stride_b + n*stride_n + f*stride_f + h*64 + c in both layouts ("frames" (B*F, N, heads*d):
// stride_b = F*stride(0), stride_n = stride(1), stride_f = stride(0); "sequences" (B*N, F, heads*d):
// stride_b = 0, stride_n = stride(0), stride_f = stride(1)). A head's row is 128 (16-bit) or 256
// (fp32) contiguous bytes, read with 16-byte vector loads by 8 or 16 consecutive lanes, so the
// kernels take strided views (q, k, v sliced from one fused qkv projection) without copies.
//
// Per group the warp
//   1. stages its operand rows in shared memory as fp32 (rows F..F_PAD-1 zero-filled);
//   2. forms an F_PAD x F_PAD product tile of rows (scores q k^T, or dO v^T) in registers: lane
//      16*cs + 4*ti + tj sums rows ti + 4x against rows tj + 4y over its channel half cs, and the
//      halves meet with one shuffle. A row's entries then sit in the 4 lanes of one ti, so the
//      softmax row max / sum (and the backward's delta) are two more shuffles;
//   3. writes the F_PAD x F_PAD weights (P^T, P, dS, dS^T) to shared memory and forms the output
//      rows out[r] = sum_x W[x][r] M[x] (P v, P^T dO, dS k, dS^T q): lane 8*rb + cb owns rows
//      F_PAD/4*rb .. +F_PAD/4 and channels 4cb..4cb+3, 32+4cb..32+4cb+3, and stores them straight
//      to global memory (the 8 lanes of a row write it as two contiguous halves).
// Padded key columns get probability 0 and padded rows are zero, so padded frames contribute
// exactly nothing and every loop runs over the compile-time F_PAD (8, 16 or 32).
// Staged rows are 68 floats (17 16-byte chunks): the rows and chunks a warp reads together fall on
// distinct bank groups, so every 16-byte shared load is one conflict-free wavefront (broadcasts
// aside).
//
// The backward recomputes P = exp(scale q k^T - lse), renormalised so every row sums to 1 in fp32
// (as the Triton backward does: the gradient of a constant softmax, F = 1, is then exactly 0), and
// uses delta_i = sum_j P_ij dP_ij from the fp32 tiles at hand, so the output is not needed:
// dP = dO v^T, dS = P (dP - delta), dq = scale dS k, dk = scale dS^T q, dv = P^T dO.
//
// Why fp32 FMA and not tensor cores: at F = 16, d = 64 the forward does 8 FLOP per byte it moves in
// 16-bit storage and the backward about 11, against about 20 FLOP per byte of HBM bandwidth in an
// H100's fp32 pipes (~60 TFLOP/s vs ~3.35 TB/s), so the products alone need half the FMA rate or
// less. With staging, conversions, addressing and softmax, a warp issues about 2,200 instructions
// per (sequence, head) in the forward at F = 16 (about half of them FFMA) for 8 KiB of traffic:
// about what an H100 issues in the time HBM moves 8 KiB, so the kernels are near balance rather than
// far below it. In exchange the maths is exact fp32 throughout (no rounding of P or dS to 16 bits,
// unlike tensor-core operands), one code path serves fp32, fp16 and bf16 storage, and the indexing
// is plain enough to verify without a GPU. mma.sync m16n8k16 for the two products on the 16-bit
// path is the next step if profiles show the kernels issue-bound (F > 16 certainly is).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

namespace turbo_kernels {
namespace {

constexpr int kHeadDim = 64;
constexpr int kMaxFrames = 32;
// Floats per staged row: 64 channels + 4 padding floats, 17 16-byte chunks.
constexpr int kRowStride = kHeadDim + 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory geometry of one warp for F_PAD padded frames.
template <int F_PAD>
struct Geometry {
  static_assert(F_PAD == 8 || F_PAD == 16 || F_PAD == 32, "F_PAD must be 8, 16 or 32");
  static constexpr int kTile = F_PAD / 4;             // rows of a lane in both tile mappings
  static constexpr int kSquareStride = F_PAD + 4;     // floats per row of an F_PAD x F_PAD matrix
  static constexpr int kStaged = F_PAD * kRowStride;  // floats of one staged (F_PAD, 64) operand
  static constexpr int kSquare = F_PAD * kSquareStride;
  // Forward: q, k, v; P^T reuses q's space once the scores are formed.
  static constexpr int kForwardFloats = 3 * kStaged;
  // Backward: q, k, v, dO; P, dS and dS^T reuse v's space (v is dead once dP is formed) when they fit.
  static constexpr bool kSquaresInV = 3 * kSquare <= kStaged;
  static constexpr int kBackwardFloats = 4 * kStaged + (kSquaresInV ? 0 : 3 * kSquare);
  // At F_PAD = 32 a backward warp needs 48 KiB: two warps a block keep a block under 100 KiB.
  static constexpr int kWarps = F_PAD > 16 ? 2 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kForwardBytes = kWarps * kForwardFloats * 4;
  static constexpr int kBackwardBytes = kWarps * kBackwardFloats * 4;
  // Blocks an H100 SM holds by shared memory (228 KiB, 1 KiB reserved a block), given to
  // __launch_bounds__ as the blocks to keep resident: it raises ptxas's register budget to what that
  // occupancy leaves (without it ptxas stays near 72 registers and serialises the staging loads of
  // q, k and v behind the first shared stores, two memory round trips a group instead of one).
  static constexpr int kForwardBlocksPerSm = 228 * 1024 / (kForwardBytes + 1024);
  static constexpr int kBackwardBlocksPerSm = 228 * 1024 / (kBackwardBytes + 1024);
};

// fp32 storage holds its staged rows in twice the registers of 16-bit storage: half the blocks.
template <typename T>
constexpr int resident_blocks(int blocks_by_shared_memory) {
  return sizeof(T) == 4 ? std::max(1, blocks_by_shared_memory / 2) : blocks_by_shared_memory;
}

struct Strides {
  int64_t b, n, f;  // element strides of video b, position n and frame f
};

template <typename T>
struct ForwardArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  float* lse;  // (sequences, heads, frames), contiguous
  Strides q_strides, k_strides, v_strides, out_strides;
  int64_t groups, positions;
  int heads, frames;
  float scale;
};

template <typename T>
struct BackwardArgs {
  const T* grad_out;
  const T* q;
  const T* k;
  const T* v;
  const float* lse;
  T* grad_q;
  T* grad_k;
  T* grad_v;
  Strides grad_out_strides, q_strides, k_strides, v_strides, grad_strides;  // grad_q/k/v share a layout
  int64_t groups, positions;
  int heads, frames;
  float scale;
};

// Video b, position n and head h of group g = s*heads + h, s = b*positions + n.
struct Group {
  int64_t b, n, h;
};

__device__ __forceinline__ Group locate(int64_t g, int heads, int64_t positions) {
  const int64_t s = g / heads;
  const int64_t b = s / positions;
  return {b, s - b * positions, g - s * heads};
}

__device__ __forceinline__ int64_t origin(const Group& group, const Strides& strides) {
  return group.b * strides.b + group.n * strides.n + group.h * kHeadDim;
}

// The rows of one (sequence, head) operand as this lane loads them: 16-byte chunks, consecutive
// lanes on consecutive chunks of a row (8 lanes a 128-byte row in 16-bit storage, 16 in fp32).
template <typename T, int F_PAD>
struct OperandRows {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kChunks = kHeadDim / kVec;  // 16-byte chunks per row
  static constexpr int kIters = F_PAD * kChunks / 32;
  union Chunk {
    uint4 bits;
    T values[kVec];
  };
  Chunk chunks[kIters];

  // Rows at or past `frames` are zero. The loads are unconditional (a padded row re-reads row 0,
  // which always exists, and is then zeroed) so that nothing keeps the compiler from issuing the
  // loads of every operand before the first use.
  __device__ __forceinline__ void load(const T* __restrict__ src, int64_t stride_f, int frames, int lane) {
    constexpr int kRowStep = 32 / kChunks;  // rows a warp-wide load instruction covers
    const int first_row = lane / kChunks;
    const T* const base = src + (lane % kChunks) * kVec;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int row = first_row + kRowStep * it;
      const bool real = row < frames;
      const uint4 bits = __ldg(reinterpret_cast<const uint4*>(base + (real ? row : 0) * stride_f));
      chunks[it].bits = real ? bits : make_uint4(0u, 0u, 0u, 0u);
    }
  }

  // Writes the rows to shared memory as fp32 rows of kRowStride floats.
  __device__ __forceinline__ void stage(float* dst, int lane) const {
    constexpr int kRowStep = 32 / kChunks;
    float* const base = dst + (lane / kChunks) * kRowStride + (lane % kChunks) * kVec;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      float* out = base + kRowStep * it * kRowStride;
      const T* v = chunks[it].values;
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        *reinterpret_cast<float4*>(out + e) = make_float4(static_cast<float>(v[e]), static_cast<float>(v[e + 1]),
                                                          static_cast<float>(v[e + 2]), static_cast<float>(v[e + 3]));
      }
    }
  }
};

// Stages N operands of a group in shared memory: every global load is issued before the first
// shared store, so a warp waits for one memory round trip per group, not one per operand.
template <typename T, int F_PAD, int N>
__device__ __forceinline__ void stage_operands(const T* const (&src)[N], const int64_t (&stride_f)[N],
                                               float* const (&dst)[N], int frames, int lane) {
  OperandRows<T, F_PAD> rows[N];
#pragma unroll
  for (int i = 0; i < N; ++i) rows[i].load(src[i], stride_f[i], frames, lane);
#pragma unroll
  for (int i = 0; i < N; ++i) rows[i].stage(dst[i], lane);
}

__device__ __forceinline__ float dot4(const float4& a, const float4& b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// acc[x][y] = sum over the 64 channels of A[ti + 4x] * B[tj + 4y], lane = 16*cs + 4*ti + tj.
// Lane half cs sums the 16-byte chunks 8u + 4cs + w (u < 2, w < 4); the halves are added across
// lanes (xor 16), so both lanes of a pair hold identical sums. Each 16-byte load of the warp reads 8
// distinct chunks (ti or tj, and cs) on distinct bank groups.
template <int T>
__device__ __forceinline__ void row_products(const float* a_rows, const float* b_rows, int lane,
                                             float (&acc)[T][T]) {
  const int ti = (lane >> 2) & 3, tj = lane & 3, cs = lane >> 4;
#pragma unroll
  for (int x = 0; x < T; ++x)
#pragma unroll
    for (int y = 0; y < T; ++y) acc[x][y] = 0.f;
#pragma unroll
  for (int step = 0; step < 8; ++step) {
    const int channel = 4 * (8 * (step >> 2) + 4 * cs + (step & 3));
    float4 a[T];
#pragma unroll
    for (int x = 0; x < T; ++x) a[x] = *reinterpret_cast<const float4*>(a_rows + (ti + 4 * x) * kRowStride + channel);
#pragma unroll
    for (int y = 0; y < T; ++y) {
      const float4 b = *reinterpret_cast<const float4*>(b_rows + (tj + 4 * y) * kRowStride + channel);
#pragma unroll
      for (int x = 0; x < T; ++x) acc[x][y] = dot4(a[x], b, acc[x][y]);
    }
  }
#pragma unroll
  for (int x = 0; x < T; ++x)
#pragma unroll
    for (int y = 0; y < T; ++y) acc[x][y] += __shfl_xor_sync(kFullMask, acc[x][y], 16);
}

// Sum over the 4 lanes of one ti (the entries of a tile row); all 4 get the same value.
__device__ __forceinline__ float row_sum(float value) {
  value += __shfl_xor_sync(kFullMask, value, 1);
  return value + __shfl_xor_sync(kFullMask, value, 2);
}

__device__ __forceinline__ float row_max(float value) {
  value = fmaxf(value, __shfl_xor_sync(kFullMask, value, 1));
  return fmaxf(value, __shfl_xor_sync(kFullMask, value, 2));
}

// Whether tile row x (of kTile) is written out by lane half cs: the two lanes of a pair hold the
// same tile, and each writes half of its rows.
template <int T>
__device__ __forceinline__ bool writes_row(int x, int cs) {
  return (2 * x < T) == (cs == 0);
}

// Writes a row_products tile as an F_PAD x F_PAD matrix of `stride` floats a row: entry [i][j], or
// [j][i] when TRANSPOSED, for i = ti + 4x, j = tj + 4y.
template <bool TRANSPOSED, int T>
__device__ __forceinline__ void store_tile(float* dst, int stride, const float (&tile)[T][T], int lane) {
  const int ti = (lane >> 2) & 3, tj = lane & 3, cs = lane >> 4;
#pragma unroll
  for (int x = 0; x < T; ++x) {
    if (!writes_row<T>(x, cs)) continue;
#pragma unroll
    for (int y = 0; y < T; ++y) {
      const int i = ti + 4 * x, j = tj + 4 * y;
      dst[TRANSPOSED ? j * stride + i : i * stride + j] = tile[x][y];
    }
  }
}

template <int T>
__device__ __forceinline__ void load_tile(const float* src, int stride, float (&tile)[T][T], int lane) {
  const int ti = (lane >> 2) & 3, tj = lane & 3;
#pragma unroll
  for (int x = 0; x < T; ++x)
#pragma unroll
    for (int y = 0; y < T; ++y) tile[x][y] = src[(ti + 4 * x) * stride + tj + 4 * y];
}

template <int R>
__device__ __forceinline__ void load_floats(const float* src, float (&out)[R]) {
  if constexpr (R == 2) {
    const float2 w = *reinterpret_cast<const float2*>(src);
    out[0] = w.x;
    out[1] = w.y;
  } else {
    static_assert(R % 4 == 0, "rows per lane must be 2 or a multiple of 4");
#pragma unroll
    for (int i = 0; i < R; i += 4) {
      const float4 w = *reinterpret_cast<const float4*>(src + i);
      out[i] = w.x;
      out[i + 1] = w.y;
      out[i + 2] = w.z;
      out[i + 3] = w.w;
    }
  }
}

// acc[t][e] = sum over x < F_PAD of W[x][R*rb + t] * M[x][channel e], lane = 8*rb + cb, with
// R = F_PAD/4, W an F_PAD x F_PAD matrix of kSquareStride rows and M staged rows; channel e is
// 4cb + e for e < 4 and 32 + 4cb + e - 4 for e >= 4 (chunks cb and 8 + cb: distinct bank groups).
template <int F_PAD>
__device__ __forceinline__ void weighted_rows(const float* w_rows, const float* m_rows, int lane,
                                              float (&acc)[F_PAD / 4][8]) {
  constexpr int R = F_PAD / 4;
  constexpr int kW = Geometry<F_PAD>::kSquareStride;
  const int rb = lane >> 3, cb = lane & 7;
#pragma unroll
  for (int t = 0; t < R; ++t)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[t][e] = 0.f;
#pragma unroll
  for (int x = 0; x < F_PAD; ++x) {
    float w[R];
    load_floats<R>(w_rows + x * kW + R * rb, w);
    const float4 lo = *reinterpret_cast<const float4*>(m_rows + x * kRowStride + 4 * cb);
    const float4 hi = *reinterpret_cast<const float4*>(m_rows + x * kRowStride + 32 + 4 * cb);
#pragma unroll
    for (int t = 0; t < R; ++t) {
      acc[t][0] = fmaf(w[t], lo.x, acc[t][0]);
      acc[t][1] = fmaf(w[t], lo.y, acc[t][1]);
      acc[t][2] = fmaf(w[t], lo.z, acc[t][2]);
      acc[t][3] = fmaf(w[t], lo.w, acc[t][3]);
      acc[t][4] = fmaf(w[t], hi.x, acc[t][4]);
      acc[t][5] = fmaf(w[t], hi.y, acc[t][5]);
      acc[t][6] = fmaf(w[t], hi.z, acc[t][6]);
      acc[t][7] = fmaf(w[t], hi.w, acc[t][7]);
    }
  }
}

// One 8-byte global store (written out because the compiler split a plain uint2 assignment here
// into two 4-byte stores).
__device__ __forceinline__ void store_8_bytes(void* dst, uint32_t lo, uint32_t hi) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(lo), "r"(hi));
}

// Stores 4 consecutive elements: one 16-byte (fp32) or 8-byte (16-bit) store.
template <typename T>
__device__ __forceinline__ void store4(T* dst, float a, float b, float c, float d) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(dst) = make_float4(a, b, c, d);
  } else {
    const T t[4] = {static_cast<T>(a), static_cast<T>(b), static_cast<T>(c), static_cast<T>(d)};
    store_8_bytes(dst, static_cast<uint32_t>(t[0].x) | (static_cast<uint32_t>(t[1].x) << 16),
                  static_cast<uint32_t>(t[2].x) | (static_cast<uint32_t>(t[3].x) << 16));
  }
}

// Stores the rows of weighted_rows (times `factor`) that are real frames.
template <typename T, int F_PAD>
__device__ __forceinline__ void store_rows(T* dst, int64_t stride_f, int frames, const float (&acc)[F_PAD / 4][8],
                                           float factor, int lane) {
  constexpr int R = F_PAD / 4;
  const int rb = lane >> 3, cb = lane & 7;
#pragma unroll
  for (int t = 0; t < R; ++t) {
    const int row = R * rb + t;
    if (row < frames) {
      T* out = dst + row * stride_f;
      store4(out + 4 * cb, acc[t][0] * factor, acc[t][1] * factor, acc[t][2] * factor, acc[t][3] * factor);
      store4(out + 32 + 4 * cb, acc[t][4] * factor, acc[t][5] * factor, acc[t][6] * factor, acc[t][7] * factor);
    }
  }
}

template <typename T, int F_PAD>
__global__ void __launch_bounds__(Geometry<F_PAD>::kThreads, resident_blocks<T>(Geometry<F_PAD>::kForwardBlocksPerSm))
    temporal_attention_fwd_kernel(const ForwardArgs<T> args) {
  using G = Geometry<F_PAD>;
  constexpr int kT = G::kTile;
  extern __shared__ float4 shared_memory[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* const s_q = reinterpret_cast<float*>(shared_memory) + warp * G::kForwardFloats;
  float* const s_k = s_q + G::kStaged;
  float* const s_v = s_k + G::kStaged;
  float* const s_pt = s_q;  // P^T[j][i], once the scores are formed
  const int ti = (lane >> 2) & 3, tj = lane & 3, cs = lane >> 4;
  const int frames = args.frames;
  const float qk_scale = args.scale * kLog2e;  // scores in the log2 domain

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * G::kWarps + warp; g < args.groups;
       g += static_cast<int64_t>(gridDim.x) * G::kWarps) {
    const Group group = locate(g, args.heads, args.positions);
    stage_operands<T, F_PAD, 3>({args.q + origin(group, args.q_strides), args.k + origin(group, args.k_strides),
                                 args.v + origin(group, args.v_strides)},
                                {args.q_strides.f, args.k_strides.f, args.v_strides.f}, {s_q, s_k, s_v}, frames,
                                lane);
    __syncwarp();

    // p[x][y]: row i = ti + 4x, key j = tj + 4y.
    float p[kT][kT];
    row_products<kT>(s_q, s_k, lane, p);
#pragma unroll
    for (int x = 0; x < kT; ++x) {
      float m = -INFINITY;
#pragma unroll
      for (int y = 0; y < kT; ++y) {
        p[x][y] = tj + 4 * y < frames ? p[x][y] * qk_scale : -INFINITY;
        m = fmaxf(m, p[x][y]);
      }
      m = row_max(m);  // finite: key 0 is always a real frame
      float l = 0.f;
#pragma unroll
      for (int y = 0; y < kT; ++y) {
        p[x][y] = exp2f(p[x][y] - m);
        l += p[x][y];
      }
      l = row_sum(l);
      const float inv_l = 1.f / l;
#pragma unroll
      for (int y = 0; y < kT; ++y) p[x][y] *= inv_l;
      const int row = ti + 4 * x;
      if (tj == 0 && writes_row<kT>(x, cs) && row < frames) args.lse[g * frames + row] = (m + log2f(l)) * kLn2;
    }
    __syncwarp();  // every lane is done with q before P^T overwrites it
    store_tile<true>(s_pt, G::kSquareStride, p, lane);
    __syncwarp();

    float out[kT][8];
    weighted_rows<F_PAD>(s_pt, s_v, lane, out);
    store_rows<T, F_PAD>(args.out + origin(group, args.out_strides), args.out_strides.f, frames, out, 1.f, lane);
    __syncwarp();  // shared memory is free for the next group
  }
}

template <typename T, int F_PAD>
__global__ void __launch_bounds__(Geometry<F_PAD>::kThreads, resident_blocks<T>(Geometry<F_PAD>::kBackwardBlocksPerSm))
    temporal_attention_bwd_kernel(const BackwardArgs<T> args) {
  using G = Geometry<F_PAD>;
  constexpr int kT = G::kTile;
  constexpr int kW = G::kSquareStride;
  extern __shared__ float4 shared_memory[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* const s_q = reinterpret_cast<float*>(shared_memory) + warp * G::kBackwardFloats;
  float* const s_k = s_q + G::kStaged;
  float* const s_v = s_k + G::kStaged;
  float* const s_do = s_v + G::kStaged;
  float* const s_p = G::kSquaresInV ? s_v : s_do + G::kStaged;  // P[i][j]
  float* const s_ds = s_p + G::kSquare;                          // dS[i][j]
  float* const s_ds_t = s_ds + G::kSquare;                       // dS^T[j][i]
  const int ti = (lane >> 2) & 3, tj = lane & 3;
  const int frames = args.frames;
  const float qk_scale = args.scale * kLog2e;

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * G::kWarps + warp; g < args.groups;
       g += static_cast<int64_t>(gridDim.x) * G::kWarps) {
    const Group group = locate(g, args.heads, args.positions);
    // Padded rows take lse = 0: their q row is zero, so their probabilities are finite, and their
    // dO row is zero, so they contribute nothing.
    float lse2[kT];
#pragma unroll
    for (int x = 0; x < kT; ++x) {
      const int row = ti + 4 * x;
      lse2[x] = row < frames ? __ldg(args.lse + g * frames + row) * kLog2e : 0.f;
    }
    stage_operands<T, F_PAD, 4>(
        {args.q + origin(group, args.q_strides), args.k + origin(group, args.k_strides),
         args.v + origin(group, args.v_strides), args.grad_out + origin(group, args.grad_out_strides)},
        {args.q_strides.f, args.k_strides.f, args.v_strides.f, args.grad_out_strides.f}, {s_q, s_k, s_v, s_do}, frames,
        lane);
    __syncwarp();

    // p[x][y] = P[ti + 4x][tj + 4y]; the lse keeps exp2 in range, the division makes rows sum to 1.
    float p[kT][kT];
    row_products<kT>(s_q, s_k, lane, p);
#pragma unroll
    for (int x = 0; x < kT; ++x) {
      float l = 0.f;
#pragma unroll
      for (int y = 0; y < kT; ++y) {
        p[x][y] = tj + 4 * y < frames ? exp2f(p[x][y] * qk_scale - lse2[x]) : 0.f;
        l += p[x][y];
      }
      l = row_sum(l);
#pragma unroll
      for (int y = 0; y < kT; ++y) p[x][y] = p[x][y] / l;
    }
    // At F_PAD = 32, P's 64 registers a lane cannot stay live beside dP's: P waits in its own shared
    // memory. Below, P and dS overwrite v, so they are written once dP no longer needs it.
    if constexpr (!G::kSquaresInV) store_tile<false>(s_p, kW, p, lane);
    // ds[x][y]: dP, then dS = P (dP - delta).
    float ds[kT][kT];
    row_products<kT>(s_do, s_v, lane, ds);
    if constexpr (!G::kSquaresInV) {
      __syncwarp();
      load_tile<kT>(s_p, kW, p, lane);
    }
#pragma unroll
    for (int x = 0; x < kT; ++x) {
      float delta = 0.f;
#pragma unroll
      for (int y = 0; y < kT; ++y) delta = fmaf(p[x][y], ds[x][y], delta);
      delta = row_sum(delta);
#pragma unroll
      for (int y = 0; y < kT; ++y) ds[x][y] = p[x][y] * (ds[x][y] - delta);
    }
    __syncwarp();  // every lane is done with v before P and dS may overwrite it
    if constexpr (G::kSquaresInV) store_tile<false>(s_p, kW, p, lane);
    store_tile<false>(s_ds, kW, ds, lane);
    store_tile<true>(s_ds_t, kW, ds, lane);
    __syncwarp();

    float acc[kT][8];
    const Strides& gs = args.grad_strides;
    weighted_rows<F_PAD>(s_p, s_do, lane, acc);  // dv[j] = sum_i P[i][j] dO[i]
    store_rows<T, F_PAD>(args.grad_v + origin(group, gs), gs.f, frames, acc, 1.f, lane);
    weighted_rows<F_PAD>(s_ds_t, s_k, lane, acc);  // dq[i] = scale sum_j dS[i][j] k[j]
    store_rows<T, F_PAD>(args.grad_q + origin(group, gs), gs.f, frames, acc, args.scale, lane);
    weighted_rows<F_PAD>(s_ds, s_q, lane, acc);  // dk[j] = scale sum_i dS[i][j] q[i]
    store_rows<T, F_PAD>(args.grad_k + origin(group, gs), gs.f, frames, acc, args.scale, lane);
    __syncwarp();  // shared memory is free for the next group
  }
}

// ---- host side -------------------------------------------------------------------------------

struct Problem {
  int64_t sequences, positions, groups, frames, heads;
  bool frames_layout;
};

Problem attention_problem(const at::Tensor& q, int64_t num_frames, int64_t heads, c10::string_view layout) {
  const bool frames_layout = layout == "frames";
  TORCH_CHECK(frames_layout || layout == "sequences", "layout must be 'frames' or 'sequences', got '",
              std::string(layout), "'");
  TORCH_CHECK(q.dim() == 3, "q must have 3 dimensions ((B*F, N, heads*d) or (B*N, F, heads*d)), got ", q.dim());
  TORCH_CHECK(num_frames >= 1 && num_frames <= kMaxFrames, "the CUDA kernels take 1 to ", kMaxFrames,
              " frames, got num_frames=", num_frames);
  TORCH_CHECK(heads >= 1 && q.size(2) == heads * kHeadDim, "the CUDA kernels need head dim ", kHeadDim,
              ": q's last dimension ", q.size(2), " is not heads=", heads, " times ", kHeadDim);
  Problem p{};
  p.frames = num_frames;
  p.heads = heads;
  p.frames_layout = frames_layout;
  if (frames_layout) {
    TORCH_CHECK(q.size(0) % num_frames == 0, "q's first dimension ", q.size(0),
                " (B*F in the 'frames' layout) is not divisible by num_frames=", num_frames);
    p.positions = q.size(1);
    p.sequences = q.size(0) / num_frames * q.size(1);
  } else {
    TORCH_CHECK(q.size(1) == num_frames, "q's second dimension ", q.size(1),
                " (F in the 'sequences' layout) is not num_frames=", num_frames);
    p.sequences = q.size(0);
    p.positions = q.size(0);
  }
  p.groups = p.sequences * p.heads;
  return p;
}

void check_operand(const at::Tensor& x, const at::Tensor& q, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == q.device(), name, " must be on ", q.device(), ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), name, " must have dtype ", q.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(x.sizes() == q.sizes(), name, " must have shape ", q.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1, name, " must have unit channel stride, got ", x.stride(2));
  // 16-byte vectors: every row start must be 16-byte aligned.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, name, " must start on a 16-byte boundary");
  const int64_t vec = 16 / x.element_size();
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(x.size(d) <= 1 || x.stride(d) % vec == 0, name, " has stride ", x.stride(d), " in dimension ", d,
                ": the CUDA kernels need a multiple of ", vec, " elements (16 bytes)");
  }
}

void check_storage_dtype(const at::Tensor& q) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "the CUDA kernels take float32, float16 or bfloat16 storage, got ", dtype);
}

Strides sequence_strides(const at::Tensor& x, const Problem& p) {
  if (p.frames_layout) return {p.frames * x.stride(0), x.stride(1), x.stride(0)};
  return {0, x.stride(0), x.stride(1)};
}

unsigned blocks_for(int64_t groups, int warps) {
  return static_cast<unsigned>(std::min<int64_t>((groups + warps - 1) / warps, std::numeric_limits<int>::max()));
}

template <typename Kernel>
void allow_shared_memory(Kernel* kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

// Calls fn with std::integral_constant<int, F_PAD>, the frames padded to 8, 16 or 32.
template <typename Fn>
void with_padded_frames(int frames, Fn&& fn) {
  if (frames <= 8) {
    fn(std::integral_constant<int, 8>{});
  } else if (frames <= 16) {
    fn(std::integral_constant<int, 16>{});
  } else {
    fn(std::integral_constant<int, 32>{});
  }
}

#define TK_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

std::tuple<at::Tensor, at::Tensor> temporal_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, int64_t num_frames, int64_t heads,
                                                          c10::string_view layout, double scale) {
  const Problem p = attention_problem(q, num_frames, heads, layout);
  check_storage_dtype(q);
  check_operand(q, q, "q");
  check_operand(k, q, "k");
  check_operand(v, q, "v");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.sequences, p.heads, p.frames}, q.options().dtype(at::kFloat));
  if (p.groups == 0) return {out, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();

  TK_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "temporal_attention_fwd", [&] {
    const ForwardArgs<scalar_t> args{
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), sequence_strides(q, p), sequence_strides(k, p), sequence_strides(v, p),
        sequence_strides(out, p), p.groups, p.positions, static_cast<int>(p.heads), static_cast<int>(p.frames),
        static_cast<float>(scale)};
    with_padded_frames(static_cast<int>(p.frames), [&](auto f_pad) {
      constexpr int F_PAD = decltype(f_pad)::value;
      using G = Geometry<F_PAD>;
      auto* kernel = &temporal_attention_fwd_kernel<scalar_t, F_PAD>;
      const int bytes = G::kForwardBytes;
      allow_shared_memory(kernel, bytes);
      kernel<<<blocks_for(p.groups, G::kWarps), G::kThreads, bytes, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> temporal_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    int64_t num_frames, int64_t heads, c10::string_view layout, double scale) {
  const Problem p = attention_problem(q, num_frames, heads, layout);
  check_storage_dtype(q);
  check_operand(q, q, "q");
  check_operand(k, q, "k");
  check_operand(v, q, "v");
  check_operand(grad_out, q, "grad_out");
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device(), "lse must be on ", q.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({p.sequences, p.heads, p.frames}),
              "lse must be a contiguous float32 tensor of shape (", p.sequences, ", ", p.heads, ", ", p.frames,
              "), got ", lse.scalar_type(), " ", lse.sizes());

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  if (p.groups == 0) return {grad_q, grad_k, grad_v};
  auto stream = c10::cuda::getCurrentCUDAStream();

  TK_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "temporal_attention_bwd", [&] {
    const BackwardArgs<scalar_t> args{
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        lse.data_ptr<float>(), grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(), sequence_strides(grad_out, p), sequence_strides(q, p),
        sequence_strides(k, p), sequence_strides(v, p), sequence_strides(grad_q, p), p.groups, p.positions,
        static_cast<int>(p.heads), static_cast<int>(p.frames), static_cast<float>(scale)};
    with_padded_frames(static_cast<int>(p.frames), [&](auto f_pad) {
      constexpr int F_PAD = decltype(f_pad)::value;
      using G = Geometry<F_PAD>;
      auto* kernel = &temporal_attention_bwd_kernel<scalar_t, F_PAD>;
      const int bytes = G::kBackwardBytes;
      allow_shared_memory(kernel, bytes);
      kernel<<<blocks_for(p.groups, G::kWarps), G::kThreads, bytes, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(turbo_kernels_cuda, CUDA, m) {
  m.impl("temporal_attention_fwd", &temporal_attention_fwd);
  m.impl("temporal_attention_bwd", &temporal_attention_bwd);
}

}  // namespace turbo_kernels
