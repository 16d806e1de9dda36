// The extension module turbo_kernels._C: importing it registers the CUDA kernels as torch ops in
// the namespace turbo_kernels_cuda (schemas here, CUDA implementations beside them in *.cu).

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(turbo_kernels_cuda, m) {
  m.def(
      "guided_solver_step_fwd(Tensor z_t, Tensor eps_cond, Tensor eps_uncond, Tensor? score, Tensor t_hi, "
      "Tensor t_lo, Tensor w, Tensor motion_scale, Tensor alphas_cumprod, bool release_form) -> (Tensor, Tensor)");
  m.def(
      "guided_solver_step_bwd(Tensor grad_z_lo, Tensor grad_x0, Tensor t_hi, Tensor t_lo, Tensor w, "
      "Tensor motion_scale, Tensor alphas_cumprod, bool release_form, bool has_score) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "consistency_output_fwd(Tensor sample, Tensor eps, Tensor t, Tensor alphas_cumprod, float timestep_scaling, "
      "float sigma_data) -> Tensor");
  m.def(
      "consistency_output_bwd(Tensor grad_out, Tensor t, Tensor alphas_cumprod, float timestep_scaling, "
      "float sigma_data) -> (Tensor, Tensor)");
  m.def(
      "temporal_attention_fwd(Tensor q, Tensor k, Tensor v, int num_frames, int heads, str layout, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "temporal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int num_frames, int heads, "
      "str layout, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "reward_preprocess_fwd(Tensor frames, Tensor rows, Tensor cols, Tensor mean, Tensor std, Tensor row_spans, "
      "Tensor col_spans, int[] sizes, float in_scale, float in_shift, ScalarType out_dtype) -> Tensor");
  m.def(
      "reward_preprocess_bwd(Tensor grad, Tensor rows, Tensor cols, Tensor std, Tensor row_spans_t, "
      "Tensor col_spans_t, int[] sizes, int[] frames_shape, ScalarType frames_dtype, float in_scale) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of turbo_kernels, registered as torch.ops.turbo_kernels_cuda";
}
