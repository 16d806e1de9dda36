// Fused reward preprocessing on CUDA (turbo_kernels.reward_preprocess): every spec's resize, pad or
// crop and normalisation of every frame, and the exact adjoint. The maths is the Triton kernels'
// (turbo_kernels/triton_kernels/preprocess.py): a spec's output channel is (A X B^T - mean) / std,
// with A (size, H) and B (size, W) banded resampling matrices (pad and crop folded in), stacked for
// all specs, and each row's band given as a span [first, end) of nonzero columns.
//
// The Triton kernels multiply dense windows of A, X and B on tensor cores. These filter separably on
// FMA units instead, the way a resampler does, so the work per output is the filter taps (about 6 a
// direction for bicubic at 320 -> 224), not the window:
//
// Forward. A block owns kTileRows x kTileCols outputs of one spec for one (frame, channel) image.
// Over the input rows its output rows reach, kChunk rows at a time, it stages the horizontal pass
// T[h, j] = sum_{w in span B_j} X[h, w] B[j, w] in shared memory (X read through the cache, with
// x * in_scale + in_shift applied on load), then accumulates out[i, j] += sum_h A[i, h] T[h, j].
//
// Backward. d X = in_scale sum_s A_s^T (G_s / std_s) B_s. A block owns kTileRows x kTileCols of d X
// for one image and walks the specs, so the sum needs no atomics and is deterministic. Per spec, over
// the output rows that reach its input rows (the transposed spans), kChunk at a time, it stages
// U[i, w] = sum_{j in span B^T_w} G[i, j] B[j, w] / std, then accumulates d X[h, w] += sum_i A[i, h] U[i, w].
// d X is written once, contiguous, in the frames' dtype.
//
// Everything is fp32 (the op promises 1e-5 against the fp32 reference; FMA products are exact
// fp32). Up to kMaxSpecs specs; (frame, channel) images ride grid axis y (at most 65535).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int kTileRows = 16;
constexpr int kTileCols = 64;
constexpr int kChunk = 16;
constexpr int kThreads = 256;
// Each thread owns one column of its block's tile and kRowsPerThread of its rows.
constexpr int kRowsPerThread = kTileRows * kTileCols / kThreads;
constexpr int kMaxSpecs = 8;
static_assert(kTileRows * kChunk == kThreads, "the backward's weight staging gives each thread one weight");
static_assert(kThreads % kTileCols == 0, "each thread keeps one column of its tile");

struct Specs {
  int count;
  int size[kMaxSpecs];
  int row_offset[kMaxSpecs];     // first row of the spec in the stacked A and B
  int64_t out_offset[kMaxSpecs];  // first element of the spec's outputs in the flat output
  int tiles_before[kMaxSpecs + 1];  // forward: blocks of the specs before this one
};

struct FrameLayout {
  int64_t stride_b, stride_f, stride_c, stride_h, stride_w;
  int num_frames;
};

__device__ __forceinline__ int64_t image_base(int image, const FrameLayout& f) {
  const int channel = image % 3;
  const int frame = image / 3;
  return static_cast<int64_t>(frame / f.num_frames) * f.stride_b +
         static_cast<int64_t>(frame % f.num_frames) * f.stride_f + static_cast<int64_t>(channel) * f.stride_c;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) reward_preprocess_fwd_kernel(
    const in_t* __restrict__ frames, out_t* __restrict__ out, const float* __restrict__ rows,
    const float* __restrict__ cols, const float* __restrict__ mean, const float* __restrict__ std_,
    const int* __restrict__ row_spans, const int* __restrict__ col_spans, Specs specs, FrameLayout layout,
    int height, int width, int num_images, float in_scale, float in_shift) {
  __shared__ float staged[kChunk][kTileCols];
  __shared__ float weights[kTileRows][kChunk];

  int spec = 0;
  while (spec + 1 < specs.count && static_cast<int>(blockIdx.x) >= specs.tiles_before[spec + 1]) ++spec;
  const int size = specs.size[spec];
  const int col_tiles = (size + kTileCols - 1) / kTileCols;
  const int tile = blockIdx.x - specs.tiles_before[spec];
  const int i0 = (tile / col_tiles) * kTileRows;
  const int j0 = (tile % col_tiles) * kTileCols;
  const int image = blockIdx.y;
  const int channel = image % 3;
  const int first_row = specs.row_offset[spec];

  const int col = threadIdx.x % kTileCols;
  const int row_group = threadIdx.x / kTileCols;  // rows row_group, row_group + kThreads / kTileCols, ...
  const int j = j0 + col;
  const bool col_ok = j < size;

  // The input rows the tile's output rows reach (spans are monotone; empty ones are [H, 0)).
  int h_begin = height, h_end = 0;
  for (int i = i0; i < min(i0 + kTileRows, size); ++i) {
    h_begin = min(h_begin, row_spans[2 * (first_row + i)]);
    h_end = max(h_end, row_spans[2 * (first_row + i) + 1]);
  }
  int w_begin = width, w_end = 0;
  if (col_ok) {
    w_begin = col_spans[2 * (first_row + j)];
    w_end = col_spans[2 * (first_row + j) + 1];
  }
  const float* b_row = cols + static_cast<int64_t>(first_row + j) * width;
  const in_t* x = frames + image_base(image, layout);

  float acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = 0.f;

  for (int h0 = h_begin; h0 < h_end; h0 += kChunk) {
    // Horizontal pass of kChunk input rows: each thread's column, kChunk / (kThreads / kTileCols) rows.
    for (int index = threadIdx.x; index < kChunk * kTileCols; index += kThreads) {
      const int hc = index / kTileCols;
      const int h = h0 + hc;
      float t = 0.f;
      if (h < h_end && col_ok) {
        const in_t* x_row = x + static_cast<int64_t>(h) * layout.stride_h;
        for (int w = w_begin; w < w_end; ++w) {
          t = fmaf(to_float(x_row[static_cast<int64_t>(w) * layout.stride_w]) * in_scale + in_shift, b_row[w], t);
        }
      }
      staged[hc][index % kTileCols] = t;
    }
    for (int index = threadIdx.x; index < kTileRows * kChunk; index += kThreads) {
      const int ir = index / kChunk;
      const int h = h0 + index % kChunk;
      const int i = i0 + ir;
      weights[ir][index % kChunk] =
          (i < size && h < h_end) ? rows[static_cast<int64_t>(first_row + i) * height + h] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int ir = row_group + r * (kThreads / kTileCols);
#pragma unroll
      for (int hc = 0; hc < kChunk; ++hc) acc[r] = fmaf(weights[ir][hc], staged[hc][col], acc[r]);
    }
    __syncthreads();
  }

  if (!col_ok) return;
  const float shift = mean[3 * spec + channel];
  const float inv_std = 1.f / std_[3 * spec + channel];
  out_t* out_image = out + specs.out_offset[spec] + static_cast<int64_t>(image) * size * size;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int i = i0 + row_group + r * (kThreads / kTileCols);
    if (i < size) out_image[static_cast<int64_t>(i) * size + j] = static_cast<out_t>((acc[r] - shift) * inv_std);
  }
}

template <typename grad_t, typename frame_t>
__global__ void __launch_bounds__(kThreads) reward_preprocess_bwd_kernel(
    const grad_t* __restrict__ grad, frame_t* __restrict__ grad_frames, const float* __restrict__ rows,
    const float* __restrict__ cols, const float* __restrict__ std_, const int* __restrict__ row_spans_t,
    const int* __restrict__ col_spans_t, Specs specs, int height, int width, float in_scale) {
  __shared__ float staged[kChunk][kTileCols];
  __shared__ float weights[kTileRows][kChunk];

  const int col_tiles = (width + kTileCols - 1) / kTileCols;
  const int h0 = (blockIdx.x / col_tiles) * kTileRows;
  const int w0 = (blockIdx.x % col_tiles) * kTileCols;
  const int image = blockIdx.y;
  const int channel = image % 3;
  const int col = threadIdx.x % kTileCols;
  const int row_group = threadIdx.x / kTileCols;
  const int w = w0 + col;
  const bool col_ok = w < width;

  float acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = 0.f;

  for (int spec = 0; spec < specs.count; ++spec) {
    const int size = specs.size[spec];
    const int first_row = specs.row_offset[spec];
    // The output rows that reach the tile's input rows, and the output columns that reach column w.
    int i_begin = size, i_end = 0;
    for (int h = h0; h < min(h0 + kTileRows, height); ++h) {
      i_begin = min(i_begin, row_spans_t[2 * (spec * height + h)]);
      i_end = max(i_end, row_spans_t[2 * (spec * height + h) + 1]);
    }
    int j_begin = size, j_end = 0;
    if (col_ok) {
      j_begin = col_spans_t[2 * (spec * width + w)];
      j_end = col_spans_t[2 * (spec * width + w) + 1];
    }
    const float inv_std = 1.f / std_[3 * spec + channel];
    const grad_t* g = grad + specs.out_offset[spec] + static_cast<int64_t>(image) * size * size;

    for (int c0 = i_begin; c0 < i_end; c0 += kChunk) {
      for (int index = threadIdx.x; index < kChunk * kTileCols; index += kThreads) {
        const int ic = index / kTileCols;
        const int i = c0 + ic;
        float u = 0.f;
        if (i < i_end && col_ok) {
          const grad_t* g_row = g + static_cast<int64_t>(i) * size;
          for (int j = j_begin; j < j_end; ++j) {
            u = fmaf(to_float(g_row[j]), cols[static_cast<int64_t>(first_row + j) * width + w], u);
          }
        }
        staged[ic][index % kTileCols] = u * inv_std;
      }
      {  // kTileRows * kChunk == kThreads: one weight a thread
        const int hr = threadIdx.x / kChunk;
        const int i = c0 + threadIdx.x % kChunk;
        const int h = h0 + hr;
        weights[hr][threadIdx.x % kChunk] =
            (h < height && i < i_end) ? rows[static_cast<int64_t>(first_row + i) * height + h] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        const int hr = row_group + r * (kThreads / kTileCols);
#pragma unroll
        for (int ic = 0; ic < kChunk; ++ic) acc[r] = fmaf(weights[hr][ic], staged[ic][col], acc[r]);
      }
      __syncthreads();
    }
  }

  if (!col_ok) return;
  frame_t* out_image = grad_frames + static_cast<int64_t>(image) * height * width;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int h = h0 + row_group + r * (kThreads / kTileCols);
    if (h < height) out_image[static_cast<int64_t>(h) * width + w] = static_cast<frame_t>(acc[r] * in_scale);
  }
}

#define TK_DISPATCH_STORAGE_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_plan(const at::Tensor& frames_or_grad, const at::Tensor& rows, const at::Tensor& cols,
                const at::Tensor& std_, const at::Tensor& row_spans, const at::Tensor& col_spans, int64_t height,
                int64_t width, int64_t num_specs, int64_t stacked_rows, int64_t spans_rows, int64_t spans_cols) {
  const auto device = frames_or_grad.device();
  TORCH_CHECK(frames_or_grad.is_cuda(), "the CUDA preprocessing takes CUDA tensors");
  for (const at::Tensor* t : {&rows, &cols, &std_}) {
    TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "the plan's matrices and statistics must be contiguous float32 on ", device);
  }
  for (const at::Tensor* t : {&row_spans, &col_spans}) {
    TORCH_CHECK(t->device() == device && t->scalar_type() == at::kInt && t->is_contiguous(),
                "the plan's spans must be contiguous int32 on ", device);
  }
  TORCH_CHECK(rows.sizes() == at::IntArrayRef({stacked_rows, height}) &&
                  cols.sizes() == at::IntArrayRef({stacked_rows, width}),
              "rows and cols must be (", stacked_rows, ", H) and (", stacked_rows, ", W)");
  TORCH_CHECK(row_spans.sizes() == at::IntArrayRef({spans_rows, 2}) &&
                  col_spans.sizes() == at::IntArrayRef({spans_cols, 2}),
              "the spans must be (", spans_rows, ", 2) and (", spans_cols, ", 2)");
  TORCH_CHECK(std_.sizes() == at::IntArrayRef({num_specs, 3}), "std must be (", num_specs, ", 3), got ",
              std_.sizes());
  // The span values themselves are trusted: turbo_kernels.ops.preprocess._plan keeps them within
  // [0, H], [0, W] and [0, size].
}

Specs make_specs(at::IntArrayRef sizes, int64_t num_images, bool forward) {
  TORCH_CHECK(!sizes.empty() && sizes.size() <= kMaxSpecs, "between 1 and ", kMaxSpecs, " specs, got ",
              sizes.size());
  Specs specs{};
  specs.count = static_cast<int>(sizes.size());
  int row_offset = 0;
  int64_t out_offset = 0;
  specs.tiles_before[0] = 0;
  for (int s = 0; s < specs.count; ++s) {
    const int size = static_cast<int>(sizes[s]);
    TORCH_CHECK(size > 0, "sizes must be positive");
    specs.size[s] = size;
    specs.row_offset[s] = row_offset;
    specs.out_offset[s] = out_offset;
    row_offset += size;
    out_offset += num_images * size * size;
    const int tiles = forward ? ((size + kTileRows - 1) / kTileRows) * ((size + kTileCols - 1) / kTileCols) : 0;
    specs.tiles_before[s + 1] = specs.tiles_before[s] + tiles;
  }
  return specs;
}

at::Tensor reward_preprocess_fwd(const at::Tensor& frames, const at::Tensor& rows, const at::Tensor& cols,
                                 const at::Tensor& mean, const at::Tensor& std_, const at::Tensor& row_spans,
                                 const at::Tensor& col_spans, at::IntArrayRef sizes, double in_scale,
                                 double in_shift, at::ScalarType out_dtype) {
  TORCH_CHECK(frames.dim() == 5 && frames.size(2) == 3, "frames must be (B, F, 3, H, W), got ", frames.sizes());
  const int64_t height = frames.size(3), width = frames.size(4);
  const int64_t num_images = frames.size(0) * frames.size(1) * 3;
  int64_t stacked = 0, elements = 0;
  for (int64_t size : sizes) {
    stacked += size;
    elements += num_images * size * size;
  }
  check_plan(frames, rows, cols, std_, row_spans, col_spans, height, width, static_cast<int64_t>(sizes.size()),
             stacked, stacked, stacked);
  TORCH_CHECK(mean.sizes() == std_.sizes() && mean.is_contiguous() && mean.scalar_type() == at::kFloat &&
                  mean.device() == frames.device(),
              "mean must be like std");
  TORCH_CHECK(num_images <= 65535, num_images, " (frame, channel) images exceed 65535");
  const Specs specs = make_specs(sizes, num_images, true);
  const c10::cuda::CUDAGuard guard(frames.device());
  at::Tensor out = at::empty({elements}, frames.options().dtype(out_dtype));
  if (num_images == 0) return out;
  const FrameLayout layout{frames.stride(0), frames.stride(1), frames.stride(2), frames.stride(3), frames.stride(4),
                           static_cast<int>(frames.size(1))};
  const dim3 grid(specs.tiles_before[specs.count], static_cast<unsigned>(num_images));
  auto stream = c10::cuda::getCurrentCUDAStream();
  TK_DISPATCH_STORAGE_TYPES(frames.scalar_type(), "reward_preprocess_fwd", [&] {
    using in_t = scalar_t;
    TK_DISPATCH_STORAGE_TYPES(out_dtype, "reward_preprocess_fwd", [&] {
      reward_preprocess_fwd_kernel<in_t, scalar_t><<<grid, kThreads, 0, stream>>>(
          frames.data_ptr<in_t>(), out.data_ptr<scalar_t>(), rows.data_ptr<float>(), cols.data_ptr<float>(),
          mean.data_ptr<float>(), std_.data_ptr<float>(), row_spans.data_ptr<int>(), col_spans.data_ptr<int>(), specs,
          layout, static_cast<int>(height), static_cast<int>(width), static_cast<int>(num_images),
          static_cast<float>(in_scale), static_cast<float>(in_shift));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor reward_preprocess_bwd(const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols,
                                 const at::Tensor& std_, const at::Tensor& row_spans_t,
                                 const at::Tensor& col_spans_t, at::IntArrayRef sizes, at::IntArrayRef frames_shape,
                                 at::ScalarType frames_dtype, double in_scale) {
  TORCH_CHECK(frames_shape.size() == 5 && frames_shape[2] == 3, "frames_shape must be (B, F, 3, H, W)");
  const int64_t height = frames_shape[3], width = frames_shape[4];
  const int64_t num_images = frames_shape[0] * frames_shape[1] * 3;
  const int64_t num_specs = static_cast<int64_t>(sizes.size());
  int64_t stacked = 0, elements = 0;
  for (int64_t size : sizes) {
    stacked += size;
    elements += num_images * size * size;
  }
  check_plan(grad, rows, cols, std_, row_spans_t, col_spans_t, height, width, num_specs, stacked,
             num_specs * height, num_specs * width);
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == elements, "grad must be the contiguous flat output of ",
              elements, " elements");
  TORCH_CHECK(num_images <= 65535, num_images, " (frame, channel) images exceed 65535");
  const Specs specs = make_specs(sizes, num_images, false);
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_frames = at::empty(frames_shape, grad.options().dtype(frames_dtype));
  if (grad_frames.numel() == 0) return grad_frames;
  const int64_t tiles = ((height + kTileRows - 1) / kTileRows) * ((width + kTileCols - 1) / kTileCols);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(num_images));
  auto stream = c10::cuda::getCurrentCUDAStream();
  TK_DISPATCH_STORAGE_TYPES(grad.scalar_type(), "reward_preprocess_bwd", [&] {
    using grad_t = scalar_t;
    TK_DISPATCH_STORAGE_TYPES(frames_dtype, "reward_preprocess_bwd", [&] {
      reward_preprocess_bwd_kernel<grad_t, scalar_t><<<grid, kThreads, 0, stream>>>(
          grad.data_ptr<grad_t>(), grad_frames.data_ptr<scalar_t>(), rows.data_ptr<float>(), cols.data_ptr<float>(),
          std_.data_ptr<float>(), row_spans_t.data_ptr<int>(), col_spans_t.data_ptr<int>(), specs,
          static_cast<int>(height), static_cast<int>(width), static_cast<float>(in_scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_frames;
}

}  // namespace

TORCH_LIBRARY_IMPL(turbo_kernels_cuda, CUDA, m) {
  m.impl("reward_preprocess_fwd", &reward_preprocess_fwd);
  m.impl("reward_preprocess_bwd", &reward_preprocess_bwd);
}
