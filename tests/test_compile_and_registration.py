"""The ops are well-formed torch.library custom ops: opcheck passes (schema, fake tensors,
autograd registration), torch.compile traces them without graph breaks, and the CUDA extension,
where this machine can build it, imports with its ops registered."""

import os

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import _cuda_ext

from .helpers import DEVICE, alphas_cumprod


def _guided_args(batch=2, requires_grad=False):
    z = torch.randn(batch, 4, 2, 3, 5, device=DEVICE, requires_grad=requires_grad)
    others = [torch.randn_like(z).requires_grad_(requires_grad) for _ in range(3)]
    per_sample = (
        torch.tensor([999, 504], device=DEVICE), torch.tensor([994, 499], device=DEVICE),
        torch.tensor([7.5, 12.0], device=DEVICE), torch.tensor([0.05, 0.0], device=DEVICE),
    )
    return (z, others[0], others[1], others[2]) + per_sample + (alphas_cumprod(), True)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_guided_solver_step(requires_grad):
    torch.library.opcheck(torch.ops.turbo_kernels.guided_solver_step.default, _guided_args(requires_grad=requires_grad))


def test_opcheck_guided_solver_step_without_score():
    args = list(_guided_args(requires_grad=True))
    args[3] = None
    torch.library.opcheck(torch.ops.turbo_kernels.guided_solver_step.default, tuple(args))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_consistency_ops(requires_grad):
    x, eps, noise = (torch.randn(3, 2, 5, device=DEVICE, requires_grad=requires_grad) for _ in range(3))
    t, t_prev = torch.tensor([999, 500, 0], device=DEVICE), torch.tensor([749, 250, 0], device=DEVICE)
    acp = alphas_cumprod()
    torch.library.opcheck(torch.ops.turbo_kernels.consistency_output.default, (x, eps, t, acp, 10.0, 0.5))
    torch.library.opcheck(
        torch.ops.turbo_kernels.consistency_sampler_step.default, (x, eps, noise, t, t_prev, acp, 10.0, 0.5)
    )
    torch.library.opcheck(torch.ops.turbo_kernels.pseudo_huber_loss.default, (x, eps, 1e-3))


def test_torch_compile_fullgraph_matches_eager():
    acp = alphas_cumprod()

    def train_step(z_t, eps_student, eps_c, eps_u, score, t_hi, t_lo, w, m):
        f_theta = tk.consistency_output(z_t, eps_student, t_hi, acp)
        z_lo, _ = tk.guided_solver_step(z_t, eps_c, eps_u, t_hi, t_lo, w, acp, score=score, motion_scale=m)
        target = tk.consistency_output(z_lo, eps_c, t_lo, acp)
        return tk.pseudo_huber_loss(f_theta, target.detach())

    z, eps_c, eps_u, score = (torch.randn(2, 4, 2, 3, 5, device=DEVICE) for _ in range(4))
    eps_student = torch.randn_like(z, requires_grad=True)
    per_sample = (
        torch.tensor([999, 504], device=DEVICE), torch.tensor([994, 499], device=DEVICE),
        torch.tensor([7.5, 12.0], device=DEVICE), torch.tensor([0.05, 0.0], device=DEVICE),
    )
    eager = train_step(z, eps_student, eps_c, eps_u, score, *per_sample)
    (eager_grad,) = torch.autograd.grad(eager, eps_student)
    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    got = compiled(z, eps_student, eps_c, eps_u, score, *per_sample)
    (got_grad,) = torch.autograd.grad(got, eps_student)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, eager_grad, rtol=1e-6, atol=1e-9)


def test_python_scalars_and_no_motion_compile_without_graph_breaks():
    acp = alphas_cumprod()

    def teacher_step(z_t, eps_c, eps_u):
        return tk.guided_solver_step(z_t, eps_c, eps_u, 499, 494, 7.5, acp)

    z, eps_c, eps_u = (torch.randn(2, 4, 2, 3, 5, device=DEVICE) for _ in range(3))
    compiled = torch.compile(teacher_step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(z, eps_c, eps_u), teacher_step(z, eps_c, eps_u)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _extension_expected() -> bool:
    try:
        has_cuda_torch = torch.version.cuda is not None
    except AttributeError:
        has_cuda_torch = False
    toolkit = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return (
        has_cuda_torch
        and os.environ.get("TURBO_KERNELS_BUILD_CUDA", "auto") != "0"
        and os.path.exists(os.path.join(toolkit, "bin", "nvcc"))
    )


@pytest.mark.skipif(not _extension_expected(), reason="no CUDA toolkit or CPU-only torch: the extension is not built")
def test_cuda_extension_is_built_and_registers_its_ops():
    """setup.py installs pure Python, with a message, when the build fails: in a fresh install this
    test is what turns a kernel that stopped compiling red."""
    assert _cuda_ext.load_error() is None, _cuda_ext.load_error()
    namespace = _cuda_ext.ops()
    expected = {
        "guided_solver_step_fwd": "release_form",
        "guided_solver_step_bwd": "has_score",
        "consistency_output_fwd": "timestep_scaling",
        "consistency_output_bwd": "sigma_data",
    }
    for name, argument in expected.items():
        op = getattr(namespace, name).default
        assert argument in str(op._schema)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), f"{name} has no CUDA kernel"
    assert "cuda" in tk.backends("cuda")["guided_solver_step"] or not torch.cuda.is_available()
