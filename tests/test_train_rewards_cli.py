"""The training reward mixture from files (t2v_turbo.rewards.loading) and `t2v-turbo train`'s reward
flags: toy rewards saved to directories scored against their preprocessing written out here, tiny
OpenCLIP weights from .safetensors, the shared tiny ViCLIP/InternVideo2 checkpoints, the release's
default weights, a 2-step CLI run whose metrics.csv carries the reward terms, and the errors."""

import argparse
import csv
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import turbo_kernels
from t2v_turbo.commands import train as train_command
from t2v_turbo.commands.train import add_train_command
from t2v_turbo.models import VC2UNet
from t2v_turbo.models.checkpoint import save_pretrained
from t2v_turbo.models.vae import VideoVAE
from t2v_turbo.rewards.image_text import clip_spec, hpsv2_spec, video_spec
from t2v_turbo.rewards.internvideo2 import InternVideo2Reward
from t2v_turbo.rewards.loading import build_reward_mixture, parse_video_reward, toy_spec
from t2v_turbo.rewards.toy import ToyImageReward, ToyVideoReward
from t2v_turbo.rewards.viclip import ViCLIPReward
from tests.test_reward_mixture import TINY_CONFIG, TINY_SIZE, tiny_clip
from tests.test_train import SMALL_UNET, write_cache
from t2v_turbo.train import reward_role, video_reward_scale

from .helpers import SHARED, torchrun

REFERENCE = SHARED / "reward_reference"
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"reward reference data not found at {REFERENCE} (shared/reward_reference is absent)"
)
RELEASE_IMAGE_WEIGHT, RELEASE_VIDEO_WEIGHT = 0.2, 1 / 6  # SPEC 3.7: 0.2 and 0.5 * 2/6
CAPTIONS = ["a red ball moves left", "a blue square moves up"]
SHORT_CAPTIONS = ["red ball", "blue square"]
# Float32 models on the same inputs, summed in a different order by the mixture.
SCORE_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_rewards")
    torch.manual_seed(0)
    ToyImageReward(embed_dim=8, width=8).save_pretrained(root / "image")
    # Two frames: the cache's clips (tests.test_train.LATENT) are two frames long.
    ToyVideoReward(num_frames=2, embed_dim=8, width=8).save_pretrained(root / "video")
    return {"image": root / "image", "video": root / "video"}


def _toy_preprocess(frames: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [0, 1] -> (B, F, 3, 32, 32): bilinear squash, then mean 0.5 / std 0.5."""
    clips = frames.transpose(1, 2)
    flat = clips.reshape(-1, *clips.shape[2:])
    resized = F.interpolate(flat, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    return ((resized - 0.5) / 0.5).reshape(*clips.shape[:2], 3, 32, 32)


def test_toy_rewards_follow_the_release_rules_and_score_as_written(toy_dirs):
    mixture = build_reward_mixture(video=f"toy:{toy_dirs['video']}", toy_image=toy_dirs["image"])
    image, video = mixture.entries
    assert (image.name, image.frames, image.num_frames, image.caption) == ("toy_image", "random", 2, "short")
    assert (video.name, video.frames, video.num_frames, video.caption) == ("video", "strided", 2, "dense")
    assert not video.random_crop, "the toy reward's spec squashes: nothing to crop"
    assert image.weight == pytest.approx(RELEASE_IMAGE_WEIGHT, rel=1e-12)
    assert video.weight == pytest.approx(RELEASE_VIDEO_WEIGHT, rel=1e-12)
    assert image.spec == video.spec == toy_spec(32)
    assert isinstance(image.model, ToyImageReward) and isinstance(video.model, ToyVideoReward)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in mixture.parameters())

    frames = torch.rand(2, 3, 2, 12, 20, generator=torch.Generator().manual_seed(1))
    selected = mixture.select_frames(2, torch.Generator().manual_seed(0))
    assert selected == [0, 1]
    with turbo_kernels.backend("reference"):
        total, scores = mixture(frames, selected, CAPTIONS, SHORT_CAPTIONS)
    pixels = _toy_preprocess(frames)
    with torch.no_grad():
        video_score = (video.model.embed_visual(pixels) * video.model.embed_text(CAPTIONS)).sum(-1)
        image_rows = image.model.embed_visual(pixels.flatten(0, 1))
        image_text = image.model.embed_text(SHORT_CAPTIONS).repeat_interleave(2, dim=0)
        image_score = (image_rows * image_text).sum(-1).reshape(2, 2).mean(1)
    torch.testing.assert_close(scores["video"], video_score, rtol=0, atol=SCORE_TOL)
    torch.testing.assert_close(scores["toy_image"], image_score, rtol=0, atol=SCORE_TOL)
    expected = RELEASE_IMAGE_WEIGHT * image_score.mean() + RELEASE_VIDEO_WEIGHT * video_score.mean()
    assert float(total) == pytest.approx(float(expected), abs=SCORE_TOL)


def test_open_clip_weights_from_safetensors_in_the_requested_dtype(tmp_path):
    sources = {"hps": tiny_clip(1), "clip": tiny_clip(2)}
    for name, model in sources.items():
        save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    mixture = build_reward_mixture(
        hps=tmp_path / "hps.safetensors", clip=tmp_path / "clip.safetensors", image_architecture=TINY_CONFIG,
        image_weight=0.3, dtype=torch.float64,
    )
    hps, clip = mixture.entries
    assert (hps.name, clip.name) == ("hpsv2", "clip") and hps.weight == clip.weight == 0.3
    assert hps.spec == hpsv2_spec(TINY_SIZE) and clip.spec == clip_spec(TINY_SIZE)
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in mixture.parameters())
    pixels = torch.rand(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for entry, source in ((hps, sources["hps"]), (clip, sources["clip"])):
        expected = source.double().embed_visual(pixels)
        torch.testing.assert_close(entry.model.embed_visual(pixels), expected, rtol=1e-12, atol=1e-12)
    bf16 = build_reward_mixture(clip=tmp_path / "clip.safetensors", image_architecture=TINY_CONFIG, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@needs_reference
def test_viclip_and_internvideo2_checkpoints(tmp_path):
    viclip = build_reward_mixture(video=f"viclip:{REFERENCE / 'viclip_tiny.safetensors'}", video_preset="tiny")
    (entry,) = viclip.entries
    assert isinstance(entry.model, ViCLIPReward) and entry.num_frames == 8 and entry.spec == video_spec(56)
    assert entry.random_crop, "the release's RandomCrop"
    assert entry.weight == pytest.approx(RELEASE_VIDEO_WEIGHT, rel=1e-12)

    checkpoint = tmp_path / "internvideo2.safetensors"
    shutil.copy(REFERENCE / "internvideo2_tiny.safetensors", checkpoint)
    source = f"internvideo2:{checkpoint}"
    with pytest.raises(FileNotFoundError, match="InternVideo2 needs its BERT vocabulary; no vocab.txt"):
        build_reward_mixture(video=source, video_preset="tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "ball", "moves", "left"]
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    assert parse_video_reward(f"{source}:{tmp_path / 'vocab'}").vocab == tmp_path / "vocab"
    # Explicitly, then beside the checkpoint.
    for spec in (f"{source}:{tmp_path / 'vocab'}", source):
        if spec == source:
            shutil.copy(tmp_path / "vocab" / "vocab.txt", tmp_path / "vocab.txt")
        (entry,) = build_reward_mixture(video=spec, video_preset="tiny").entries
        assert isinstance(entry.model, InternVideo2Reward) and entry.num_frames == 4 and entry.random_crop
        ids, _ = entry.model.tokenize(["a red ball moves left"])
        assert ids[0, :7].tolist() == [2, 5, 6, 7, 8, 9, 3]


def test_loading_errors_name_the_argument(toy_dirs, tmp_path):
    assert build_reward_mixture() is None
    with pytest.raises(FileNotFoundError, match="hps: no checkpoint file at .*none.safetensors"):
        build_reward_mixture(hps=tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="video: no toy reward directory at"):
        build_reward_mixture(video=f"toy:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match=r"video reward kind must be one of \('internvideo2', 'viclip', 'toy'\), got 'sora'"):
        build_reward_mixture(video="sora:/x")
    with pytest.raises(ValueError, match="video must look like KIND:PATH"):
        parse_video_reward("viclip")
    with pytest.raises(ValueError, match="toy_image: .* holds a toy video reward; expected a toy image reward"):
        build_reward_mixture(toy_image=toy_dirs["video"])
    with pytest.raises(ValueError, match="video_weight must be a finite number"):
        build_reward_mixture(video=f"toy:{toy_dirs['video']}", video_weight=float("nan"))
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        build_reward_mixture(video=f"toy:{toy_dirs['video']}", dtype=torch.int8)


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_rewards_cli")
    torch.manual_seed(0)
    save_pretrained(VC2UNet(**SMALL_UNET), root / "teacher")
    VideoVAE.preset("tiny").save_pretrained(root / "vae")
    return {"teacher": root / "teacher", "vae": root / "vae", "cache": write_cache(root / "cache")}


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *argv])
    return args.handler(args)


def cli_args(train_assets, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--cache", str(train_assets["cache"]), "--max-steps", "2", "--output-dir", str(output_dir), *extra,
        f"teacher={train_assets['teacher']}", "batch_size=2", "checkpoint_every=0", "kernels=off",
        "progress=false", "seed=3",
    ]


def test_cli_trains_with_toy_rewards_at_the_release_weights(train_assets, toy_dirs, tmp_path, capsys):
    argv = cli_args(
        train_assets, tmp_path / "run", "--vae", str(train_assets["vae"]), "--video-reward", f"toy:{toy_dirs['video']}",
        "--toy-image-reward", str(toy_dirs["image"]),
    )
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "rewards: toy_image (ToyImageReward) weight 0.2, video (ToyVideoReward) weight 0.1667; torch.float32 on cpu" in out
    with (tmp_path / "run" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert {"reward_total", "reward_toy_image", "reward_video"} <= set(rows[0])
    for row in rows:
        values = {key: float(value) for key, value in row.items() if value}
        expected_total = RELEASE_IMAGE_WEIGHT * values["reward_toy_image"] + RELEASE_VIDEO_WEIGHT * values["reward_video"]
        assert values["reward_total"] == pytest.approx(expected_total, rel=1e-5, abs=1e-7)
        assert values["loss"] == pytest.approx(values["loss_cd"] - values["reward_total"], rel=1e-5, abs=1e-7)
        assert values["reward_video"] != 0.0


def test_cli_reward_errors(train_assets, toy_dirs, tmp_path, capsys):
    assert run_cli(cli_args(train_assets, tmp_path / "a", "--video-reward", f"toy:{toy_dirs['video']}")) == 2
    assert "rewards score VAE-decoded frames: give --vae DIR" in capsys.readouterr().err
    vae = ("--vae", str(train_assets["vae"]))
    assert run_cli(cli_args(train_assets, tmp_path / "b", *vae, "--hps", str(tmp_path / "hps.pt"))) == 2
    assert "hps: no checkpoint file at" in capsys.readouterr().err
    assert run_cli(cli_args(train_assets, tmp_path / "c", *vae, "--video-reward", "sora:/x")) == 2
    assert "video reward kind must be one of" in capsys.readouterr().err
    assert run_cli(cli_args(train_assets, tmp_path / "d", "--vae", str(tmp_path / "novae"), "--video-reward",
                            f"toy:{toy_dirs['video']}")) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_reward_roles_and_the_video_scale_reproduce_the_release_split():
    # The release: 8 processes, the last 2 score only the video reward at weight 0.5, which DDP's
    # mean turns into 0.5 * 2/6 = 1/6 relative to L_CD; the configured 1/6 is scaled back to 0.5.
    assert [reward_role(i, 8, 2) for i in range(8)] == ["main"] * 6 + ["video"] * 2
    assert [reward_role(i, 3, 0) for i in range(3)] == ["main"] * 3
    assert RELEASE_VIDEO_WEIGHT * video_reward_scale(8, 2) == pytest.approx(0.5, rel=1e-12)
    assert video_reward_scale(2, 1) == 1.0


def test_split_rewards_need_a_process_for_l_cd_and_a_video_reward(train_assets, toy_dirs, tmp_path, capsys):
    vae = ("--vae", str(train_assets["vae"]))
    image_only = cli_args(train_assets, tmp_path / "a", *vae, "--toy-image-reward", str(toy_dirs["image"]),
                          "video_reward_processes=1")
    assert run_cli(image_only) == 2
    assert "video_reward_processes splits off the video reward: give --video-reward" in capsys.readouterr().err
    one_process = cli_args(train_assets, tmp_path / "b", *vae, "--video-reward", f"toy:{toy_dirs['video']}",
                           "video_reward_processes=1")
    assert run_cli(one_process) == 2
    assert "leaves no process for L_CD: the run has 1 process(es)" in capsys.readouterr().err
    assert run_cli(cli_args(train_assets, tmp_path / "c", "video_reward_processes=-1")) == 2
    assert "video_reward_processes must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("role, loaded", [("main", ["toy_image"]), ("video", ["video"])])
def test_split_loads_only_the_models_of_the_process_role(train_assets, toy_dirs, tmp_path, monkeypatch, role, loaded):
    import t2v_turbo.train as train_module

    monkeypatch.setattr(train_module, "reward_role", lambda index, processes, video: role)
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *cli_args(
        train_assets, tmp_path / "run", "--vae", str(train_assets["vae"]), "--video-reward", f"toy:{toy_dirs['video']}",
        "--toy-image-reward", str(toy_dirs["image"]),
    )])
    config = train_module.TrainConfig(vae=str(train_assets["vae"]), video_reward_processes=1)
    mixture, vae = train_command._load_rewards(args, config)
    assert [entry.name for entry in mixture.entries] == loaded
    assert vae is not None


SPLIT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from t2v_turbo.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
    """
)


@pytest.mark.slow
def test_three_processes_split_the_rewards_as_the_release(train_assets, toy_dirs, tmp_path):
    """Processes 0 and 1 compute L_CD and the image reward, process 2 only the video reward, scaled
    by (3 - 1)/1 = 2. Each term is logged as the mean over the processes computing it and the loss
    as the mean of the three objectives, so the logged values pin down who computed what and the
    scale."""
    argv = cli_args(
        train_assets, tmp_path / "run", "--vae", str(train_assets["vae"]), "--video-reward", f"toy:{toy_dirs['video']}",
        "--toy-image-reward", str(toy_dirs["image"]), "video_reward_processes=1", "cpu=true",
    )
    argv[argv.index("batch_size=2")] = "batch_size=1"
    out = torchrun(SPLIT_SCRIPT, tmp_path, *argv, processes=3)
    assert "rewards split over 3 processes: the first 2 compute L_CD and toy_image_reward" in out
    assert "scaled by 2 there" in out
    with (tmp_path / "run" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:
        values = {key: float(value) for key, value in row.items() if value}
        main_objective = values["loss_cd"] - RELEASE_IMAGE_WEIGHT * values["reward_toy_image"]  # mean of 0 and 1
        video_objective = -2 * RELEASE_VIDEO_WEIGHT * values["reward_video"]  # process 2
        assert values["loss"] == pytest.approx((2 * main_objective + video_objective) / 3, rel=1e-5, abs=1e-7)
        expected_total = (2 * RELEASE_IMAGE_WEIGHT * values["reward_toy_image"] + RELEASE_VIDEO_WEIGHT * values["reward_video"]) / 3
        assert values["reward_total"] == pytest.approx(expected_total, rel=1e-5, abs=1e-7)
        assert values["reward_video"] != 0.0 and values["reward_toy_image"] != 0.0
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_reward_file_missing_on_one_role_stops_every_process(train_assets, toy_dirs, tmp_path):
    argv = cli_args(
        train_assets, tmp_path / "run", "--vae", str(train_assets["vae"]), "--video-reward", f"toy:{tmp_path / 'none'}",
        "--toy-image-reward", str(toy_dirs["image"]), "video_reward_processes=1", "cpu=true",
    )
    out = torchrun(SPLIT_SCRIPT, tmp_path, *argv, expect_failure=True)
    assert out.count("t2v-turbo train: error:") == 2, out[-3000:]
