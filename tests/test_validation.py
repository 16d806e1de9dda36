"""Bad input gets an error that names the argument at fault."""

import pytest
import torch

import turbo_kernels as tk

from .helpers import alphas_cumprod

ACP = alphas_cumprod("cpu")


def _latents(*shape, dtype=torch.float32):
    return torch.randn(shape or (2, 4, 3, 4, 5)).to(dtype)


def _guided(**overrides):
    z = _latents()
    args = dict(
        z_t=z, eps_cond=torch.randn_like(z), eps_uncond=torch.randn_like(z), t_hi=torch.tensor([999, 504]),
        t_lo=torch.tensor([994, 499]), w=7.5, alphas_cumprod=ACP,
    )
    args.update(overrides)
    return tk.guided_solver_step(**args)


def test_valid_call_passes():
    z_lo, x0 = _guided()
    assert z_lo.shape == x0.shape == (2, 4, 3, 4, 5)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(eps_cond=torch.randn(2, 4, 3, 4, 6)), ValueError, "eps_cond has shape"),
        (dict(eps_uncond=torch.randn(2, 4, 3, 4, 5, device="meta")), ValueError, "eps_uncond is on meta"),
        (dict(z_t=torch.zeros(2, 4, 3, 4, 5, dtype=torch.int32)), TypeError, "z_t must be a floating-point"),
        (dict(z_t=[1.0, 2.0]), TypeError, "z_t must be a torch.Tensor"),
        (dict(w=float("nan")), ValueError, "w must be finite"),
        (dict(w=None), TypeError, "w must be a float or a tensor, got None"),
        (dict(w=torch.tensor([7.5, float("inf")])), ValueError, "w must be finite"),
        (dict(w=torch.ones(3)), ValueError, r"w must be a scalar or have shape \(2,\)"),
        (dict(t_hi=torch.tensor([999, 1000])), ValueError, "t_hi has timesteps outside the schedule"),
        (dict(t_lo=-1), ValueError, "t_lo=-1 is outside the schedule"),
        (dict(t_hi=torch.tensor([999.0, 500.0])), TypeError, "t_hi must hold integer timesteps"),
        (dict(t_hi=2.5), TypeError, "t_hi must be an int"),
        (dict(t_hi=True), TypeError, "t_hi must be an int or an integer tensor, got bool"),
        (dict(t_lo=torch.tensor([True, False])), TypeError, "t_lo must hold integer timesteps, got dtype torch.bool"),
        (dict(w=True), TypeError, "w must be a float or a tensor, got bool"),
        (dict(w=torch.tensor([True, True])), TypeError, "w must be a real tensor, got dtype torch.bool"),
        (dict(score=torch.randn(2, 4, 3, 4, 5)), ValueError, "score and motion_scale go together"),
        (dict(motion_scale=0.05), ValueError, "score and motion_scale go together"),
        (dict(score=torch.randn(2, 4, 3, 4, 5), motion_scale=float("nan")), ValueError, "motion_scale must be finite"),
        (dict(score=torch.randn(2, 4, 1), motion_scale=0.05), ValueError, "score has shape"),
        (dict(motion_form="paper"), ValueError, "motion_form must be one of"),
        (dict(alphas_cumprod=ACP.reshape(10, 100)), ValueError, "alphas_cumprod must be a non-empty 1-D"),
        (dict(alphas_cumprod=torch.ones(1000, dtype=torch.int64)), ValueError, "alphas_cumprod must be a non-empty 1-D floating"),
        (dict(z_t=torch.tensor(1.0)), ValueError, "z_t must have at least 1 dimension"),
    ],
)
def test_guided_solver_step_errors_name_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _guided(**overrides)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.5, 1.5])
def test_alphas_cumprod_values_outside_zero_one_are_refused(bad):
    table = ACP.clone()
    table[500] = bad
    with pytest.raises(ValueError, match=r"alphas_cumprod must hold values in \(0, 1\]; 1 do not"):
        _guided(alphas_cumprod=table)
    with pytest.raises(ValueError, match=r"alphas_cumprod must hold values in \(0, 1\]"):
        tk.consistency_output(_latents(), _latents(), 10, table)


def _table_reads(call) -> list[torch.Tensor]:
    """The (1000,) tensors whose values `call()` reads through Tensor.all (the table check's read)."""
    reads, tensor_all = [], torch.Tensor.all

    def recorded_all(self, *args, **kwargs):
        reads.append(self)
        return tensor_all(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "all", recorded_all)
        call()
    return [r for r in reads if r.shape == ACP.shape]


def _tiny_motion_prior(table):
    from t2v_turbo import motion
    from t2v_turbo.models import VC2UNet

    torch.manual_seed(0)
    unet = VC2UNet.preset("tiny", use_kernels=False).eval()
    z0 = _latents(1, 4, 2, 8, 8)
    context = torch.randn(1, 77, unet.config["context_dim"])
    return lambda: motion.compute_motion_prior(
        unet, z0, torch.tensor([1]), torch.randn_like(z0), context, alphas_cumprod=table
    )


def test_the_motion_priors_table_is_read_once():
    """The table preprocess hands the motion prior (float64, converted to float32 for float32
    latents) is read once a version: its inversion and noising check the table they are handed,
    and a converted copy made every call was read every call (a synchronisation each on a GPU)."""
    from t2v_turbo import motion

    prior = _tiny_motion_prior(motion.release_alphas_cumprod(torch.float64))
    prior()
    assert not _table_reads(prior)


def test_the_motion_priors_default_table_is_made_once(monkeypatch):
    """Without a table the motion prior uses the release's, built on the host: made once a dtype
    and device, not at each of the three places a call asks for it (a host-to-device copy each on
    a GPU). Fake tensors (torch.export, FakeTensorMode) get a table of their own, never cached,
    so a later eager call gets a real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from t2v_turbo import motion

    builds = []
    build = motion.release_alphas_cumprod
    monkeypatch.setattr(motion, "release_alphas_cumprod", lambda *a: builds.append(a) or build(*a))
    motion._default_table.cache_clear()
    with FakeTensorMode() as fake_mode:
        fake_z = fake_mode.from_tensor(_latents(1, 4, 2, 8, 8))
        motion.noised_latents(fake_z, torch.randn_like(fake_z), 5)
    prior = _tiny_motion_prior(None)
    prior()
    made = len(builds)
    z_t = prior()["z_t"]
    assert len(builds) == made and type(z_t) is torch.Tensor


def test_a_table_is_checked_again_after_an_in_place_change():
    """Values are read once a table version; a table changed in place is read again. A table
    converted for the kernels (float16 here) is cached by identity, so calls after the first reuse
    it (a lookup by tensor equality failed there)."""
    for table in (ACP.clone(), ACP.half()):
        _guided(alphas_cumprod=table)
        assert not _table_reads(lambda: _guided(alphas_cumprod=table)), "the table's values were read again"
        table[3] = 2.0
        with pytest.raises(ValueError, match=r"first: 2\.0"):
            _guided(alphas_cumprod=table)


def test_the_converted_copy_of_a_table_follows_an_in_place_change():
    """The float32 copy kept of a float16 table is made again once the table changes in place (to
    values that pass the check): a stale copy would step with the old schedule."""
    def z_lo(table):
        torch.manual_seed(0)
        return _guided(alphas_cumprod=table, t_hi=torch.tensor([999, 999]))[0]

    table = ACP.half()
    before = z_lo(table)
    table[999] = 0.5
    after = z_lo(table)
    assert not torch.equal(after, before)
    assert torch.equal(after, z_lo(table.clone()))


def test_a_table_made_under_inference_mode_is_read_on_every_call():
    """Inference tensors keep no version counter: their values are checked and converted anew on
    each call, so an in-place change is neither missed by the check nor by the converted copy."""
    with torch.inference_mode():
        table = ACP.half()
        _guided(alphas_cumprod=table)
        z_lo, _ = _guided(alphas_cumprod=table)
        table[999] = 0.5
        changed, _ = _guided(alphas_cumprod=table, t_hi=torch.tensor([999, 999]))
        table[5] = 3.0
        with pytest.raises(ValueError, match=r"first: 3\.0"):
            _guided(alphas_cumprod=table)
    assert not torch.equal(changed, _guided(alphas_cumprod=ACP.half(), t_hi=torch.tensor([999, 999]))[0])


def test_zero_is_a_value_only_where_a_caller_allows_it():
    from turbo_kernels import checks

    table = ACP.clone()
    table[999] = 0.0
    checks.check_table_values(table, allow_zero=True)
    with pytest.raises(ValueError, match=r"values in \(0, 1\]; 1 do not \(first: 0\.0\)"):
        checks.check_table_values(table)


def test_consistency_and_sampler_errors_name_the_argument():
    x = _latents()
    with pytest.raises(ValueError, match="eps has shape"):
        tk.consistency_output(x, x[:1], 10, ACP)
    with pytest.raises(ValueError, match="t has timesteps outside"):
        tk.consistency_output(x, x, torch.tensor([5, 2000]), ACP)
    with pytest.raises(ValueError, match="timestep_scaling must be a positive finite number"):
        tk.consistency_output(x, x, 10, ACP, timestep_scaling=float("inf"))
    with pytest.raises(ValueError, match="sigma_data must be a positive"):
        tk.consistency_output(x, x, 10, ACP, sigma_data=0.0)
    with pytest.raises(ValueError, match="t_prev=1000 is outside"):
        tk.consistency_sampler_step(x, x, 999, 1000, ACP)
    with pytest.raises(ValueError, match="noise has shape"):
        tk.consistency_sampler_step(x, x, 999, 749, ACP, noise=x[:, :1])


def test_pseudo_huber_errors_name_the_argument():
    x = _latents()
    with pytest.raises(ValueError, match="target has shape"):
        tk.pseudo_huber_loss(x, x[0])
    with pytest.raises(TypeError, match="pred must be a floating-point"):
        tk.pseudo_huber_loss(x.long(), x)
    with pytest.raises(ValueError, match="c must be a positive"):
        tk.pseudo_huber_loss(x, x, c=-1.0)
    with pytest.raises(ValueError, match="c must be at least 1e-18"):
        tk.pseudo_huber_loss(x, x, c=1e-30)


def test_pseudo_huber_smallest_c_keeps_a_finite_gradient_at_zero_distance():
    pred = torch.tensor([0.5, 1.0, -2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(tk.pseudo_huber_loss(pred, pred.detach().clone(), c=1e-18), pred)
    assert torch.equal(grad, torch.zeros(3))


def test_value_checks_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TURBO_KERNELS_VALIDATE", "0")
    # Shape checks stay; value checks (here a non-finite w) are skipped.
    _guided(w=torch.tensor([7.5, float("nan")]))
    with pytest.raises(ValueError, match="eps_cond has shape"):
        _guided(eps_cond=torch.randn(1))


def _meta_calls():
    meta = torch.device("meta")
    z = torch.empty(2, 4, 3, 8, 8, device=meta, requires_grad=True)
    table = torch.empty(1000, device=meta)
    t_hi, t_lo = (torch.empty(2, dtype=torch.long, device=meta) for _ in range(2))
    tokens = torch.empty(2 * 4, 10, 2 * 16, device=meta, requires_grad=True)
    rows = torch.empty(5, 8, device=meta, requires_grad=True)
    channels = torch.empty(64, device=meta)
    return {
        "guided_solver_step": lambda: tk.guided_solver_step(
            z, z, z, t_hi, t_lo, torch.empty(2, device=meta), table, score=z, motion_scale=0.1
        )[0],
        "consistency_output": lambda: tk.consistency_output(z, z, t_hi, table),
        "consistency_sampler_step": lambda: tk.consistency_sampler_step(z, z, t_hi, t_lo, table)[1],
        "pseudo_huber_loss": lambda: tk.pseudo_huber_loss(z, z),
        "temporal_attention": lambda: tk.temporal_attention(tokens, tokens, tokens, 4, 2),
        "temporal_attention_probs": lambda: tk.temporal_attention_probs(tokens, tokens, 4, 2),
        "motion_energy": lambda: tk.motion_energy(tokens, tokens, torch.empty(20, 2, 4, 4, device=meta), 4, 2),
        "spatial_attention": lambda: tk.spatial_attention(tokens, tokens, tokens, 2),
        "geglu": lambda: tk.geglu(rows),
        "layer_norm": lambda: tk.layer_norm(rows, torch.empty(8, device=meta), torch.empty(8, device=meta)),
        "group_norm_silu": lambda: tk.group_norm_silu(
            torch.empty(2, 64, 3, 4, 4, device=meta, requires_grad=True), channels, channels, 32, 1e-5
        ),
        "reward_preprocess": lambda: tk.reward_preprocess(
            torch.empty(1, 2, 3, 32, 48, device=meta, requires_grad=True), [tk.PreprocessSpec(16, "crop")]
        )[0],
    }


@pytest.mark.parametrize("op", sorted(_meta_calls()))
def test_every_op_infers_shapes_on_the_meta_device(op):
    """Meta tensors (shape inference) have no values to check: the value checks skip them (the
    timestep and scalar checks read them and raised), and forward and backward give meta outputs."""
    out = _meta_calls()[op]()
    assert out.is_meta
    out.sum().backward()
