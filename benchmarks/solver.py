"""Benchmark cases of the guided-solver family (SPEC 3 and 6) at VideoCrafter2 latent shapes.

Each op is timed as the plain reference function called eagerly, the same function under
torch.compile, and the public op under each kernel backend (so argument handling and dispatch
count). Inputs are what a training step hands in: per-sample timesteps at random grid indices,
w ~ U[5, 15], motion strength on the noisier half of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch

import turbo_kernels as tk
from benchmarks.harness import COMPILED, EAGER, Case, Impl, SuiteOptions
from t2v_turbo import schedule
from turbo_kernels import dispatch
from turbo_kernels.reference import solver as ref

# A VideoCrafter2 latent without its batch: 4 channels, 16 frames of 320x512 pixels / 8.
LATENT = (4, 16, 40, 64)
QUICK_LATENT = (4, 2, 8, 8)
GPU_BATCH_SIZES = (1, 8, 32)
CPU_BATCH_SIZES = (1,)
QUICK_BATCH_SIZES = (1, 2)
KERNEL_BACKENDS = ("triton", "cuda")
W_RANGE = (5.0, 15.0)
MOTION_STRENGTH = 0.05


@dataclass(frozen=True)
class OpBench:
    """How to call one op on an input namespace `x`: `reference_args(x)` are the reference
    function's arguments, `public(x)` calls the public op. Traffic is in latent-sized tensors read
    plus written by an ideal fused kernel; bwd_traffic None: the op is timed forward only."""

    name: str
    latents: tuple[str, ...]
    latent_outputs: int  # 0: the op returns a scalar
    reference_args: Callable[[SimpleNamespace], tuple]
    public: Callable[[SimpleNamespace], object]
    fwd_traffic: int
    bwd_traffic: Optional[int]


OPS = (
    OpBench(
        "guided_solver_step",
        latents=("z_t", "eps_cond", "eps_uncond", "score"),
        latent_outputs=2,
        reference_args=lambda x: (
            x.z_t, x.eps_cond, x.eps_uncond, x.score, x.t_hi, x.t_lo, x.w, x.motion_scale, x.alphas_cumprod, True
        ),
        public=lambda x: tk.guided_solver_step(
            x.z_t, x.eps_cond, x.eps_uncond, x.t_hi, x.t_lo, x.w, x.alphas_cumprod,
            score=x.score, motion_scale=x.motion_scale,
        ),
        fwd_traffic=4 + 2,
        bwd_traffic=2 + 4,
    ),
    OpBench(
        "consistency_output",
        latents=("sample", "eps"),
        latent_outputs=1,
        reference_args=lambda x: (x.sample, x.eps, x.t_hi, x.alphas_cumprod),
        public=lambda x: tk.consistency_output(x.sample, x.eps, x.t_hi, x.alphas_cumprod),
        fwd_traffic=2 + 1,
        bwd_traffic=1 + 2,
    ),
    OpBench(
        "consistency_sampler_step",
        latents=("sample", "eps", "noise"),
        latent_outputs=2,
        reference_args=lambda x: (x.sample, x.eps, x.noise, x.t_hi, x.t_lo, x.alphas_cumprod),
        public=lambda x: tk.consistency_sampler_step(x.sample, x.eps, x.t_hi, x.t_lo, x.alphas_cumprod, noise=x.noise),
        fwd_traffic=3 + 2,
        bwd_traffic=None,
    ),
    OpBench(
        "pseudo_huber_loss",
        latents=("pred", "target"),
        latent_outputs=0,
        reference_args=lambda x: (x.pred, x.target),
        public=lambda x: tk.pseudo_huber_loss(x.pred, x.target),
        fwd_traffic=2,
        # The backward reads pred and target again and writes both gradients.
        bwd_traffic=2 + 2,
    ),
)


def _input_maker(op: OpBench, shape: tuple[int, ...], options: SuiteOptions, with_grad: bool) -> Callable:
    device, dtype, batch = options.device, options.dtype, shape[0]
    latent_generator = torch.Generator(device=device).manual_seed(options.seed)
    scalar_generator = torch.Generator().manual_seed(options.seed)

    def latent(requires_grad: bool = False) -> torch.Tensor:
        x = torch.randn(shape, generator=latent_generator, device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    # One table for every input set, as a training run holds one: the ops read a new table's
    # values once (a synchronisation), which would otherwise land in the timed calls.
    alphas_cumprod = schedule.alphas_cumprod(device=device)

    def make_inputs() -> SimpleNamespace:
        grid = torch.randint(0, schedule.DDIM_GRID_STEPS, (batch,), generator=scalar_generator)
        t_hi, t_lo = schedule.solver_timesteps(grid)
        w = torch.empty(batch).uniform_(*W_RANGE, generator=scalar_generator)
        motion_scale = torch.where(grid >= schedule.DDIM_GRID_STEPS // 2, MOTION_STRENGTH, 0.0)
        latents = {name: latent(with_grad) for name in op.latents}
        if not with_grad:
            grad_outputs = ()
        elif op.latent_outputs:
            grad_outputs = tuple(latent() for _ in range(op.latent_outputs))
        else:
            grad_outputs = (torch.ones((), device=device),)
        return SimpleNamespace(
            **latents,
            t_hi=t_hi.to(device),
            t_lo=t_lo.to(device),
            w=w.to(device),
            motion_scale=motion_scale.to(device),
            alphas_cumprod=alphas_cumprod,
            differentiable=tuple(latents.values()) if with_grad else (),
            grad_outputs=grad_outputs,
        )

    return make_inputs


def _forward_backward(forward: Callable) -> Callable:
    """Forward, then the backward from the fixed upstream gradients (torch.autograd.grad, so no
    gradient accumulates into .grad between calls)."""

    def call(x: SimpleNamespace):
        outputs = forward(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return torch.autograd.grad(outputs, x.differentiable, x.grad_outputs)

    return call


def _under_backend(name: str, call: Callable) -> Callable:
    # The backward dispatches too, so the whole call runs inside the backend's block.
    def run(x: SimpleNamespace):
        with tk.backend(name):
            return call(x)

    return run


def _kernel_backends(op: str, device: torch.device) -> Iterator[tuple[str, Optional[str]]]:
    """The kernel backends `op` has, each with why it cannot run here (None: it can)."""
    for name in KERNEL_BACKENDS:
        try:
            dispatch.implementation(op, name)
        except KeyError:
            continue
        # The Triton interpreter (TRITON_INTERPRET=1) is a testing tool, never worth timing.
        yield name, "no GPU" if device.type != "cuda" else dispatch.machine_unavailable_reason(name, device)


def _impls(op: OpBench, with_grad: bool, device: torch.device) -> tuple[Impl, ...]:
    def timed(forward: Callable) -> Callable:
        return _forward_backward(forward) if with_grad else forward

    reference = getattr(ref, op.name)
    compiled = torch.compile(reference, dynamic=False)
    impls = [
        Impl(EAGER, timed(lambda x: reference(*op.reference_args(x)))),
        Impl(COMPILED, timed(lambda x: compiled(*op.reference_args(x))), compiles=True),
    ]
    for name, unavailable in _kernel_backends(op.name, device):
        impls.append(Impl(name, _under_backend(name, timed(op.public)), unavailable=unavailable))
    return tuple(impls)


def cases(options: SuiteOptions) -> Iterator[Case]:
    """guided_solver_step (with score and motion scale, the training case), consistency_output and
    pseudo_huber_loss forward and forward+backward, consistency_sampler_step forward."""
    on_gpu = options.device.type == "cuda"
    latent = QUICK_LATENT if options.quick else LATENT
    batch_sizes = options.batch_sizes or (
        QUICK_BATCH_SIZES if options.quick else GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES
    )
    element_size = torch.empty((), dtype=options.dtype).element_size()
    for op in OPS:
        passes = [("fwd", op.fwd_traffic)]
        if op.bwd_traffic is not None:
            passes.append(("fwd+bwd", op.fwd_traffic + op.bwd_traffic))
        for pass_name, traffic in passes:
            with_grad = pass_name == "fwd+bwd"
            for batch in batch_sizes:
                shape = (batch, *latent)
                numel = batch * torch.Size(latent).numel()
                yield Case(
                    op=op.name,
                    case="x".join(map(str, shape)),
                    pass_name=pass_name,
                    make_inputs=_input_maker(op, shape, options, with_grad),
                    impls=_impls(op, with_grad, options.device),
                    bytes_moved=traffic * numel * element_size,
                    dtype=options.dtype,
                    shape=shape,
                )
