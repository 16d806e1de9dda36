"""The references of the guided-solver family against an independent float64 reading of SPEC, and
their backward formulas against autograd of their forward."""

import math

import pytest
import torch

from t2v_turbo import schedule
from turbo_kernels.reference import solver as ref


def spec_alphas_cumprod() -> list[float]:
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    betas = [(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)]
    out, running = [], 1.0
    for beta in betas:
        running *= 1.0 - beta
        out.append(running)
    return out


ACP = spec_alphas_cumprod()
ACP_TABLE = torch.tensor(ACP, dtype=torch.float64)


def spec_guided_step(z, eps_c, eps_u, score, t_hi, t_lo, w, m, form):
    z_lo, x0 = torch.empty_like(z), torch.empty_like(z)
    for b in range(z.shape[0]):
        a_hi, s_hi = math.sqrt(ACP[t_hi[b]]), math.sqrt(1 - ACP[t_hi[b]])
        a_lo, s_lo = math.sqrt(ACP[t_lo[b]]), math.sqrt(1 - ACP[t_lo[b]])
        x0_c = (z[b] - s_hi * eps_c[b]) / a_hi
        x0_u = (z[b] - s_hi * eps_u[b]) / a_hi
        x0[b] = x0_c + w[b] * (x0_c - x0_u)
        eps_hat = eps_c[b] + w[b] * (eps_c[b] - eps_u[b])
        if score is not None:
            g = math.sqrt(1 - a_hi) if form == "release" else math.sqrt(1 - ACP[t_hi[b]])
            eps_hat = eps_hat - m[b] * g * score[b]
        z_lo[b] = a_lo * x0[b] + s_lo * eps_hat
    return z_lo, x0


def spec_consistency(sample, eps, t, timestep_scaling=10.0, sigma_data=0.5):
    out = torch.empty_like(sample)
    sd2 = sigma_data * sigma_data
    for b in range(sample.shape[0]):
        s = timestep_scaling * t[b]
        c_skip, c_out = sd2 / (s * s + sd2), s / math.sqrt(s * s + sd2)
        x0 = (sample[b] - math.sqrt(1 - ACP[t[b]]) * eps[b]) / math.sqrt(ACP[t[b]])
        out[b] = c_skip * sample[b] + c_out * x0
    return out


def _inputs(shape, seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)], g


def test_schedule_tables_follow_spec():
    acp = schedule.alphas_cumprod(dtype=torch.float64)
    torch.testing.assert_close(acp, ACP_TABLE, rtol=1e-12, atol=0)
    assert abs(acp[0].item() - 0.99915) < 1e-12
    grid = schedule.ddim_timesteps()
    assert grid[0] == 4 and grid[-1] == 999 and len(grid) == 200
    assert schedule.sampler_timesteps(4) == [999, 749, 499, 249]
    assert schedule.sampler_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    sixteen = schedule.sampler_timesteps(16)
    assert sixteen[:2] == [999, 939] and sixteen[-1] == 99
    t_hi, t_lo = schedule.solver_timesteps(torch.tensor([0, 1, 199]))
    assert t_hi.tolist() == [4, 9, 999] and t_lo.tolist() == [0, 4, 994]
    with pytest.raises(ValueError, match="grid_index"):
        schedule.solver_timesteps(200)


def test_solver_timesteps_are_the_grids_entries_on_the_indices_device(monkeypatch):
    everywhere = torch.arange(schedule.DDIM_GRID_STEPS)
    t_hi, t_lo = schedule.solver_timesteps(everywhere)
    assert torch.equal(t_hi, schedule.ddim_timesteps()) and torch.equal(t_lo, (t_hi - 5).clamp(min=0))
    # Indices on a device stay there (meta stands in; it has no values, so none are read).
    on_device = torch.tensor([0, 250]).to("meta")
    assert schedule.solver_timesteps(on_device)[0].device.type == "meta"
    monkeypatch.setenv("TURBO_KERNELS_VALIDATE", "0")
    with pytest.raises(ValueError, match="grid_index"):
        schedule.solver_timesteps(torch.tensor([0, 250]))  # the host's are always checked


@pytest.mark.parametrize("form", ["release", "classic"])
@pytest.mark.parametrize("with_score", [True, False])
def test_guided_solver_reference_matches_spec(form, with_score):
    (z, ec, eu, sc), g = _inputs((3, 2, 3, 4, 5), seed=1)
    t_hi = torch.tensor([999, 504, 4])
    t_lo = (t_hi - 5).clamp(min=0)
    w = torch.tensor([5.0, 7.5, 15.0], dtype=torch.float64)
    m = torch.tensor([0.05, 0.0, 0.3], dtype=torch.float64)
    score = sc if with_score else None
    z_lo, x0 = ref.guided_solver_step(z, ec, eu, score, t_hi, t_lo, w, m, ACP_TABLE, form == "release")
    want_z_lo, want_x0 = spec_guided_step(z, ec, eu, score, t_hi.tolist(), t_lo.tolist(), w.tolist(), m.tolist(), form)
    torch.testing.assert_close(z_lo, want_z_lo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)


def test_motion_forms_differ_only_in_g():
    (z, ec, eu, sc), _ = _inputs((1, 4, 2, 3, 3), seed=2)
    f64 = dict(dtype=torch.float64)
    args = (z, ec, eu, sc, torch.tensor([600]), torch.tensor([595]), torch.tensor([7.0], **f64), torch.tensor([0.05], **f64), ACP_TABLE)
    release, _ = ref.guided_solver_step(*args, release_form=True)
    classic, _ = ref.guided_solver_step(*args, release_form=False)
    no_motion, _ = ref.guided_solver_step(z, ec, eu, None, *args[4:], release_form=True)
    sigma_lo = math.sqrt(1 - ACP[595])
    g_release, g_classic = math.sqrt(1 - math.sqrt(ACP[600])), math.sqrt(1 - ACP[600])
    torch.testing.assert_close(release - no_motion, -sigma_lo * 0.05 * g_release * sc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(classic - no_motion, -sigma_lo * 0.05 * g_classic * sc, rtol=1e-10, atol=1e-12)


def test_consistency_output_reference_matches_spec():
    (x, eps), _ = _inputs((3, 4, 2, 3, 5), seed=3, n=2)
    t = torch.tensor([0, 249, 999])
    out = ref.consistency_output(x, eps, t, ACP_TABLE)
    torch.testing.assert_close(out, spec_consistency(x, eps, t.tolist()), rtol=1e-12, atol=1e-12)
    # The boundary condition: at t = 0 the output is the sample itself.
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0)


def test_sampler_step_reference_matches_spec():
    (x, eps, noise), _ = _inputs((2, 4, 3, 2, 3), seed=4, n=3)
    t, t_prev = torch.tensor([999, 499]), torch.tensor([749, 249])
    denoised, nxt = ref.consistency_sampler_step(x, eps, noise, t, t_prev, ACP_TABLE)
    want = spec_consistency(x, eps, t.tolist())
    torch.testing.assert_close(denoised, want, rtol=1e-12, atol=1e-12)
    for b, tp in enumerate(t_prev.tolist()):
        expected = math.sqrt(ACP[tp]) * want[b] + math.sqrt(1 - ACP[tp]) * noise[b]
        torch.testing.assert_close(nxt[b], expected, rtol=1e-12, atol=1e-12)


def test_pseudo_huber_reference_matches_spec():
    (p, q), _ = _inputs((2, 3, 4, 5), seed=5, n=2)
    p = p * 1e-3  # the regime where |d| ~ c
    q = q * 1e-3
    want = sum(math.sqrt((a - b) ** 2 + 1e-6) - 1e-3 for a, b in zip(p.flatten().tolist(), q.flatten().tolist())) / p.numel()
    assert abs(ref.pseudo_huber_loss(p, q).item() - want) < 1e-15


def test_pseudo_huber_reference_keeps_its_digits_far_below_c():
    """|d| ~ 1e-6 << c (a student at its target): sqrt(d^2 + c^2) - c computed in float32 cancels
    to a few percent of the loss; the float32 reference must stay at float32 precision."""
    (p, q), _ = _inputs((4, 64), seed=7, n=2)
    p, q = p * 1e-6, q * 1e-6
    want = ref.pseudo_huber_loss(p, q)
    got = ref.pseudo_huber_loss(p.float(), q.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_reference_fp32_close_to_float64():
    (z, ec, eu, sc), _ = _inputs((2, 4, 3, 4, 4), seed=6)
    t_hi, t_lo, w, m = torch.tensor([999, 9]), torch.tensor([994, 4]), torch.tensor([6.0, 14.0]), torch.tensor([0.05, 0.05])
    z_lo64, x0_64 = ref.guided_solver_step(z, ec, eu, sc, t_hi, t_lo, w, m, ACP_TABLE)
    z_lo32, x0_32 = ref.guided_solver_step(z.float(), ec.float(), eu.float(), sc.float(), t_hi, t_lo, w, m, ACP_TABLE.float())
    assert z_lo32.dtype == torch.float32
    torch.testing.assert_close(z_lo32.double(), z_lo64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_32.double(), x0_64, rtol=1e-4, atol=1e-4)


def _vjp(fn, inputs, grads):
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, inputs, grads)


@pytest.mark.parametrize("form", ["release", "classic"])
@pytest.mark.parametrize("with_score", [True, False])
def test_guided_solver_backward_formula_matches_autograd(form, with_score):
    (z, ec, eu, sc), _ = _inputs((2, 3, 2, 3, 4), seed=7)
    (gz, gx), _ = _inputs((2, 3, 2, 3, 4), seed=8, n=2)
    t_hi, t_lo, w, m = torch.tensor([800, 4]), torch.tensor([795, 0]), torch.tensor([5.5, 12.0]), torch.tensor([0.05, 0.2])
    release = form == "release"
    inputs = [z, ec, eu] + ([sc] if with_score else [])

    def forward(*xs):
        score = xs[3] if with_score else None
        return ref.guided_solver_step(xs[0], xs[1], xs[2], score, t_hi, t_lo, w, m, ACP_TABLE, release)

    want = _vjp(forward, inputs, (gz, gx))
    got = ref.guided_solver_step_backward(gz, gx, t_hi, t_lo, w, m, ACP_TABLE, release, with_score)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[3].numel() == (z.numel() if with_score else 0)


def test_consistency_backward_formulas_match_autograd():
    (x, eps, noise, g1), _ = _inputs((3, 2, 2, 3, 3), seed=9)
    (g2,), _ = _inputs((3, 2, 2, 3, 3), seed=10, n=1)
    t, t_prev = torch.tensor([999, 500, 0]), torch.tensor([749, 250, 0])
    want = _vjp(lambda a, b: ref.consistency_output(a, b, t, ACP_TABLE), [x, eps], (g1,))
    got = ref.consistency_output_backward(g1, t, ACP_TABLE, 10.0, 0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    want = _vjp(lambda a, b, c: ref.consistency_sampler_step(a, b, c, t, t_prev, ACP_TABLE), [x, eps, noise], (g1, g2))
    got = ref.consistency_sampler_step_backward(g1, g2, t, t_prev, ACP_TABLE, 10.0, 0.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_consistency_references_follow_their_scalings():
    """timestep_scaling and sigma_data other than SPEC's 10 and 0.5 reach c_skip and c_out, in
    consistency_output, in the sampler step (which must hand them on) and in both backwards: every
    other test uses the defaults, where a scaling that is ignored or squared wrongly goes unseen."""
    (x, eps, noise, g1, g2), _ = _inputs((2, 3, 2, 3), seed=12, n=5)
    t, t_prev = torch.tensor([999, 3]), torch.tensor([749, 0])
    scalings = dict(timestep_scaling=0.002, sigma_data=1.7)  # at t = 999 s ~ 2: c_skip 0.42, c_out 0.76
    want = spec_consistency(x, eps, t.tolist(), 0.002, 1.7)
    torch.testing.assert_close(ref.consistency_output(x, eps, t, ACP_TABLE, **scalings), want, rtol=1e-12, atol=1e-12)
    denoised, _ = ref.consistency_sampler_step(x, eps, noise, t, t_prev, ACP_TABLE, **scalings)
    torch.testing.assert_close(denoised, want, rtol=1e-12, atol=1e-12)
    fwd = _vjp(lambda a, b: ref.consistency_output(a, b, t, ACP_TABLE, **scalings), [x, eps], (g1,))
    for a, b in zip(ref.consistency_output_backward(g1, t, ACP_TABLE, 0.002, 1.7), fwd):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fwd = _vjp(lambda a, b, c: ref.consistency_sampler_step(a, b, c, t, t_prev, ACP_TABLE, **scalings), [x, eps, noise], (g1, g2))
    for a, b in zip(ref.consistency_sampler_step_backward(g1, g2, t, t_prev, ACP_TABLE, 0.002, 1.7), fwd):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pseudo_huber_backward_formula_matches_autograd():
    (p, q), _ = _inputs((2, 3, 5), seed=11, n=2)
    grad = torch.tensor(0.7, dtype=torch.float64)
    want = _vjp(lambda a, b: ref.pseudo_huber_loss(a, b, 0.01), [p, q], (grad,))
    got = ref.pseudo_huber_loss_backward(grad, p, q, 0.01)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
