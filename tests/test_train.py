"""The consistency-distillation loop (t2v_turbo.train) on a small VC2UNet and a synthetic cache:
the first step's loss against SPEC 3 written out here, kernels vs references, exact resume,
a loss that falls on a fixed batch, NaN handling, LoRA, configuration and 2-process DDP."""

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import turbo_kernels
from t2v_turbo import motion as motion_module
from t2v_turbo import train as train_module
from t2v_turbo import schedule
from t2v_turbo.models import adapter
from t2v_turbo.cache import CacheWriter
from t2v_turbo.commands.train import add_train_command
from t2v_turbo.models import VC2UNet, guidance_embedding, motion_embedding
from t2v_turbo.models.checkpoint import from_pretrained, save_pretrained
from t2v_turbo.train import (
    NonFiniteLossError,
    StepBatchSampler,
    TrainConfig,
    draw_guidance_scales,
    prepare_training,
    train,
)

from .helpers import torchrun

# 64 channels, two a GroupNorm(32) group: with one channel a group every norm removed the timestep,
# guidance and motion embeddings' per-channel shift, and t, w and m changed eps by ~1e-6, so no test
# here could see the student or its target conditioned on the wrong t, w or m.
SMALL_UNET = dict(
    in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1], num_res_blocks=1,
    channel_mult=[1], num_head_channels=8, context_dim=16, time_cond_proj_dim=256, motion_cond_proj_dim=256,
)
LATENT = (4, 2, 4, 4)  # C, F, h, w
NUM_SAMPLES = 4
# Grid indices cover both halves; samples 1 and 2 are motion clips, only 1 on the noisier half.
GRID_INDEX = [0, 150, 40, 199]
USE_MOTION = [False, True, True, False]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_cache(
    directory: Path, num_samples: int = NUM_SAMPLES, seed: int = 0, dtype=torch.float16, producing_config=None,
    latent: tuple[int, ...] = LATENT, short_captions: bool = False,
) -> Path:
    g = torch.Generator().manual_seed(seed)
    grid = (GRID_INDEX * num_samples)[:num_samples]
    motion = (USE_MOTION * num_samples)[:num_samples]
    with CacheWriter(directory, shard_size=3, dtype=dtype, config=producing_config) as writer:
        writer.add({
            "z_t": torch.randn(num_samples, *latent, generator=g),
            "eps_cond": torch.randn(num_samples, *latent, generator=g),
            "eps_uncond": torch.randn(num_samples, *latent, generator=g),
            "score": torch.randn(num_samples, *latent, generator=g),
            "context": torch.randn(num_samples, 6, 16, generator=g),
            "grid_index": torch.tensor(grid),
            "use_motion": torch.tensor(motion),
            "caption": [f"clip {i}" for i in range(num_samples)],
            **({"short_caption": [f"short {i}" for i in range(num_samples)]} if short_captions else {}),
        })
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    torch.manual_seed(0)
    teacher = VC2UNet(**SMALL_UNET)
    # The conditioning projections start random here (the release starts them from zero or the
    # teacher), so w and m visibly change the student's output.
    save_pretrained(teacher, root / "teacher")
    return {"teacher": str(root / "teacher"), "cache": str(write_cache(root / "cache"))}


def config(assets, output_dir, **overrides) -> TrainConfig:
    values = dict(
        teacher=assets["teacher"], cache=assets["cache"], output_dir=str(output_dir), max_steps=2, batch_size=2,
        checkpoint_every=0, kernels="off", progress=False, seed=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


def expected_first_loss(assets, cfg: TrainConfig) -> float:
    """SPEC 3.1-3.6 in float64 from the teacher's weights (dropout off)."""
    acp = schedule.alphas_cumprod(torch.float64)
    unet = from_pretrained(assets["teacher"], use_kernels=False).train()
    for module in unet.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    indices = next(iter(StepBatchSampler(NUM_SAMPLES, cfg.batch_size, cfg.seed, 0, 1)))
    from t2v_turbo.cache import TeacherCache, collate_samples

    batch = collate_samples([TeacherCache(cfg.cache)[i] for i in indices])
    w = draw_guidance_scales(cfg, 0, cfg.batch_size, 0).double()
    n = batch["grid_index"]
    m = torch.tensor([cfg.motion_strength if bool(u) and int(k) >= 100 else 0.0 for u, k in zip(batch["use_motion"], n)])
    t_hi = 5 * (n + 1) - 1
    t_lo = (t_hi - 5).clamp(min=0)

    def per_sample(values):
        return values.double().reshape(-1, 1, 1, 1, 1)

    def a(t):
        return per_sample(acp[t].sqrt())

    def s(t):
        return per_sample((1 - acp[t]).sqrt())

    def boundary(sample, eps, t):
        scaled = per_sample(10.0 * t)
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25).sqrt()
        return c_skip * sample + c_out * (sample - s(t) * eps) / a(t)

    z_t, ctx = batch["z_t"].float(), batch["context"].float()
    z64 = z_t.double()
    with torch.no_grad():
        eps_theta = unet(z_t, t_hi, ctx, 8, guidance_embedding(w.float()), motion_embedding(m)).double()
        eps_c, eps_u, score = (batch[k].double() for k in ("eps_cond", "eps_uncond", "score"))
        x0_c, x0_u = (z64 - s(t_hi) * eps_c) / a(t_hi), (z64 - s(t_hi) * eps_u) / a(t_hi)
        x0 = x0_c + per_sample(w) * (x0_c - x0_u)
        # The release's g(t) = sqrt(1 - sqrt(abar)), or the classic sqrt(1 - abar).
        g = (1 - a(t_hi)).sqrt() if cfg.motion_form == "release" else s(t_hi)
        eps_hat = eps_c + per_sample(w) * (eps_c - eps_u) - per_sample(m) * g * score
        z_lo = a(t_lo) * x0 + s(t_lo) * eps_hat
        eps_target = unet(z_lo.float(), t_lo, ctx, 8, guidance_embedding(w.float()), motion_embedding(m)).double()
        diff = boundary(z64, eps_theta, t_hi) - boundary(z_lo, eps_target, t_lo)
    return float((diff.square() + 1e-6).sqrt().sub(1e-3).mean())


def test_end_to_end_first_loss_follows_spec_and_writes_outputs(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", max_steps=3, checkpoint_every=2, keep_last=1, temporal_conv_dropout=0.0)
    result = train(cfg)
    assert result.steps == 3 and len(result.losses) == 3
    # float32 model and ops vs float64 maths on the same weights.
    assert result.losses[0] == pytest.approx(expected_first_loss(assets, cfg), rel=1e-4)
    # Checkpoints at step 2 and at the last step, keep_last=1 of them kept.
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-000003"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,loss_cd") and len(rows) == 4
    # Without CUDA the memory figure is the process's peak resident memory, at least the model's weights.
    weights_mib = sum(p.numel() * p.element_size() for p in from_pretrained(assets["teacher"]).parameters()) / 2**20
    assert all(row["max_rss_mib"] > weights_mib for row in result.history)
    student, teacher = from_pretrained(result.student_dir), from_pretrained(assets["teacher"])
    assert student.config == teacher.config
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])]
    assert len(moved) > len(teacher.state_dict()) // 2


@pytest.mark.parametrize("form", ["release", "classic"])
def test_first_loss_of_a_motion_clip_follows_spec(assets, tmp_path, form):
    """Seed 5's first batch holds sample 1 (a motion clip at n = 150, so m = motion_strength) and
    sample 2 (a motion clip at n = 40, m = 0). Pins the motion term of the guided solver step:
    the cached score enters with its sign and the configured g(t), and the self-target gets the
    same motion embedding m as the student (the seed-3 batch of the end-to-end test has m = 0)."""
    cfg = config(assets, tmp_path / "run", seed=5, max_steps=1, temporal_conv_dropout=0.0, motion_form=form)
    indices = next(iter(StepBatchSampler(NUM_SAMPLES, cfg.batch_size, cfg.seed, 0, 1)))
    assert sorted(indices) == [1, 2] and GRID_INDEX[1] >= 100 and USE_MOTION[1]
    assert train(cfg).losses[0] == pytest.approx(expected_first_loss(assets, cfg), rel=1e-4)


def test_the_self_target_takes_no_gradient(assets, tmp_path):
    """SPEC 3.5: the target is computed under no_grad, so L_CD's gradient reaches the network only
    through the student's f_theta: a separate target network (here a copy of the student) gets
    none."""
    import copy

    from t2v_turbo.cache import TeacherCache, collate_samples

    cfg = config(assets, tmp_path / "unused", motion_strength=0.05)
    batch = collate_samples([TeacherCache(cfg.cache)[i] for i in (1, 3)])
    student = from_pretrained(assets["teacher"], use_kernels=False).train()
    target_net = copy.deepcopy(student)
    w = torch.tensor([6.0, 12.0])
    m = train_module.motion_strengths(batch["grid_index"], batch["use_motion"], cfg.motion_strength)
    acp = schedule.release_alphas_cumprod(torch.float32)
    with turbo_kernels.backend("reference"):
        out = train_module.distillation_loss(student, target_net, batch, w, m, acp, cfg)
        out.loss_cd.backward()
    assert all(p.grad is None for p in target_net.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in student.parameters())


def test_kernel_path_matches_reference_path(assets, tmp_path, monkeypatch, chosen):
    # The loop's own ops (solver step, boundary output, loss, and their backwards) on Triton; the
    # UNet keeps plain PyTorch attention here, because Triton's interpreter would take minutes on
    # its kernels (test_vc2_unet checks those against the goldens).
    build = train_module.build_student

    def student_without_unet_kernels(cfg):
        student = build(cfg)
        student.use_kernels = False
        return student

    reference = train(config(assets, tmp_path / "reference", kernels="off"))
    assert chosen and {backend for _, backend in chosen} == {"reference"}
    chosen.clear()
    monkeypatch.setattr(train_module, "build_student", student_without_unet_kernels)
    with turbo_kernels.backend("triton"):
        kernels = train(config(assets, tmp_path / "kernels", kernels="on"))
    ran = {op for op, backend in chosen if backend == "triton"}
    assert {"guided_solver_step", "consistency_output", "consistency_output_backward", "pseudo_huber_loss",
            "pseudo_huber_loss_backward"} <= ran, chosen
    # Same dropout masks (same seed); the ops differ only in float32 rounding.
    assert kernels.losses == pytest.approx(reference.losses, rel=1e-5)
    for mine, theirs in zip(kernels.history, reference.history):
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


@pytest.mark.gpu
def test_kernel_path_with_the_unets_kernels_matches_reference_path(assets, tmp_path, chosen):
    """On a GPU the whole step, the UNet's temporal attention, GroupNorm-SiLU, LayerNorm and GEGLU
    included, runs on the kernels; float32 throughout, so only rounding differs."""
    reference = train(config(assets, tmp_path / "reference", kernels="off", temporal_conv_dropout=0.0))
    chosen.clear()
    kernels = train(config(assets, tmp_path / "kernels", kernels="on", temporal_conv_dropout=0.0))
    ran = {op for op, backend in chosen if backend != "reference"}
    assert {"temporal_attention", "channel_affine_silu", "layer_norm", "geglu", "guided_solver_step"} <= ran, chosen
    assert kernels.losses == pytest.approx(reference.losses, rel=1e-4)
    for mine, theirs in zip(kernels.history, reference.history):
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)


def test_resume_continues_bit_for_bit(assets, tmp_path, monkeypatch):
    straight = train(config(assets, tmp_path / "straight", max_steps=6, checkpoint_every=2))
    step = train_module._Trainer.train_step

    def killed_in_step_5(trainer, batch):
        if trainer.step == 4:
            step(trainer, batch)  # the update is made, then the process dies before anything is written
            raise KeyboardInterrupt
        return step(trainer, batch)

    with monkeypatch.context() as patch:
        patch.setattr(train_module._Trainer, "train_step", killed_in_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(config(assets, tmp_path / "killed", max_steps=6, checkpoint_every=2))
    assert [path.name for path in train_module.checkpoint_dirs(tmp_path / "killed")] == ["checkpoint-000002", "checkpoint-000004"]
    resumed = train(config(assets, tmp_path / "killed", max_steps=6, checkpoint_every=2, resume="latest"))
    assert resumed.steps == 6 and resumed.losses == straight.losses[4:]
    for name in ("model.safetensors", "rng-p0.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoint-000006" / name))
        b = load_file(str(tmp_path / "killed" / "checkpoint-000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = torch.load(tmp_path / "straight" / "checkpoint-000006" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "killed" / "checkpoint-000006" / "optimizer.pt", weights_only=True)
    for index, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][index][key]), (index, key)
    state = json.loads((tmp_path / "killed" / "checkpoint-000006" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 3, 0)
    steps = [line.split(",")[0] for line in (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]


def _signal_after_step(patch, signum, step_number: int) -> None:
    """Sends `signum` to this process when step `step_number` has reduced its terms (inside
    train_step, before the loop counts the step)."""
    step = train_module._Trainer.train_step

    def signalled(trainer, batch):
        metrics = step(trainer, batch)
        if trainer.step == step_number - 1:
            os.kill(os.getpid(), signum)
        return metrics

    patch.setattr(train_module._Trainer, "train_step", signalled)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_stop_signal_ends_the_run_after_a_whole_step_with_a_checkpoint(assets, tmp_path, monkeypatch, signum):
    """SIGINT or SIGTERM during step 2 (after its terms were reduced) reaches every process
    through step 3's reduction: the run stops after step 3 with a checkpoint of it, and resuming
    continues exactly."""
    straight = train(config(assets, tmp_path / "straight", max_steps=5, checkpoint_every=100))
    handler_before = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        _signal_after_step(patch, signum, 2)
        with pytest.raises(KeyboardInterrupt):
            train(config(assets, tmp_path / "stopped", max_steps=5, checkpoint_every=100))
    assert [p.name for p in train_module.checkpoint_dirs(tmp_path / "stopped")] == ["checkpoint-000003"]
    assert signal.getsignal(signum) is handler_before
    resumed = train(config(assets, tmp_path / "stopped", max_steps=5, checkpoint_every=100, resume="latest"))
    assert resumed.losses == straight.losses[3:]


def test_a_stop_is_checkpointed_without_periodic_checkpoints_and_the_last_step_finishes(assets, tmp_path, monkeypatch):
    _signal_after_step(monkeypatch, signal.SIGTERM, 1)
    with pytest.raises(KeyboardInterrupt):
        train(config(assets, tmp_path / "stopped", max_steps=3, checkpoint_every=0))
    assert [p.name for p in train_module.checkpoint_dirs(tmp_path / "stopped")] == ["checkpoint-000002"]
    # Read in step 2 of 2: the run ends as it would have, its student written.
    finished = train(config(assets, tmp_path / "finished", max_steps=2, checkpoint_every=5))
    assert finished.steps == 2 and (finished.student_dir / "model.safetensors").is_file()


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_signal_stays_ignored(monkeypatch):
    with train_module._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # A run started in the background inherits SIGINT ignored: Ctrl-C in that terminal is not for it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with train_module._StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_data_loader_workers_leave_stop_signals_to_the_main_process():
    previous = {signum: signal.getsignal(signum) for signum in train_module.STOP_SIGNALS}
    try:
        train_module._ignore_stop_signals(0)
        assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in train_module.STOP_SIGNALS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_resume_refuses_a_cache_that_changed(assets, tmp_path):
    """The data order is drawn over the cache's samples: a checkpoint records the cache it read
    (sample count, producing config), and a resume that finds another refuses to go on."""
    out = tmp_path / "run"
    train(config(assets, out, max_steps=2, checkpoint_every=2))
    state_path = out / "checkpoint-000002" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["cache_samples"] > 0 and "cache_config" in state
    state_path.write_text(json.dumps({**state, "cache_samples": state["cache_samples"] + 8}))
    with pytest.raises(ValueError, match="cannot resume .* differ for .*cache_samples"):
        train(config(assets, out, max_steps=4, checkpoint_every=2, resume="latest"))


def test_ema_target_starts_as_the_student_and_then_lags_it(assets, tmp_path):
    """With ema_decay the self-target is the EMA network: the first step's loss is the plain run's
    (the EMA starts as the student), the second's is not; each checkpoint holds the EMA, which is
    decay * before + (1 - decay) * the student after the step (decay 0.75: at 0.5 the two weights
    are equal, and a loop passing 1 - decay would go unseen)."""
    plain = train(config(assets, tmp_path / "plain", max_steps=2, checkpoint_every=2))
    ema = train(config(assets, tmp_path / "ema", max_steps=2, ema_decay=0.75, checkpoint_every=1, keep_last=2))
    assert ema.losses[0] == plain.losses[0]
    assert ema.losses[1] != pytest.approx(plain.losses[1], rel=1e-6, abs=0)
    before = from_pretrained(assets["teacher"]).state_dict()
    for step in (1, 2):
        checkpoint = tmp_path / "ema" / f"checkpoint-{step:06d}"
        student, averaged = (load_file(str(checkpoint / name)) for name in ("model.safetensors", "ema.safetensors"))
        assert averaged.keys() == student.keys()
        moved = 0
        for key, value in averaged.items():
            torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * student[key], rtol=1e-6, atol=1e-7, msg=key)
            moved += not torch.equal(value, before[key])
        assert moved > len(averaged) // 2
        before = averaged
    # A resume must keep the EMA target or its absence: a checkpoint without one reported itself
    # unreadable, and one with it had its EMA silently dropped.
    for run, ema_decay in (("plain", 0.5), ("ema", None)):
        (tmp_path / run / "student").rename(tmp_path / run / f"student-{ema_decay}")
        with pytest.raises(ValueError, match=r"cannot resume .* differ for \{'ema'"):
            train(config(assets, tmp_path / run, max_steps=3, ema_decay=ema_decay, checkpoint_every=1, resume="latest"))


def test_ema_update_moves_a_fraction_one_minus_decay_toward_the_student():
    """ema <- decay * ema + (1 - decay) * online, on its own, at SPEC 3.5's decay 0.95 (the EMA run
    above checks it through training at 0.75)."""
    torch.manual_seed(0)
    ema, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    train_module.ema_update(ema, online, 0.95)
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, 0.95 * before[key] + 0.05 * online.state_dict()[key], rtol=1e-6, atol=1e-7)


def test_keep_last_prunes_old_checkpoints_and_leaves_no_temporaries(assets, tmp_path):
    train(config(assets, tmp_path / "run", max_steps=4, checkpoint_every=1, keep_last=2))
    assert [path.name for path in train_module.checkpoint_dirs(tmp_path / "run")] == ["checkpoint-000003", "checkpoint-000004"]
    assert not [path.name for path in (tmp_path / "run").iterdir() if path.name.endswith(".tmp")]


def test_gradients_are_clipped_to_grad_clip_before_the_update(assets, tmp_path, monkeypatch):
    """The optimizer sees gradients of norm grad_clip when the step's (logged, unclipped) norm is
    larger, and the unclipped ones otherwise."""
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    clipped = train(config(assets, tmp_path / "clipped", max_steps=1, grad_clip=0.01))
    loose = train(config(assets, tmp_path / "loose", max_steps=1, grad_clip=1e9))
    logged = clipped.history[0]["grad_norm"]
    assert logged == pytest.approx(loose.history[0]["grad_norm"], rel=1e-6) and logged > 0.1
    assert seen[0] == pytest.approx(0.01, rel=1e-4)
    assert seen[1] == pytest.approx(logged, rel=1e-5)


def test_gradient_checkpointing_trains_the_same(assets, tmp_path):
    """Recomputing each UNet block in the backward (dropout replayed from the saved RNG state)
    changes neither the losses nor the gradients."""
    plain = train(config(assets, tmp_path / "plain", max_steps=2, checkpoint_every=2))
    checkpointed = train(config(assets, tmp_path / "checkpointed", max_steps=2, gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)
    for mine, theirs in zip(checkpointed.history, plain.history):
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5)


def test_guidance_scales_are_uniform_on_w_min_w_max_and_split_by_process(assets, tmp_path):
    """w ~ U[5, 15] (SPEC 3.2): over 400 steps of a 4-sample global batch the draws cover the
    interval evenly (each tenth holds 160 +- 48 of 1600: more than 4 standard deviations); two
    processes take the halves of the same global draw."""
    cfg = config(assets, tmp_path / "unused", batch_size=4)
    draws = torch.cat([draw_guidance_scales(cfg, step, 4, 0) for step in range(400)]).double()
    assert (cfg.w_min, cfg.w_max) == (5.0, 15.0)
    assert draws.min() >= 5.0 and draws.max() <= 15.0
    counts = torch.histc(draws, bins=10, min=5.0, max=15.0)
    assert ((counts - 160).abs() <= 48).all(), counts
    half = config(assets, tmp_path / "unused", batch_size=2)
    both = torch.cat([draw_guidance_scales(half, 7, 4, rank) for rank in (0, 1)])
    assert torch.equal(both, draw_guidance_scales(cfg, 7, 4, 0))


def test_each_sample_of_a_step_draws_its_own_guidance_scale(assets, tmp_path):
    """SPEC 3.1: w ~ U[5, 15] per sample, not one w shared by the batch (which the histogram of
    all draws above would not notice)."""
    cfg = config(assets, tmp_path / "unused", batch_size=4)
    for step in range(20):
        draws = draw_guidance_scales(cfg, step, 4, 0)
        assert len(set(draws.tolist())) == 4, (step, draws)


def test_motion_strength_applies_to_motion_clips_from_grid_index_100():
    """SPEC 3.2: m = strength for motion clips with n >= 100 (the noisier half), n = 100 included;
    0 for n <= 99 and for clips without motion guidance. The cache of these tests has no clip at
    the boundary."""
    grid_index = torch.tensor([0, 99, 100, 101, 199, 100, 199])
    use_motion = torch.tensor([True, True, True, True, True, False, False])
    m = train_module.motion_strengths(grid_index, use_motion, 0.05)
    assert m.dtype == torch.float32
    assert m.tolist() == pytest.approx([0, 0, 0.05, 0.05, 0.05, 0, 0])


def test_each_epoch_is_a_new_permutation_split_between_processes():
    """The data order (module doc of t2v_turbo.train): every epoch visits each sample once, in an
    order of its own (not the first epoch's again), and process r takes the r-th slice of each
    global batch, so two processes together see what one process with twice the batch sees (the
    2-process DDP test checks this too, but is marked slow)."""
    num_samples, batch, steps = 8, 2, 6  # 2 steps an epoch with 2 processes
    per_process = [list(StepBatchSampler(num_samples, batch, 3, 0, steps, rank, 2)) for rank in (0, 1)]
    alone = list(StepBatchSampler(num_samples, 2 * batch, 3, 0, steps))
    assert [a + b for a, b in zip(*per_process)] == alone
    epochs = [sum(alone[e * 2:(e + 1) * 2], []) for e in range(3)]
    assert all(sorted(order) == list(range(num_samples)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3, epochs


def test_default_config_is_the_release_objective():
    """SPEC 3: w ~ U[5, 15], m = 0.05 with the release's g(t), pseudo-Huber with c = 0.001, the
    online student as its own target, reward weights 0.2 and 0.5 * 2/6, grad norm clipped at 1.0,
    lr 1e-5, temporal-conv dropout 0.1."""
    cfg = TrainConfig()
    assert (cfg.w_min, cfg.w_max, cfg.motion_strength, cfg.motion_form) == (5.0, 15.0, 0.05, "release")
    assert (cfg.loss, cfg.huber_c, cfg.ema_decay) == ("huber", 1e-3, None)
    assert cfg.image_reward_weight == 0.2 and cfg.video_reward_weight == pytest.approx(1 / 6, rel=1e-12)
    assert (cfg.grad_clip, cfg.lr, cfg.temporal_conv_dropout) == (1.0, 1e-5, 0.1)


def test_loss_decreases_on_a_fixed_batch(assets, tmp_path):
    cache = write_cache(tmp_path / "cache2", num_samples=2, seed=5)
    cfg = config(
        assets, tmp_path / "fit", cache=str(cache), max_steps=15, lr=3e-3, w_min=7.5, w_max=7.5,
        temporal_conv_dropout=0.0,
    )
    losses = train(cfg).losses
    # The random teacher targets leave a floor near 0.37 (from 0.55); a wrong sign or a dead update stays above 0.9x.
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


class LatentPreview(torch.nn.Module):
    """A stand-in VAE: the first three latent channels of the selected frames, squashed to [-1, 1]."""

    def decode(self, latents, decode_chunk_size=8, frame_indices=None):
        frames = latents[:, :3] if frame_indices is None else latents[:, :3, list(frame_indices)]
        return torch.tanh(frames)


class ToyReward:
    """Mean brightness as the reward, times `weight`; NaN from call `nan_at` on."""

    def __init__(self, weight=0.1, nan_at=None):
        self.calls, self.weight, self.nan_at = 0, weight, nan_at

    def select_frames(self, num_frames, generator):
        return [int(torch.randint(num_frames, (1,), generator=generator))]

    def __call__(self, frames, frame_indices, captions, short_captions):
        self.calls += 1
        assert frames.shape[2] == len(frame_indices) and 0 <= frames.min() and frames.max() <= 1
        assert len(captions) == len(short_captions) == frames.shape[0]
        brightness = frames.mean(dim=(1, 2, 3, 4))
        if self.nan_at is not None and self.calls >= self.nan_at:
            brightness = brightness * float("nan")
        return self.weight * brightness.mean(), {"brightness": brightness}


def test_reward_path_changes_the_update(assets, tmp_path):
    plain = train(config(assets, tmp_path / "plain", max_steps=1))
    rewarded = train(config(assets, tmp_path / "reward", max_steps=1), reward=ToyReward(100.0), vae=LatentPreview())
    row = rewarded.history[0]
    assert row["loss"] == pytest.approx(row["loss_cd"] - row["reward_total"], rel=1e-6)
    assert row["loss_cd"] == pytest.approx(plain.history[0]["loss_cd"], rel=1e-6)
    assert row["reward_total"] == pytest.approx(100.0 * row["reward_brightness"], rel=1e-5)
    # The reward's gradient reaches the student through the decoded frames.
    assert row["grad_norm"] != pytest.approx(plain.history[0]["grad_norm"], rel=0.05)
    assert "reward_brightness" in (tmp_path / "reward" / "metrics.csv").read_text().splitlines()[0]


class RecordingReward(ToyReward):
    """ToyReward that keeps what each call was handed."""

    def __init__(self):
        super().__init__(weight=1.0)
        self.seen = []

    def __call__(self, frames, frame_indices, captions, short_captions):
        self.seen.append((frames.detach().clone(), list(frame_indices), list(captions), list(short_captions)))
        return super().__call__(frames, frame_indices, captions, short_captions)


class RecordingPreview(LatentPreview):
    """LatentPreview that keeps what it decoded."""

    def __init__(self):
        super().__init__()
        self.decoded = []

    def decode(self, latents, decode_chunk_size=8, frame_indices=None):
        out = super().decode(latents, decode_chunk_size, frame_indices)
        self.decoded.append((out.detach().clone(), list(frame_indices)))
        return out


def test_the_reward_scores_the_decoded_frames_in_0_1_with_each_caption_in_its_place(assets, tmp_path):
    """SPEC 5: the reward gets the VAE's decoded frames as x / 2 + 0.5 clamped to [0, 1], of the
    frames select_frames drew, with the clips' dense captions as `captions` and their short ones
    as `short_captions` (ToyReward reads neither, so swapping them went unseen)."""
    cache = write_cache(tmp_path / "cache", short_captions=True)
    reward, vae = RecordingReward(), RecordingPreview()
    train(config(assets, tmp_path / "run", cache=str(cache), max_steps=2), reward=reward, vae=vae)
    assert len(reward.seen) == len(vae.decoded) == 2
    for (frames, indices, captions, shorts), (decoded, decoded_indices) in zip(reward.seen, vae.decoded):
        assert indices == decoded_indices and frames.shape[2] == len(indices)
        assert decoded.min() < 0, "the stand-in decodes to [-1, 1], so the mapping to [0, 1] shows"
        torch.testing.assert_close(frames, (decoded / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-7)
        assert all(c.startswith("clip ") for c in captions) and all(t.startswith("short ") for t in shorts)
        assert [c.split()[-1] for c in captions] == [t.split()[-1] for t in shorts]


def test_each_step_draws_its_own_reward_frames(assets, tmp_path):
    """SPEC 5: the frames scored are drawn anew every step, from a generator seeded by (seed, step)
    (so a resumed run draws what the straight run drew), not the same frames all run long."""
    class DrawRecordingReward(ToyReward):
        def __init__(self):
            super().__init__()
            self.draws = []

        def select_frames(self, num_frames, generator):
            self.draws.append(int(torch.randint(2**31, (1,), generator=generator)))
            return [0]

    straight, first_two, resumed = DrawRecordingReward(), DrawRecordingReward(), DrawRecordingReward()
    train(config(assets, tmp_path / "straight", max_steps=3), reward=straight, vae=LatentPreview())
    train(config(assets, tmp_path / "killed", max_steps=2, checkpoint_every=1), reward=first_two, vae=LatentPreview())
    train(config(assets, tmp_path / "killed", max_steps=3, checkpoint_every=1, resume="latest"), reward=resumed,
          vae=LatentPreview())
    assert len(set(straight.draws)) == 3, straight.draws
    assert first_two.draws + resumed.draws == straight.draws


def test_lr_warms_up_linearly_from_the_first_step(assets, tmp_path, monkeypatch):
    """lr_warmup_steps = 4: the optimizer steps with lr * 1/4, 2/4, 3/4, then lr (the first
    update already moves; an off-by-one would make it a step with lr 0)."""
    used = []
    step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(config(assets, tmp_path / "run", max_steps=5, lr=1e-3, lr_warmup_steps=4))
    assert used == pytest.approx([1e-3 * k for k in (0.25, 0.5, 0.75, 1.0, 1.0)], rel=1e-12)


def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_state(assets, tmp_path):
    cfg = config(assets, tmp_path / "nan", max_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite loss term .*reward_total=nan") as caught:
        train(cfg, reward=ToyReward(nan_at=3), vae=LatentPreview())
    assert "checkpoint-000002" in str(caught.value)
    good = train(config(assets, tmp_path / "good", max_steps=2), reward=ToyReward(), vae=LatentPreview())
    saved = load_file(str(tmp_path / "nan" / "checkpoint-000002" / "model.safetensors"))
    final = load_file(str(good.student_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], final[k]) for k in final)


@pytest.mark.gpu
def test_a_step_waits_on_the_gpu_only_to_read_its_metrics(assets, tmp_path, monkeypatch):
    """With the ops' value checks off (TURBO_KERNELS_VALIDATE=0), nothing in a step after the
    first (whose one-time work may wait) synchronises with the GPU but the one read of its
    metrics: torch's sync debug mode raises at any other."""
    monkeypatch.setenv("TURBO_KERNELS_VALIDATE", "0")
    read = train_module._Trainer._read_metrics
    reads, steps = [], []

    def read_allowed(reduced):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(read(reduced))
            return reads[-1]
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    def step_in_error_mode(self, batch):
        torch.cuda.set_sync_debug_mode("error" if self.step > 0 else 0)
        try:
            steps.append(step(self, batch))
            return steps[-1]
        finally:
            torch.cuda.set_sync_debug_mode(0)

    step = train_module._Trainer.train_step
    monkeypatch.setattr(train_module._Trainer, "_read_metrics", staticmethod(read_allowed))
    monkeypatch.setattr(train_module._Trainer, "train_step", step_in_error_mode)
    train(config(assets, tmp_path / "run", max_steps=2, kernels="on"))
    assert len(reads) == len(steps) == 2


def test_nan_stop_checkpoint_holds_the_rng_from_before_the_failed_step(assets, tmp_path):
    # Dropout (0.1) draws from the global RNG in every step, the failed one included.
    with pytest.raises(NonFiniteLossError):
        train(config(assets, tmp_path / "nan", max_steps=4), reward=ToyReward(nan_at=3), vae=LatentPreview())
    train(config(assets, tmp_path / "good", max_steps=2, checkpoint_every=2), reward=ToyReward(), vae=LatentPreview())
    saved = load_file(str(tmp_path / "nan" / "checkpoint-000002" / "rng-p0.safetensors"))
    good = load_file(str(tmp_path / "good" / "checkpoint-000002" / "rng-p0.safetensors"))
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in good)
    straight = train(config(assets, tmp_path / "straight", max_steps=3), reward=ToyReward(), vae=LatentPreview())
    resumed = train(
        config(assets, tmp_path / "nan", max_steps=3, resume="latest"), reward=ToyReward(), vae=LatentPreview()
    )
    assert resumed.losses == straight.losses[2:]


def test_fps_comes_from_the_cache_config(assets, tmp_path, monkeypatch):
    cache = write_cache(tmp_path / "cache", producing_config={"fps": 4, "num_frames": 2})
    seen = []
    original = adapter.NoisePredictor.__call__

    def recording(self, x, t, context, fps=8, guidance=None, motion=None):
        seen.append(fps)
        return original(self, x, t, context, fps, guidance=guidance, motion=motion)

    monkeypatch.setattr(adapter.NoisePredictor, "__call__", recording)
    train(config(assets, tmp_path / "run", cache=str(cache), max_steps=1))
    assert seen == [4, 4]  # the student and its self-target


def test_a_preset_cache_refuses_another_teacher(assets, tmp_path):
    cache = write_cache(tmp_path / "cache", producing_config={"preset": "tiny", "seed": 7, "model": None})
    with pytest.raises(ValueError, match="random 'tiny' preset teacher with seed 7"):
        train(config(assets, tmp_path / "run", cache=str(cache), max_steps=1))
    produced = {"preset": "tiny", "seed": 7}
    train_module.check_cache_teacher(produced, TrainConfig(preset="tiny", seed=7))
    with pytest.raises(ValueError, match="set teacher=None, preset='tiny' and seed=7"):
        train_module.check_cache_teacher(produced, TrainConfig(preset="tiny", seed=8))
    train_module.check_cache_teacher({**produced, "models_handed_in": True}, TrainConfig(seed=8))
    train_module.check_cache_teacher({}, TrainConfig(seed=8))  # an older cache without these fields


def test_a_model_directory_cache_needs_its_teacher(tmp_path, caplog):
    produced = {"model": "runs/model", "preset": None, "seed": 0}
    with pytest.raises(ValueError, match=r"made by the teacher in runs/model: set teacher=runs/model/unet"):
        train_module.check_cache_teacher(produced, TrainConfig(cache="runs/cache"))
    (tmp_path / "runs" / "model" / "unet").mkdir(parents=True)
    with caplog.at_level("WARNING", logger=train_module.__name__):
        train_module.check_cache_teacher(produced, TrainConfig(teacher=str(tmp_path / "runs" / "model" / "unet")))
        assert not caplog.records
        train_module.check_cache_teacher(produced, TrainConfig(teacher=str(tmp_path / "other" / "unet")))
    assert "unless that is a copy of it" in caplog.text
    train_module.check_cache_teacher({**produced, "models_handed_in": True}, TrainConfig())


def test_a_cache_built_from_other_data_is_refused(assets, tmp_path):
    cache = write_cache(tmp_path / "cache", producing_config={"data": "videos/manifest.csv"})
    with pytest.raises(ValueError, match="built from data 'videos/manifest.csv', not from data='synthetic'"):
        train(config(assets, tmp_path / "run", cache=str(cache), max_steps=1, data="synthetic"))
    check = train_module.check_cache_data
    check({"data": "videos/manifest.csv"}, TrainConfig(data=None))  # data not named: not checked
    check({"data": "videos/manifest.csv"}, TrainConfig(data=str(Path("videos/manifest.csv").resolve())))
    check({}, TrainConfig(data="synthetic"))  # a cache that does not record its data
    # A relative path was recorded where preprocess ran: any path ending in it is the same data.
    check({"data": "./videos/manifest.csv"}, TrainConfig(data="/elsewhere/videos/manifest.csv"))
    with pytest.raises(ValueError, match="built from data"):
        check({"data": "videos/manifest.csv"}, TrainConfig(data="/elsewhere/other/manifest.csv"))
    with pytest.raises(ValueError, match="built from data 'synthetic'"):
        check({"data": "synthetic"}, TrainConfig(data="videos"))
    # A directory and the manifest it is read through are one source, either way round; a directory
    # read through manifest.csv is not the same data as its manifest.jsonl.
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "manifest.csv").write_text("path,caption\n")
    (videos / "manifest.jsonl").write_text("")
    check({"data": str(videos)}, TrainConfig(data=str(videos / "manifest.csv")))
    check({"data": str(videos / "manifest.csv")}, TrainConfig(data=str(videos)))
    with pytest.raises(ValueError, match="built from data"):
        check({"data": str(videos)}, TrainConfig(data=str(videos / "manifest.jsonl")))
    with pytest.raises(ValueError, match="built from data"):
        check({"data": str(videos / "manifest.jsonl")}, TrainConfig(data=str(videos)))


def test_train_command_reports_unusable_settings(assets, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    cache = write_cache(tmp_path / "cache", producing_config={"data": "synthetic"})
    overrides = [f"teacher={assets['teacher']}", "kernels=off", "progress=false", "checkpoint_every=0", "max_steps=1"]
    run = ["train", "--cache", str(cache), "--output-dir", str(tmp_path / "run")]
    args = parser.parse_args([*run, "--resume", str(tmp_path / "no-checkpoint"), *overrides])
    assert args.handler(args) == 2
    assert "no-checkpoint" in capsys.readouterr().err
    args = parser.parse_args([*run, "--data", str(tmp_path / "other-videos"), *overrides])
    assert args.handler(args) == 2
    assert "built from data 'synthetic'" in capsys.readouterr().err
    # A teacher directory that is not there is named as such (not as a cache from another teacher).
    preset_cache = write_cache(tmp_path / "preset-cache", producing_config={"preset": "tiny", "seed": 0})
    args = parser.parse_args(["train", "--cache", str(preset_cache), "--output-dir", str(tmp_path / "run2"),
                              f"teacher={tmp_path / 'absent'}", *overrides[1:]])
    assert args.handler(args) == 2
    assert f"teacher: no UNet directory at {tmp_path / 'absent'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([*run, "--max-steps", "0"])
    assert "argument --max-steps: must be a positive integer, got 0" in capsys.readouterr().err


def test_runs_neither_mix_with_nor_roll_back_an_earlier_run(assets, tmp_path):
    """A fresh run refuses a folder holding another run's checkpoints (keep_last would delete its
    own first), and resuming below the checkpoint's step would rewrite the finished student with
    an earlier state: both stop before anything is written. What a run writes is readable as the
    umask allows."""
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        train(config(assets, out, max_steps=2, checkpoint_every=2))
    finally:
        os.umask(previous)
    for written in (out / "checkpoint-000002" / "model.safetensors", out / "student" / "model.safetensors"):
        assert written.stat().st_mode & 0o777 == 0o644, written
    student = (out / "student" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*checkpoint-000002.*--resume latest"):
        prepare_training(config(assets, out, max_steps=4))
    with pytest.raises(ValueError, match="checkpoint-000002 is at step 2, beyond max_steps=1"):
        train(config(assets, out, max_steps=1, resume="latest"))
    assert [p.name for p in train_module.checkpoint_dirs(out)] == ["checkpoint-000002"]
    assert (out / "student" / "model.safetensors").read_bytes() == student
    # A checkpoint damaged after it was written (they are written atomically), and a file in the
    # output directory's place, end with a ValueError the command reports, not a traceback.
    (out / "checkpoint-000002" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="checkpoint-000002 is unreadable .*--resume PATH"):
        train(config(assets, out, max_steps=4, resume="latest"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="a-file is a file, not a directory"):
        prepare_training(config(assets, tmp_path / "a-file", max_steps=1))
    with pytest.raises(ValueError, match="a-file is a file, so .*a-file/run cannot be created"):
        prepare_training(config(assets, tmp_path / "a-file" / "run", max_steps=1))


def test_a_run_without_checkpoints_is_not_overwritten(assets, tmp_path):
    """A finished run that wrote no checkpoint leaves its student and metrics: a fresh run there is
    refused, and --resume latest (no checkpoint to load) too while the student is there; a run
    killed before its first checkpoint (metrics only) starts over under --resume latest."""
    out = tmp_path / "run"
    train(config(assets, out, max_steps=1, checkpoint_every=0))
    student = (out / "student" / "model.safetensors").read_bytes()
    metrics = (out / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match="holds an earlier run's student and metrics.csv and no checkpoint"):
        prepare_training(config(assets, out, max_steps=1, checkpoint_every=0))
    with pytest.raises(ValueError, match="holds an earlier run's student and no checkpoint"):
        prepare_training(config(assets, out, max_steps=1, checkpoint_every=0, resume="latest"))
    assert (out / "student" / "model.safetensors").read_bytes() == student
    assert (out / "metrics.csv").read_bytes() == metrics
    shutil.rmtree(out / "student")
    with pytest.raises(ValueError, match="holds an earlier run's metrics.csv and no checkpoint"):
        prepare_training(config(assets, out, max_steps=1, checkpoint_every=0))
    prepare_training(config(assets, out, max_steps=1, checkpoint_every=0, resume="latest"))

def test_train_command_reports_a_cache_without_a_global_batch(assets, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    empty = tmp_path / "empty"
    with CacheWriter(empty, shard_size=3, dtype=torch.float16, config=None):
        pass  # a preprocess run stopped before its first shard
    overrides = [f"teacher={assets['teacher']}", "kernels=off", "progress=false", "checkpoint_every=0", "max_steps=1"]
    for cache, batch_size, message in (
        (empty, 2, "holds no samples"),
        (write_cache(tmp_path / "small", num_samples=3), 4, "holds 3 samples, fewer than one global batch"),
    ):
        args = parser.parse_args([
            "train", "--cache", str(cache), "--output-dir", str(tmp_path / f"run-{cache.name}"), *overrides,
            f"batch_size={batch_size}",
        ])
        assert args.handler(args) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("kind, message", [("FSDP", "FSDP version 1"), ("DEEPSPEED", "DEEPSPEED")])
def test_unsupported_sharding_stops_before_training(assets, tmp_path, monkeypatch, kind, message):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[kind]))
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: False))
    with pytest.raises(NotImplementedError, match="does not support " + message):
        train(config(assets, tmp_path / "run", max_steps=1))
    assert not (tmp_path / "run").exists()


def test_student_draws_come_from_the_seed_on_the_cpu_generator_alone(monkeypatch):
    """Every process builds the same student and adapters; only the CPU generator is seeded, so each
    process's own (GPU) draws, such as dropout, stay its own."""

    def reseeds_every_device(seed):
        raise AssertionError("torch.manual_seed reseeds every GPU's generator too")

    monkeypatch.setattr(torch, "manual_seed", reseeds_every_device)
    cfg = TrainConfig(preset="tiny", seed=5, lora_rank=2)
    before = torch.random.get_rng_state()
    first, second = (train_module.apply_lora(train_module.build_student(cfg), 2, cfg.seed) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_fsdp2_is_accepted_with_block_units_and_refused_with_size_based_units():
    import functools
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    def accelerator(kind, policy=None):
        plugin = SimpleNamespace(auto_wrap_policy=policy)
        return SimpleNamespace(distributed_type=kind, is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin))

    assert train_module.check_distribution(accelerator(DistributedType.MULTI_GPU)) is False
    assert train_module.check_distribution(accelerator(DistributedType.FSDP, transformer_auto_wrap_policy)) is True
    assert train_module.check_distribution(accelerator(DistributedType.FSDP, None)) is True
    size_based = functools.partial(size_based_auto_wrap_policy, min_num_params=100)
    with pytest.raises(ValueError, match="SIZE_BASED_WRAP"):
        train_module.check_distribution(accelerator(DistributedType.FSDP, size_based))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate reads its launch settings once a process, into a shared state: reset around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_float32_master_weights_close_to_float32(assets, tmp_path):
    """mixed_precision="bf16": autocast over float32 weights, which stay float32 in the optimizer
    and the saved student; losses and gradient norms within bf16's reach of the float32 run. The
    clips have 4 latent frames: on CPU, torch 2.14's bf16 Conv3d weight gradient came out NaN for
    2-frame clips through the (3, 1, 1) temporal kernels (a oneDNN fault)."""
    from accelerate.state import AcceleratorState

    cache = str(write_cache(tmp_path / "cache", latent=(4, 4, 4, 4)))
    runs = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            runs[precision] = train(config(assets, tmp_path / precision, cache=cache, max_steps=3,
                                           mixed_precision=precision, temporal_conv_dropout=0.0, checkpoint_every=3))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    full, mixed = runs["no"], runs["bf16"]
    assert mixed.losses == pytest.approx(full.losses, rel=1e-2)
    for mine, theirs in zip(mixed.history, full.history):
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=5e-2)
    assert {p.dtype for p in from_pretrained(mixed.student_dir).parameters()} == {torch.float32}
    optimizer = torch.load(tmp_path / "bf16" / "checkpoint-000003" / "optimizer.pt", weights_only=True)
    assert {v.dtype for state in optimizer["state"].values() for v in state.values() if v.dim()} == {torch.float32}


def test_accelerate_dynamo_backend_compiles_the_student(assets, tmp_path, monkeypatch, fresh_accelerate_state):
    """`accelerate launch --dynamo_backend ...` compiles the student in prepare: the step runs the
    compiled model, the self-target and the saved student the bare one (aot_eager: no codegen)."""
    eager = train(config(assets, tmp_path / "eager", temporal_conv_dropout=0.0, cpu=True))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    trainer = prepare_training(config(assets, tmp_path / "compiled", temporal_conv_dropout=0.0, cpu=True))
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(trainer.target_network, torch._dynamo.eval_frame.OptimizedModule)
    compiled = trainer.run()
    assert [row["loss"] for row in compiled.history] == pytest.approx([row["loss"] for row in eager.history], rel=1e-6)
    saved = load_file(str(compiled.student_dir / "model.safetensors"))
    assert set(saved) == set(load_file(str(eager.student_dir / "model.safetensors")))


def test_mixed_precision_defaults_to_accelerates_setting(assets, tmp_path, monkeypatch, fresh_accelerate_state):
    """`accelerate launch --mixed_precision bf16` (or `accelerate config`) sets the precision when
    the config leaves it null; a value in the config wins."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert prepare_training(config(assets, tmp_path / "launched", cpu=True)).accelerator.mixed_precision == "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)
    chosen = config(assets, tmp_path / "configured", cpu=True, mixed_precision="no")
    assert prepare_training(chosen).accelerator.mixed_precision == "no"
    assert TrainConfig.from_dict({"mixed_precision": False}).mixed_precision == "no"  # YAML 1.1's `no`


def test_fp16_without_a_gpu_is_refused(assets, tmp_path, fresh_accelerate_state):
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a GPU: on cpu accelerate runs neither"):
        prepare_training(config(assets, tmp_path / "run", cpu=True, mixed_precision="fp16"))


def _fp16_accelerator(init_scale: float):
    """fp16 with a loss scaler on the CPU, where accelerate gives none: as it sets up a GPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return accelerator


def test_fp16_overflows_skip_the_update_and_the_scaler_resumes(assets, tmp_path, fresh_accelerate_state):
    """With fp16's loss scaler a non-finite gradient is an overflow, not an error: the update, the
    schedule and the EMA skip the step and the scale halves. Found by hand: from 2.5e5, steps 1
    and 3 overflow. The scaler's state is checkpointed (at the last step too), so a run of 2
    steps continued to 3 halves the scale it ended with, as the straight run does."""
    runs = {}
    for name, steps, resume in (("straight", 3, None), ("split", 2, None), ("split", 3, "latest")):
        runs[name] = train(config(assets, tmp_path / name, max_steps=steps, checkpoint_every=5, ema_decay=0.5,
                                  lr_warmup_steps=10, resume=resume), accelerator=_fp16_accelerator(2.5e5))
    straight = runs["straight"].history
    assert [row["loss_scale"] for row in straight] == [1.25e5, 1.25e5, 6.25e4]
    assert [math.isfinite(row["grad_norm"]) for row in straight] == [False, True, False]
    # The warmup's learning rate moves on with the one update only.
    rates = [row["lr"] for row in straight]
    assert rates[0] < rates[1] == rates[2]
    assert [row["loss_scale"] for row in runs["split"].history] == [6.25e4]
    first = load_file(str(tmp_path / "split" / "checkpoint-000002" / "model.safetensors"))
    for run in ("straight", "split"):
        last = load_file(str(tmp_path / run / "checkpoint-000003" / "model.safetensors"))
        assert all(torch.equal(first[k], last[k]) for k in first), "a skipped step changed the weights"
        ema = load_file(str(tmp_path / run / "checkpoint-000003" / "ema.safetensors"))
        ema_before = load_file(str(tmp_path / "split" / "checkpoint-000002" / "ema.safetensors"))
        assert all(torch.equal(ema_before[k], ema[k]) for k in ema), "a skipped step moved the EMA"
    state = json.loads((tmp_path / "split" / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 6.25e4


def test_fp16_stops_when_the_loss_scale_cannot_help(assets, tmp_path, fresh_accelerate_state):
    """A gradient that is NaN whatever the scale: steps are skipped while the scale halves, down
    to 2^-24, and the step that takes it below stops the run."""
    trainer = prepare_training(config(assets, tmp_path / "run", max_steps=5), accelerator=_fp16_accelerator(2.0**-23))
    next(trainer.model.parameters()).register_hook(lambda grad: grad * math.nan)
    with pytest.raises(NonFiniteLossError, match="step 2: non-finite gradient grad_norm=nan with the fp16 loss scale "
                                                 "down to 2.98023e-08"):
        trainer.run()


def test_a_finished_run_checkpoints_its_last_step_and_continues_exactly(assets, tmp_path):
    straight = train(config(assets, tmp_path / "straight", max_steps=3, checkpoint_every=2))
    first = train(config(assets, tmp_path / "extended", max_steps=1, checkpoint_every=2))
    assert first.last_checkpoint.name == "checkpoint-000001"
    extended = train(config(assets, tmp_path / "extended", max_steps=3, checkpoint_every=2, resume="latest"))
    assert first.losses + extended.losses == straight.losses
    names = [path.name for path in train_module.checkpoint_dirs(tmp_path / "extended")]
    assert names == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]
    assert train(config(assets, tmp_path / "none", max_steps=1, checkpoint_every=0)).last_checkpoint is None
    # Resuming a finished run with no step left writes (and so prunes) nothing.
    before = [path.name for path in train_module.checkpoint_dirs(tmp_path / "extended")]
    train(config(assets, tmp_path / "extended", max_steps=3, checkpoint_every=2, keep_last=1, resume="latest"))
    assert [path.name for path in train_module.checkpoint_dirs(tmp_path / "extended")] == before


def test_training_solver_uses_the_release_table():
    assert motion_module.release_alphas_cumprod is schedule.release_alphas_cumprod
    release = schedule.release_alphas_cumprod(torch.float64)
    # The float32-built table, within float32 rounding of the float64 maths.
    assert 0 < float((release - schedule.alphas_cumprod(torch.float64)).abs().max()) < 1e-6


def test_8bit_adam_without_cuda_warns_once(caplog):
    train_module._warn_once.cache_clear()
    cfg = TrainConfig(use_8bit_adam=True)
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    with caplog.at_level("WARNING", logger="t2v_turbo.train"):
        first = train_module._make_optimizer(parameters, cfg, torch.device("cpu"))
        train_module._make_optimizer(parameters, cfg, torch.device("cpu"))
    assert isinstance(first, torch.optim.AdamW)
    assert [r.getMessage() for r in caplog.records].count(
        "use_8bit_adam is set but the device is cpu, not CUDA: using torch.optim.AdamW"
    ) == 1


def test_lora_trains_adapters_and_saves_a_merged_student(assets, tmp_path):
    result = train(config(assets, tmp_path / "lora", max_steps=2, checkpoint_every=2, lora_rank=4, lr=1e-3))
    adapter = load_file(str(tmp_path / "lora" / "checkpoint-000002" / "adapter.safetensors"))
    assert any("lora_A" in key for key in adapter) and any("time_cond_proj" in key for key in adapter)
    assert not any("in_layers" in key for key in adapter)
    student, teacher = from_pretrained(result.student_dir), from_pretrained(assets["teacher"])
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, teacher.state_dict()[k])}
    assert any("to_q" in k for k in changed) and not any("in_layers" in k for k in changed)


def test_config_files_overrides_and_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 1e-5\nkernels: off\nema_decay: null\nmax_steps: 7\n")
    cfg = TrainConfig.load(tmp_path / "a.yaml", ["max_steps=9", "ema_decay=0.95", "loss=l2"])
    assert (cfg.lr, cfg.kernels, cfg.max_steps, cfg.ema_decay, cfg.loss) == (1e-5, "off", 9, 0.95, "l2")
    (tmp_path / "b.toml").write_text('preset = "vc2"\nw_min = 6\n')
    cfg = TrainConfig.load(tmp_path / "b.toml")
    assert cfg.preset == "vc2" and cfg.w_min == 6.0 and cfg.video_reward_weight == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.load(overrides=["learning_rate=1"])
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="max_steps must be an integer"):
        TrainConfig.load(overrides=["max_steps=many"])
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed must lie in"):
            TrainConfig.load(None, [f"seed={seed}"])
    with pytest.raises(ValueError, match="w_min must be <= w_max"):
        TrainConfig(w_min=9, w_max=5)
    # An infinite learning rate turned every weight into NaN at the first step (and the checkpoint
    # of "the last good state" with it); an infinite Huber c failed inside the loss.
    for override, name in (("lr=.inf", "lr"), ("huber_c=1e400", "huber_c"), ("w_max=.nan", "w_max")):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            TrainConfig.load(overrides=[override])
    with pytest.raises(ValueError, match="batch_size must be an integer, got True"):
        TrainConfig.load(overrides=["batch_size=true"])  # YAML's true, which int() took as 1
    (tmp_path / "broken.yaml").write_text("lr: [\n")
    (tmp_path / "broken.toml").write_text("lr = \n")
    for name in ("broken.yaml", "broken.toml"):
        with pytest.raises(ValueError, match=f"config file {tmp_path / name} does not parse"):
            TrainConfig.load(tmp_path / name)
    with pytest.raises(ValueError, match=r"override 'lr=\[1': the value does not parse as YAML"):
        TrainConfig.load(overrides=["lr=[1"])


def test_train_command_points_to_a_preprocess_command_that_parses(tmp_path, capsys):
    """The command it suggests names the teacher that preprocess needs (--model or --preset) and
    the run's data and cache, quoted for the shell."""
    from t2v_turbo.cli import build_parser

    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "pipeline.json").write_text("{}")
    cache = str(tmp_path / "no cache")

    def suggested(*argv: str) -> tuple[argparse.Namespace, str]:
        parser = argparse.ArgumentParser()
        add_train_command(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["train", "--cache", cache, "--max-steps", "3", *argv])
        assert args.handler(args) == 2
        error = capsys.readouterr().err
        command = shlex.split(re.search(r"`(t2v-turbo preprocess [^`]*)`", error).group(1))
        return build_parser("preprocess").parse_args(command[1:]), error

    args, _ = suggested("--preset", "vc2", "--seed", "3")
    assert (args.preset, args.model, args.seed, args.data, args.cache) == ("vc2", None, 3, "synthetic", cache)
    # The random tiny teacher at the README's small clips, not preprocess's 1024 of 16x320x512.
    args, _ = suggested("--preset", "tiny")
    assert (args.preset, args.frames, args.height, args.width, args.limit) == ("tiny", 8, 32, 32, 64)
    args, _ = suggested("--data", "videos.csv", f"teacher={tmp_path / 'model' / 'unet'}")
    assert (args.preset, args.model, args.data, args.cache) == (None, str(tmp_path / "model"), "videos.csv", cache)
    # A teacher outside a model directory: preprocess also needs its VAE and text encoder.
    args, error = suggested(f"teacher={tmp_path / 'model'}")
    assert args.model == "MODEL_DIR"
    assert f"MODEL_DIR: the model directory, with its VAE and text encoder, of the teacher {tmp_path / 'model'}" in error


def test_train_command_resuming_a_finished_run_says_there_is_nothing_to_train(assets, tmp_path, capsys):
    train(config(assets, tmp_path / "run", max_steps=1, checkpoint_every=5))
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "train", "--cache", assets["cache"], "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--resume",
        "latest", "--no-progress", f"teacher={assets['teacher']}", "kernels=off", "batch_size=2", "seed=3",
    ])
    assert args.handler(args) == 0
    assert "nothing to train: the resumed run is already at step 1 (max_steps)" in capsys.readouterr().out


def test_ctrl_c_in_train_ends_with_a_line_not_a_traceback(assets, tmp_path, capsys, monkeypatch):
    def interrupted(trainer, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module._Trainer, "train_step", interrupted)
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "train", "--cache", assets["cache"], "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
        "--no-progress", f"teacher={assets['teacher']}", "kernels=off", "batch_size=2",
    ])
    assert args.handler(args) == 130
    assert "interrupted at step 0; --resume latest continues" in capsys.readouterr().err


# A large Adam epsilon makes each update nearly proportional to the gradient, so the comparison
# sees the gradient's scale (a sum instead of a mean across processes would show) and is not
# dominated by parameters whose gradient is ~0 (where lr·g/(|g| + eps) amplifies rounding).
OPTIMIZER = dict(lr=1e-2, adam_epsilon=1.0)
DDP_SCRIPT = textwrap.dedent(
    f"""
    import sys, torch
    torch.set_num_threads(1)
    from t2v_turbo.train import TrainConfig, train
    teacher, cache, out = sys.argv[1:4]
    OPTIMIZER = {OPTIMIZER!r}
    from accelerate import PartialState
    assert PartialState(cpu=True).num_processes == 2
    train(TrainConfig(teacher=teacher, cache=cache, output_dir=out, max_steps=2, batch_size=1, kernels="off",
                      progress=False, seed=3, temporal_conv_dropout=0.0, checkpoint_every=0, cpu=True, **OPTIMIZER))
    """
)


def _assert_same_update(start, one, two, path) -> None:
    """Two students trained from `start` moved their weights alike (up to the reduction order):
    within 1e-4 of the largest update, or of 4 float32 roundings of the tensor's weights, which
    bound how exactly an update can be read back from float32 weights (a LoRA weight of 0.1
    updated by 5e-7 has been seen to differ by 1.5e-8 between the process layouts)."""
    largest = max(float((one[key] - start[key]).abs().max()) for key in one)
    assert largest > 1e-4
    assert set(two) == set(one)
    for key in one:
        resolution = 4 * torch.finfo(torch.float32).eps * float(start[key].abs().max())
        torch.testing.assert_close(two[key] - start[key], one[key] - start[key], rtol=1e-3,
                                   atol=max(1e-4 * largest, resolution), msg=lambda text: f"{path} {key}: {text}")


FSDP_SCRIPT = textwrap.dedent(
    f"""
    import shutil, sys, torch
    torch.set_num_threads(1)
    from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType
    from t2v_turbo.train import TrainConfig, train
    teacher, cache, out = sys.argv[1:4]
    OPTIMIZER = {OPTIMIZER!r}
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    # accelerate turns FSDP on only for GPU-like devices, while FSDP2 itself shards CPU processes
    # over gloo: the plugin is set here as `accelerate config` would set it on GPUs. One unit a
    # UNet block (VC2UNet._no_split_modules), so the small UNet is split into many shards.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False,
    )
    common = dict(teacher=teacher, cache=cache, batch_size=1, max_steps=2, kernels="off", progress=False, seed=3,
                  temporal_conv_dropout=0.0, cpu=True, **OPTIMIZER)
    train(TrainConfig(output_dir=out + "/full", checkpoint_every=1, **common), accelerator=accelerator)
    if accelerator.is_main_process:
        shutil.copytree(out + "/full/checkpoint-000001", out + "/resumed/checkpoint-000001")
    # Between two trainings, as accelerate asks: it forgets the previous run's model and optimizer.
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    train(TrainConfig(output_dir=out + "/resumed", resume="latest", checkpoint_every=0, **common), accelerator=accelerator)
    accelerator.free_memory()
    train(TrainConfig(output_dir=out + "/lora", lora_rank=4, checkpoint_every=1, **common), accelerator=accelerator)
    if accelerator.is_main_process:
        shutil.copytree(out + "/lora/checkpoint-000001", out + "/lora-resumed/checkpoint-000001")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    train(TrainConfig(output_dir=out + "/lora-resumed", lora_rank=4, resume="latest", checkpoint_every=0, **common),
          accelerator=accelerator)
    """
)


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process_and_resumes(assets, tmp_path):
    options = dict(batch_size=2, temporal_conv_dropout=0.0, cpu=True, **OPTIMIZER)
    single = train(config(assets, tmp_path / "single", **options))
    single_lora = train(config(assets, tmp_path / "single-lora", lora_rank=4, **options))
    torchrun(FSDP_SCRIPT, tmp_path, assets["teacher"], assets["cache"], str(tmp_path / "fsdp"))

    rows = [line.split(",") for line in (tmp_path / "fsdp" / "full" / "metrics.csv").read_text().splitlines()]
    sharded = [dict(zip(rows[0], row)) for row in rows[1:]]
    for mine, theirs in zip(single.history, sharded, strict=True):
        assert float(theirs["loss"]) == pytest.approx(mine["loss"], rel=1e-5)
        assert float(theirs["grad_norm"]) == pytest.approx(mine["grad_norm"], rel=1e-4)
    start = load_file(str(Path(assets["teacher"]) / "model.safetensors"))
    students = {
        name: load_file(str(tmp_path / "fsdp" / name / "student" / "model.safetensors"))
        for name in ("full", "resumed", "lora", "lora-resumed")
    }
    _assert_same_update(start, load_file(str(single.student_dir / "model.safetensors")), students["full"], "full")
    # Resuming the gathered checkpoint (weights and optimizer state re-sharded) continues exactly.
    for key, value in students["full"].items():
        assert torch.equal(students["resumed"][key], value), key
    _assert_same_update(start, load_file(str(single_lora.student_dir / "model.safetensors")), students["lora"], "lora")
    for key, value in students["lora"].items():
        assert torch.equal(students["lora-resumed"][key], value), key
    checkpoint = tmp_path / "fsdp" / "lora" / "checkpoint-000002"
    assert not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / train_module.STATE_NAME).read_text())["sharded"] is True
    # The adapter file is in peft's format, as an unsharded run writes it.
    from peft import get_peft_model_state_dict

    lora_config = config(assets, tmp_path / "unused", lora_rank=4)
    expected_keys = get_peft_model_state_dict(train_module.apply_lora(train_module.build_student(lora_config), 4, 3))
    assert set(load_file(str(checkpoint / "adapter.safetensors"))) == set(expected_keys)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(assets, tmp_path):
    single = train(config(assets, tmp_path / "single", batch_size=2, temporal_conv_dropout=0.0, cpu=True, **OPTIMIZER))
    torchrun(DDP_SCRIPT, tmp_path, assets["teacher"], assets["cache"], str(tmp_path / "ddp"))
    rows = [line.split(",") for line in (tmp_path / "ddp" / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    ddp = [dict(zip(header, row)) for row in rows[1:]]
    assert len(ddp) == len(single.history) == 2
    for mine, theirs in zip(single.history, ddp):
        assert float(theirs["loss"]) == pytest.approx(mine["loss"], rel=1e-5)
        assert float(theirs["grad_norm"]) == pytest.approx(mine["grad_norm"], rel=1e-4)
    start = load_file(str(Path(assets["teacher"]) / "model.safetensors"))
    one = load_file(str(single.student_dir / "model.safetensors"))
    two = load_file(str(tmp_path / "ddp" / "student" / "model.safetensors"))
    _assert_same_update(start, one, two, "ddp")


def test_rng_snapshot_restores_python_numpy_and_torch_generators(tmp_path):
    """A checkpoint's RNG states, through a safetensors file, restore each global generator
    (numpy's with the cached Gaussian it keeps); the suite's own states are put back after."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(11), np.random.seed(12), torch.manual_seed(13)
        np.random.standard_normal()  # leaves a cached gauss in numpy's state
        tensors, metadata = train_module._rng_state()
        save_file(tensors, str(tmp_path / "rng.safetensors"), metadata=metadata)
        draws = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        with safe_open(str(tmp_path / "rng.safetensors"), framework="pt") as handle:
            stored = handle.metadata()
        train_module._set_rng_state(load_file(str(tmp_path / "rng.safetensors")), stored)
        assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == draws
    finally:
        random.setstate(saved[0]), np.random.set_state(saved[1]), torch.set_rng_state(saved[2])


def test_checkpoints_are_ordered_by_step_past_six_digits(tmp_path):
    for step in (5, 999_999, 1_000_000, 20):
        directory = tmp_path / f"{train_module.CHECKPOINT_PREFIX}{step:06d}"
        directory.mkdir()
        (directory / train_module.STATE_NAME).write_text("{}")
    found = train_module.checkpoint_dirs(tmp_path)
    assert [train_module._checkpoint_step(path) for path in found] == [5, 20, 999_999, 1_000_000]
    assert train_module.resolve_resume("latest", tmp_path) == found[-1]
