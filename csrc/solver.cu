// CUDA kernels of the guided-solver family: the teacher DDIM step with CFG and motion guidance,
// and the LCM boundary-condition output, forward and backward (meaning: turbo_kernels/reference/solver.py).
//
// Every kernel streams batch-first tensors that share one dense layout: blockIdx.y is the sample,
// each thread moves one 16-byte vector of every tensor. Per-sample scalars are gathered from the
// (B,) timestep / w / m tensors and the alphas_cumprod table inside the kernel; maths is fp32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace turbo_kernels {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* ptr, float (&out)[VEC]) {
  const Vec<T, VEC> packed = *reinterpret_cast<const Vec<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<float>(packed.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* ptr, const float (&in)[VEC]) {
  Vec<T, VEC> packed;
#pragma unroll
  for (int k = 0; k < VEC; ++k) packed.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = packed;
}

struct AlphaSigma {
  float alpha, sigma;
};

__device__ __forceinline__ AlphaSigma alpha_sigma(const float* acp, const int64_t* t, int64_t b) {
  const float abar = __ldg(acp + __ldg(t + b));
  return {sqrtf(abar), sqrtf(1.f - abar)};
}

struct BoundaryScalings {
  float c_skip, c_out;
};

__device__ __forceinline__ BoundaryScalings boundary_scalings(const int64_t* t, int64_t b, float timestep_scaling,
                                                             float sigma_data) {
  const float s = static_cast<float>(__ldg(t + b)) * timestep_scaling;
  const float sd2 = sigma_data * sigma_data;
  return {sd2 / (s * s + sd2), s / sqrtf(s * s + sd2)};
}

template <typename T, int VEC, bool HAS_SCORE, bool RELEASE_FORM>
__global__ void __launch_bounds__(kThreads) guided_solver_fwd_kernel(
    const T* __restrict__ z, const T* __restrict__ eps_c, const T* __restrict__ eps_u, const T* __restrict__ score,
    T* __restrict__ z_lo, T* __restrict__ x0_out, const int64_t* __restrict__ t_hi, const int64_t* __restrict__ t_lo,
    const float* __restrict__ w_, const float* __restrict__ m_, const float* __restrict__ acp, int64_t n) {
  const int64_t b = blockIdx.y;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (i >= n) return;
  const AlphaSigma hi = alpha_sigma(acp, t_hi, b);
  const AlphaSigma lo = alpha_sigma(acp, t_lo, b);
  const float w = __ldg(w_ + b);
  const int64_t at = b * n + i;

  float zv[VEC], ec[VEC], eu[VEC], sc[VEC];
  load_f32<T, VEC>(z + at, zv);
  load_f32<T, VEC>(eps_c + at, ec);
  load_f32<T, VEC>(eps_u + at, eu);
  float motion = 0.f;
  if constexpr (HAS_SCORE) {
    load_f32<T, VEC>(score + at, sc);
    const float g = RELEASE_FORM ? sqrtf(1.f - hi.alpha) : hi.sigma;
    motion = __ldg(m_ + b) * g;
  }
  float out_z[VEC], out_x0[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float eps_guided = ec[k] + w * (ec[k] - eu[k]);
    const float x0 = (zv[k] - hi.sigma * eps_guided) / hi.alpha;
    float eps_hat = eps_guided;
    if constexpr (HAS_SCORE) eps_hat -= motion * sc[k];
    out_x0[k] = x0;
    out_z[k] = lo.alpha * x0 + lo.sigma * eps_hat;
  }
  store_f32<T, VEC>(z_lo + at, out_z);
  store_f32<T, VEC>(x0_out + at, out_x0);
}

template <typename T, int VEC, bool HAS_SCORE, bool RELEASE_FORM>
__global__ void __launch_bounds__(kThreads) guided_solver_bwd_kernel(
    const T* __restrict__ gz, const T* __restrict__ gx, T* __restrict__ g_z_t, T* __restrict__ g_eps_c,
    T* __restrict__ g_eps_u, T* __restrict__ g_score, const int64_t* __restrict__ t_hi,
    const int64_t* __restrict__ t_lo, const float* __restrict__ w_, const float* __restrict__ m_,
    const float* __restrict__ acp, int64_t n) {
  const int64_t b = blockIdx.y;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (i >= n) return;
  const AlphaSigma hi = alpha_sigma(acp, t_hi, b);
  const AlphaSigma lo = alpha_sigma(acp, t_lo, b);
  const float w = __ldg(w_ + b);
  const int64_t at = b * n + i;

  float gzv[VEC], gxv[VEC];
  load_f32<T, VEC>(gz + at, gzv);
  load_f32<T, VEC>(gx + at, gxv);
  float out_z[VEC], out_c[VEC], out_u[VEC], out_s[VEC];
  const float motion = HAS_SCORE ? __ldg(m_ + b) * (RELEASE_FORM ? sqrtf(1.f - hi.alpha) : hi.sigma) : 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float reaching_x0 = gxv[k] + lo.alpha * gzv[k];
    const float reaching_eps = lo.sigma * gzv[k] - (hi.sigma / hi.alpha) * reaching_x0;
    out_z[k] = reaching_x0 / hi.alpha;
    out_c[k] = (1.f + w) * reaching_eps;
    out_u[k] = -w * reaching_eps;
    out_s[k] = -motion * lo.sigma * gzv[k];
  }
  store_f32<T, VEC>(g_z_t + at, out_z);
  store_f32<T, VEC>(g_eps_c + at, out_c);
  store_f32<T, VEC>(g_eps_u + at, out_u);
  if constexpr (HAS_SCORE) store_f32<T, VEC>(g_score + at, out_s);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) consistency_output_fwd_kernel(
    const T* __restrict__ sample, const T* __restrict__ eps, T* __restrict__ out, const int64_t* __restrict__ t,
    const float* __restrict__ acp, int64_t n, float timestep_scaling, float sigma_data) {
  const int64_t b = blockIdx.y;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (i >= n) return;
  const AlphaSigma as = alpha_sigma(acp, t, b);
  const BoundaryScalings c = boundary_scalings(t, b, timestep_scaling, sigma_data);
  const int64_t at = b * n + i;
  float x[VEC], e[VEC], o[VEC];
  load_f32<T, VEC>(sample + at, x);
  load_f32<T, VEC>(eps + at, e);
#pragma unroll
  for (int k = 0; k < VEC; ++k) o[k] = c.c_skip * x[k] + c.c_out * ((x[k] - as.sigma * e[k]) / as.alpha);
  store_f32<T, VEC>(out + at, o);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) consistency_output_bwd_kernel(
    const T* __restrict__ g, T* __restrict__ g_sample, T* __restrict__ g_eps, const int64_t* __restrict__ t,
    const float* __restrict__ acp, int64_t n, float timestep_scaling, float sigma_data) {
  const int64_t b = blockIdx.y;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (i >= n) return;
  const AlphaSigma as = alpha_sigma(acp, t, b);
  const BoundaryScalings c = boundary_scalings(t, b, timestep_scaling, sigma_data);
  const float to_sample = c.c_skip + c.c_out / as.alpha;
  const float to_eps = -(c.c_out * as.sigma / as.alpha);
  const int64_t at = b * n + i;
  float gv[VEC], gs[VEC], ge[VEC];
  load_f32<T, VEC>(g + at, gv);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    gs[k] = to_sample * gv[k];
    ge[k] = to_eps * gv[k];
  }
  store_f32<T, VEC>(g_sample + at, gs);
  store_f32<T, VEC>(g_eps + at, ge);
}

// ---- host side -------------------------------------------------------------------------------

void check_big(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == like.device(), name, " must be on ", like.device(), ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(x.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.strides() == like.strides(), name, " must share the layout (strides) of the first tensor");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), name, " must be dense (no gaps, no overlap)");
}

void check_per_sample(const at::Tensor& x, const at::Tensor& like, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == like.size(0) && x.is_contiguous(), name,
              " must be a contiguous (B,) tensor with B = ", like.size(0));
}

void check_table(const at::Tensor& acp, const at::Tensor& like) {
  TORCH_CHECK(acp.is_cuda() && acp.device() == like.device(), "alphas_cumprod must be on ", like.device());
  TORCH_CHECK(acp.scalar_type() == at::kFloat && acp.dim() == 1 && acp.is_contiguous(),
              "alphas_cumprod must be a contiguous 1-D float32 tensor");
}

void check_batch_first_dense(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0, "tensors must be batch-first with B > 0");
  TORCH_CHECK(x.stride(0) * x.size(0) == x.numel(), "the batch must be the outermost dimension in memory");
}

// 16-byte vectors when every pointer is aligned and a sample is a whole number of vectors.
template <typename T>
bool can_vectorize(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % (16 / sizeof(T)) != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

dim3 grid_for(int64_t n, int64_t batch, int vec) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  TORCH_CHECK(batch <= 65535, "batch size must be at most 65535 for the CUDA kernels");
  return dim3(static_cast<unsigned>((n + per_block - 1) / per_block), static_cast<unsigned>(batch));
}

#define TK_DISPATCH_STORAGE(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

#define TK_DISPATCH_BOOL(FLAG, NAME, ...) \
  [&] {                                   \
    if (FLAG) {                           \
      constexpr bool NAME = true;         \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr bool NAME = false;        \
      return __VA_ARGS__();               \
    }                                     \
  }()

std::tuple<at::Tensor, at::Tensor> guided_solver_step_fwd(const at::Tensor& z_t, const at::Tensor& eps_cond,
                                                          const at::Tensor& eps_uncond,
                                                          const std::optional<at::Tensor>& score,
                                                          const at::Tensor& t_hi, const at::Tensor& t_lo,
                                                          const at::Tensor& w, const at::Tensor& motion_scale,
                                                          const at::Tensor& alphas_cumprod, bool release_form) {
  check_big(z_t, z_t, "z_t");
  check_batch_first_dense(z_t);
  check_big(eps_cond, z_t, "eps_cond");
  check_big(eps_uncond, z_t, "eps_uncond");
  const bool has_score = score.has_value() && score->defined();
  if (has_score) check_big(*score, z_t, "score");
  check_per_sample(t_hi, z_t, at::kLong, "t_hi");
  check_per_sample(t_lo, z_t, at::kLong, "t_lo");
  check_per_sample(w, z_t, at::kFloat, "w");
  check_per_sample(motion_scale, z_t, at::kFloat, "motion_scale");
  check_table(alphas_cumprod, z_t);
  TORCH_CHECK(z_t.scalar_type() != at::kDouble, "z_t: float64 is served by the reference, not the CUDA kernel");

  const c10::cuda::CUDAGuard guard(z_t.device());
  at::Tensor z_lo = at::empty_like(z_t);
  at::Tensor x0 = at::empty_like(z_t);
  const int64_t batch = z_t.size(0);
  const int64_t n = z_t.numel() / batch;
  if (n == 0) return {z_lo, x0};
  auto stream = c10::cuda::getCurrentCUDAStream();

  TK_DISPATCH_STORAGE(z_t.scalar_type(), "guided_solver_step_fwd", [&] {
    const scalar_t* score_ptr = has_score ? score->data_ptr<scalar_t>() : nullptr;
    const bool vectorize = can_vectorize<scalar_t>(
        n, {z_t.data_ptr(), eps_cond.data_ptr(), eps_uncond.data_ptr(), score_ptr, z_lo.data_ptr(), x0.data_ptr()});
    TK_DISPATCH_BOOL(has_score, HAS_SCORE, [&] {
      TK_DISPATCH_BOOL(release_form, RELEASE_FORM, [&] {
        auto launch = [&](auto vec_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          guided_solver_fwd_kernel<scalar_t, VEC, HAS_SCORE, RELEASE_FORM>
              <<<grid_for(n / VEC, batch, 1), kThreads, 0, stream>>>(
                  z_t.data_ptr<scalar_t>(), eps_cond.data_ptr<scalar_t>(), eps_uncond.data_ptr<scalar_t>(), score_ptr,
                  z_lo.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), t_hi.data_ptr<int64_t>(),
                  t_lo.data_ptr<int64_t>(), w.data_ptr<float>(), motion_scale.data_ptr<float>(),
                  alphas_cumprod.data_ptr<float>(), n);
        };
        if (vectorize)
          launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
        else
          launch(std::integral_constant<int, 1>{});
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {z_lo, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> guided_solver_step_bwd(
    const at::Tensor& grad_z_lo, const at::Tensor& grad_x0, const at::Tensor& t_hi, const at::Tensor& t_lo,
    const at::Tensor& w, const at::Tensor& motion_scale, const at::Tensor& alphas_cumprod, bool release_form,
    bool has_score) {
  check_big(grad_z_lo, grad_z_lo, "grad_z_lo");
  check_batch_first_dense(grad_z_lo);
  check_big(grad_x0, grad_z_lo, "grad_x0");
  check_per_sample(t_hi, grad_z_lo, at::kLong, "t_hi");
  check_per_sample(t_lo, grad_z_lo, at::kLong, "t_lo");
  check_per_sample(w, grad_z_lo, at::kFloat, "w");
  check_per_sample(motion_scale, grad_z_lo, at::kFloat, "motion_scale");
  check_table(alphas_cumprod, grad_z_lo);
  TORCH_CHECK(grad_z_lo.scalar_type() != at::kDouble, "float64 is served by the reference, not the CUDA kernel");

  const c10::cuda::CUDAGuard guard(grad_z_lo.device());
  at::Tensor g_z_t = at::empty_like(grad_z_lo);
  at::Tensor g_eps_c = at::empty_like(grad_z_lo);
  at::Tensor g_eps_u = at::empty_like(grad_z_lo);
  at::Tensor g_score = has_score ? at::empty_like(grad_z_lo) : grad_z_lo.new_empty({0});
  const int64_t batch = grad_z_lo.size(0);
  const int64_t n = grad_z_lo.numel() / batch;
  if (n == 0) return {g_z_t, g_eps_c, g_eps_u, g_score};
  auto stream = c10::cuda::getCurrentCUDAStream();

  TK_DISPATCH_STORAGE(grad_z_lo.scalar_type(), "guided_solver_step_bwd", [&] {
    scalar_t* g_score_ptr = has_score ? g_score.data_ptr<scalar_t>() : nullptr;
    const bool vectorize = can_vectorize<scalar_t>(
        n, {grad_z_lo.data_ptr(), grad_x0.data_ptr(), g_z_t.data_ptr(), g_eps_c.data_ptr(), g_eps_u.data_ptr(),
            static_cast<const void*>(g_score_ptr)});
    TK_DISPATCH_BOOL(has_score, HAS_SCORE, [&] {
      TK_DISPATCH_BOOL(release_form, RELEASE_FORM, [&] {
        auto launch = [&](auto vec_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          guided_solver_bwd_kernel<scalar_t, VEC, HAS_SCORE, RELEASE_FORM>
              <<<grid_for(n / VEC, batch, 1), kThreads, 0, stream>>>(
                  grad_z_lo.data_ptr<scalar_t>(), grad_x0.data_ptr<scalar_t>(), g_z_t.data_ptr<scalar_t>(),
                  g_eps_c.data_ptr<scalar_t>(), g_eps_u.data_ptr<scalar_t>(), g_score_ptr, t_hi.data_ptr<int64_t>(),
                  t_lo.data_ptr<int64_t>(), w.data_ptr<float>(), motion_scale.data_ptr<float>(),
                  alphas_cumprod.data_ptr<float>(), n);
        };
        if (vectorize)
          launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
        else
          launch(std::integral_constant<int, 1>{});
      });
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g_z_t, g_eps_c, g_eps_u, g_score};
}

at::Tensor consistency_output_fwd(const at::Tensor& sample, const at::Tensor& eps, const at::Tensor& t,
                                  const at::Tensor& alphas_cumprod, double timestep_scaling, double sigma_data) {
  check_big(sample, sample, "sample");
  check_batch_first_dense(sample);
  check_big(eps, sample, "eps");
  check_per_sample(t, sample, at::kLong, "t");
  check_table(alphas_cumprod, sample);
  TORCH_CHECK(sample.scalar_type() != at::kDouble, "float64 is served by the reference, not the CUDA kernel");

  const c10::cuda::CUDAGuard guard(sample.device());
  at::Tensor out = at::empty_like(sample);
  const int64_t batch = sample.size(0);
  const int64_t n = sample.numel() / batch;
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  TK_DISPATCH_STORAGE(sample.scalar_type(), "consistency_output_fwd", [&] {
    const bool vectorize = can_vectorize<scalar_t>(n, {sample.data_ptr(), eps.data_ptr(), out.data_ptr()});
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      consistency_output_fwd_kernel<scalar_t, VEC><<<grid_for(n / VEC, batch, 1), kThreads, 0, stream>>>(
          sample.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), t.data_ptr<int64_t>(),
          alphas_cumprod.data_ptr<float>(), n, static_cast<float>(timestep_scaling), static_cast<float>(sigma_data));
    };
    if (vectorize)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> consistency_output_bwd(const at::Tensor& grad_out, const at::Tensor& t,
                                                          const at::Tensor& alphas_cumprod, double timestep_scaling,
                                                          double sigma_data) {
  check_big(grad_out, grad_out, "grad_out");
  check_batch_first_dense(grad_out);
  check_per_sample(t, grad_out, at::kLong, "t");
  check_table(alphas_cumprod, grad_out);
  TORCH_CHECK(grad_out.scalar_type() != at::kDouble, "float64 is served by the reference, not the CUDA kernel");

  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor g_sample = at::empty_like(grad_out);
  at::Tensor g_eps = at::empty_like(grad_out);
  const int64_t batch = grad_out.size(0);
  const int64_t n = grad_out.numel() / batch;
  if (n == 0) return {g_sample, g_eps};
  auto stream = c10::cuda::getCurrentCUDAStream();
  TK_DISPATCH_STORAGE(grad_out.scalar_type(), "consistency_output_bwd", [&] {
    const bool vectorize = can_vectorize<scalar_t>(n, {grad_out.data_ptr(), g_sample.data_ptr(), g_eps.data_ptr()});
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      consistency_output_bwd_kernel<scalar_t, VEC><<<grid_for(n / VEC, batch, 1), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), g_sample.data_ptr<scalar_t>(), g_eps.data_ptr<scalar_t>(),
          t.data_ptr<int64_t>(), alphas_cumprod.data_ptr<float>(), n, static_cast<float>(timestep_scaling),
          static_cast<float>(sigma_data));
    };
    if (vectorize)
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    else
      launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g_sample, g_eps};
}

}  // namespace

TORCH_LIBRARY_IMPL(turbo_kernels_cuda, CUDA, m) {
  m.impl("guided_solver_step_fwd", &guided_solver_step_fwd);
  m.impl("guided_solver_step_bwd", &guided_solver_step_bwd);
  m.impl("consistency_output_fwd", &consistency_output_fwd);
  m.impl("consistency_output_bwd", &consistency_output_bwd);
}

}  // namespace turbo_kernels
