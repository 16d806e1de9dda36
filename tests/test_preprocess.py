"""The offline teacher pass (t2v_turbo.preprocess) on a small VC2UNet, the tiny VAE and the tiny
OpenCLIP text tower: stored values against direct teacher calls and solo motion priors, corrupt
clips, resuming after a limit or a kill, per-process shards, bf16, the command line, and a cache
that `train` reads."""

import argparse
import copy
import importlib.util
import json
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from t2v_turbo.cache import TeacherCache
from t2v_turbo.commands.preprocess import add_preprocess_command
from t2v_turbo.commands.train import add_train_command
from t2v_turbo.models import OpenCLIPTextEncoder, VC2UNet, VideoVAE
from t2v_turbo.models.checkpoint import save_pretrained
from t2v_turbo.motion import compute_motion_prior
from t2v_turbo.preprocess import PreprocessConfig, clip_generator, preprocess, skip_record_name
from t2v_turbo.train import TrainConfig, train
from t2v_turbo.video_io import write_video

from .helpers import torchrun

# 64 channels, two a GroupNorm(32) group: with one a group every norm removed the timestep
# embedding's per-channel shift, and no test could see the teacher run at the wrong timestep.
SMALL_UNET = dict(
    in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[1], num_res_blocks=1,
    channel_mult=[1], num_head_channels=8, context_dim=32, time_cond_proj_dim=256, motion_cond_proj_dim=256,
)
NUM_FRAMES, SIZE = 4, (16, 16)
SEED = 5
# A short inversion (n + 1 <= 4 teacher passes) keeps the motion path cheap.
MOTION_RANGE = (1, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


class Clips(Dataset):
    """Random clips with distinct captions; `corrupt` items are None (an unreadable file) and
    reading item `kill_at` raises, as a killed process would stop."""

    def __init__(self, count: int, motion=(), corrupt=(), kill_at=None):
        self.count, self.motion, self.corrupt, self.kill_at = count, set(motion), set(corrupt), kill_at

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if index == self.kill_at:
            raise RuntimeError("killed")
        if index in self.corrupt:
            return None
        generator = torch.Generator().manual_seed(1000 + index)
        return {
            "frames": torch.rand(3, NUM_FRAMES, *SIZE, generator=generator) * 2 - 1,
            "caption": f"a dense caption of clip {index}",
            "short_caption": f"clip {index}",
            "use_motion": index in self.motion,
        }


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return VC2UNet(**SMALL_UNET).eval(), VideoVAE.preset("tiny"), OpenCLIPTextEncoder("tiny")


def make_config(cache, **overrides) -> PreprocessConfig:
    values = dict(
        cache=str(cache), preset="tiny", num_frames=NUM_FRAMES, size=SIZE, batch_size=2, shard_size=2,
        dtype="float32", seed=SEED, motion_grid_range=MOTION_RANGE, progress=False, cpu=True,
    )
    values.update(overrides)
    return PreprocessConfig(**values)


def samples_by_caption(directory) -> dict:
    cache = TeacherCache(directory)
    return {sample["caption"]: sample for sample in (cache[i] for i in range(len(cache)))}


def release_alphas_cumprod() -> torch.Tensor:
    # The release scheduler's table: betas, 1 - betas and their product in float32.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0).double()


def expected_clip(models, item, clip_index, motion_range=MOTION_RANGE):
    """SPEC 2 for one clip, with the draws in the documented order from the clip's generator."""
    unet, vae, text_encoder = models
    generator = clip_generator(SEED, clip_index)
    low, high = motion_range if item["use_motion"] else (0, 200)
    n = int(torch.randint(low, high, (1,), generator=generator))
    with torch.no_grad():
        z0 = vae.encode(item["frames"][None], generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    t_hi = 5 * (n + 1) - 1
    abar = release_alphas_cumprod()[t_hi]
    z_t = (abar.sqrt() * z0.double() + (1 - abar).sqrt() * noise.double()).float()
    context, uncond = text_encoder.encode([item["caption"]]), text_encoder.encode([""])
    with torch.no_grad():
        eps_cond = unet(z_t, torch.tensor([t_hi]), context, 8)
        eps_uncond = unet(z_t, torch.tensor([t_hi]), uncond, 8)
    expected = {"n": n, "z_t": z_t[0], "context": context[0], "eps_cond": eps_cond[0], "eps_uncond": eps_uncond[0]}
    if item["use_motion"]:
        prior = compute_motion_prior(unet, z0, torch.tensor([n]), noise, context)
        expected["score"], expected["prior_eps_cond"] = prior["score"][0], prior["eps_cond"][0]
    return expected


def test_stored_values_match_direct_teacher_calls_and_solo_motion_priors(models, tmp_path):
    dataset = Clips(6, motion={0, 3, 5}, corrupt={4})
    # Batches [0, 1, 2] and [3, 4, 5]: the second holds two motion clips, solved together, and a corrupt one.
    config = make_config(tmp_path, batch_size=3, shard_size=4, storage_dtype="float32")
    result = preprocess(config, dataset, models)
    assert (result.written, result.skipped, result.motion_clips, result.already_stored) == (5, 1, 3, 0)
    assert json.loads((tmp_path / skip_record_name(0, 1)).read_text()) == {"skipped_clip_indices": [4]}
    stored = samples_by_caption(tmp_path)
    assert len(stored) == 5
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["motion_grid_range"] == list(MOTION_RANGE) and manifest["config"]["seed"] == SEED

    for index in (0, 1, 2, 3, 5):
        item = dataset[index]
        sample = stored[item["caption"]]
        expected = expected_clip(models, item, index)
        assert int(sample["grid_index"]) == expected["n"]
        assert bool(sample["use_motion"]) == item["use_motion"]
        assert sample["short_caption"] == item["short_caption"]
        # z_t is elementwise (float32 rounding of the float64 formula); the prompts were encoded together.
        torch.testing.assert_close(sample["z_t"], expected["z_t"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sample["context"], expected["context"], rtol=1e-5, atol=1e-5)
        # Batched vs single-clip UNet calls in float32.
        torch.testing.assert_close(sample["eps_uncond"], expected["eps_uncond"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sample["eps_cond"], expected["eps_cond"], rtol=1e-5, atol=1e-5)
        if item["use_motion"]:
            assert MOTION_RANGE[0] <= expected["n"] < MOTION_RANGE[1]
            score = expected["score"]
            assert score.abs().max() > 0
            torch.testing.assert_close(sample["score"], score, rtol=1e-4, atol=1e-5 * float(score.abs().max()))
            torch.testing.assert_close(sample["eps_cond"], expected["prior_eps_cond"], rtol=1e-5, atol=1e-5)
        else:
            assert torch.count_nonzero(sample["score"]) == 0


def test_motion_off_stores_clips_flagged_for_motion_as_plain_clips(models, tmp_path):
    """motion=False (no motion priors): clips the data flags for motion are stored as plain clips,
    n drawn from grid_range, use_motion False, a zero score and the teacher's eps_c with the
    prompt; no motion prior is computed."""
    dataset = Clips(2, motion={0, 1})
    result = preprocess(make_config(tmp_path, motion=False, storage_dtype="float32"), dataset, models)
    assert (result.written, result.motion_clips) == (2, 0)
    stored = samples_by_caption(tmp_path)
    for index in (0, 1):
        item = {**dataset[index], "use_motion": False}
        sample, expected = stored[item["caption"]], expected_clip(models, item, index)
        assert not bool(sample["use_motion"]) and int(sample["grid_index"]) == expected["n"]
        assert torch.count_nonzero(sample["score"]) == 0
        torch.testing.assert_close(sample["eps_cond"], expected["eps_cond"], rtol=1e-5, atol=1e-5)


COMPILED_GRAPHS = []


@torch._dynamo.register_backend(name="preprocess_test_recorder")
def _recording_aot_eager(graph_module, example_inputs):
    COMPILED_GRAPHS.append(graph_module)
    return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)


def test_compiled_no_grad_passes_store_the_eager_values(models, tmp_path):
    """With compile, the ε pass and the DDIM inversion run through torch.compile (here aot_eager with a
    recorder, so the graphs are the eager ops); the cache equals the eager one."""
    dataset = Clips(2, motion={1})  # one batch: an ε pass of 3 clips, inversion steps of 1
    eager = preprocess(make_config(tmp_path / "eager", storage_dtype="float32"), dataset, models)
    COMPILED_GRAPHS.clear()
    torch._dynamo.reset()
    compiled = preprocess(
        make_config(tmp_path / "compiled", storage_dtype="float32", compile="preprocess_test_recorder"), dataset, models
    )
    torch._dynamo.reset()
    assert (compiled.written, compiled.motion_clips) == (eager.written, eager.motion_clips) == (2, 1)
    # One graph for the ε pass (3 clips), one more for the inversion steps (1 clip).
    assert len(COMPILED_GRAPHS) == 2, f"{len(COMPILED_GRAPHS)} graphs compiled"
    got, expected = samples_by_caption(tmp_path / "compiled"), samples_by_caption(tmp_path / "eager")
    for caption, sample in expected.items():
        for name in ("z_t", "eps_cond", "eps_uncond", "score"):
            # aot_eager decomposes some ops: float32 rounding differs by ~1e-6.
            torch.testing.assert_close(got[caption][name], sample[name], rtol=1e-4, atol=1e-5)


def test_cuda_graph_no_grad_passes_store_the_eager_values(models, tmp_path, monkeypatch):
    """With cuda_graphs, the ε pass and the inversion steps replay graphs, one a batch size (on the
    CPU with captures recorded: helpers.record_graph_captures); the cache equals the eager one."""
    from t2v_turbo import preprocess as preprocess_module

    from .helpers import record_graph_captures

    dataset = Clips(2, motion={1})  # one batch: an ε pass of 3 clips, inversion steps of 1
    eager = preprocess(make_config(tmp_path / "eager", storage_dtype="float32"), dataset, models)
    captures = record_graph_captures(monkeypatch)
    # Past the CPU guard of preprocess(): the run itself decides nothing else by the device.
    monkeypatch.setattr(preprocess_module, "_check_cuda_graphs_device", lambda config, device: None)
    graphed = preprocess(make_config(tmp_path / "graphed", storage_dtype="float32", cuda_graphs=True), dataset, models)
    assert (graphed.written, graphed.motion_clips) == (eager.written, eager.motion_clips) == (2, 1)
    # The ε pass (3 clips) runs once: warm-up only; the inversion's 1-clip steps are captured once
    # and replayed from then on.
    assert len(captures) == 1 and captures[0].replays >= 2
    got, expected = samples_by_caption(tmp_path / "graphed"), samples_by_caption(tmp_path / "eager")
    for caption, sample in expected.items():
        for name in ("z_t", "eps_cond", "eps_uncond", "score"):
            torch.testing.assert_close(got[caption][name], sample[name], rtol=0, atol=0)


def test_cuda_graphs_need_a_gpu(models, tmp_path, capsys):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        preprocess(make_config(tmp_path / "cache", cuda_graphs=True, cpu=True), Clips(1), models)
    status = run_cli(["--preset", "tiny", "--cache", str(tmp_path / "cli"), "--cpu", "--cuda-graphs", "--no-progress"])
    assert status == 2 and "cuda_graphs needs a CUDA device" in capsys.readouterr().err


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = preprocess(make_config(directory), Clips(6, motion={2, 5}, corrupt={1}), models)
    assert (result.written, result.skipped) == (5, 1)
    return directory


def assert_same_cache(directory, reference, exact=True):
    got, expected = samples_by_caption(directory), samples_by_caption(reference)
    assert sorted(got) == sorted(expected)
    for caption, sample in expected.items():
        for name, value in sample.items():
            if not isinstance(value, torch.Tensor):
                assert got[caption][name] == value
            elif exact:
                assert torch.equal(got[caption][name], value), (caption, name)
            else:
                # Another batch grouping: float32 differences of ~1e-6, at most one float16 step apart.
                torch.testing.assert_close(got[caption][name], value, rtol=2**-10, atol=1e-3)


def test_a_limited_run_continued_equals_an_uninterrupted_one(models, uninterrupted, tmp_path):
    dataset = Clips(6, motion={2, 5}, corrupt={1})
    first = preprocess(make_config(tmp_path, limit=4), dataset, models)
    assert (first.written, first.skipped) == (3, 1)
    # The corrupt clip 1 makes the 3 stored samples end at clip 3; the skip record says so.
    second = preprocess(make_config(tmp_path), dataset, models)
    assert (second.already_stored, second.written, second.skipped, second.skipped_total) == (3, 2, 0, 1)
    assert_same_cache(tmp_path, uninterrupted)
    again = preprocess(make_config(tmp_path), dataset, models)
    assert (again.already_stored, again.written) == (5, 0)
    with pytest.raises(ValueError, match="larger limit .*raise --limit"):
        preprocess(make_config(tmp_path, limit=2), dataset, models)


def test_a_killed_run_continued_equals_an_uninterrupted_one(models, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        preprocess(make_config(tmp_path), Clips(6, motion={2, 5}, corrupt={1}, kill_at=5), models)
    # Shard 0 holds clips 0 and 2; clip 3 was in the buffer that the kill dropped.
    assert TeacherCache(tmp_path).shards == [("shard-00000.safetensors", 2)]
    resumed = preprocess(make_config(tmp_path), Clips(6, motion={2, 5}, corrupt={1}), models)
    assert (resumed.already_stored, resumed.written) == (2, 3)
    assert_same_cache(tmp_path, uninterrupted, exact=False)


def test_two_processes_split_the_clips_and_write_their_own_shards(models, uninterrupted, tmp_path):
    dataset = Clips(6, motion={2, 5}, corrupt={1})
    for rank in (0, 1):
        accelerator = SimpleNamespace(
            process_index=rank, num_processes=2, device=torch.device("cpu"), is_main_process=rank == 0,
            wait_for_everyone=lambda: None,
        )
        result = preprocess(make_config(tmp_path), dataset, models, accelerator=accelerator)
        # Process 0 takes clips 0, 2, 4; process 1 takes 1 (corrupt), 3, 5.
        assert (result.num_clips, result.written, result.skipped) == ((3, 3, 0) if rank == 0 else (3, 2, 1))
    assert sorted(p.name for p in tmp_path.glob("manifest*.json")) == ["manifest-p0.json", "manifest-p1.json"]
    assert_same_cache(tmp_path, uninterrupted, exact=False)
    with pytest.raises(ValueError, match="another number of processes"):
        preprocess(make_config(tmp_path), dataset, models)


TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from accelerate import PartialState
    from t2v_turbo.models import OpenCLIPTextEncoder, VC2UNet, VideoVAE
    from t2v_turbo.preprocess import preprocess
    from tests.test_preprocess import SMALL_UNET, Clips, make_config
    assert PartialState(cpu=True).num_processes == 2
    torch.manual_seed(0)
    models = VC2UNet(**SMALL_UNET).eval(), VideoVAE.preset("tiny"), OpenCLIPTextEncoder("tiny")
    result = preprocess(make_config(sys.argv[1]), Clips(6, motion={2, 5}, corrupt={1}), models)
    print(f"rank {PartialState().process_index}: {result.num_clips} {result.written} {result.skipped}")
    """
)


@pytest.mark.slow
def test_two_processes_launched_together_write_the_one_process_cache(uninterrupted, tmp_path):
    """Two CPU processes over gloo (torchrun, whose variables accelerate reads as `accelerate
    launch` sets them): each takes its share of the clips and writes its own shards and manifest;
    together they hold what one process wrote."""
    output = torchrun(TWO_PROCESS_SCRIPT, tmp_path, str(tmp_path / "cache"))
    # Process 0 takes clips 0, 2, 4; process 1 takes 1 (corrupt), 3, 5.
    assert "rank 0: 3 3 0" in output and "rank 1: 3 2 1" in output, output[-2000:]
    assert sorted(p.name for p in (tmp_path / "cache").glob("manifest*.json")) == ["manifest-p0.json", "manifest-p1.json"]
    assert_same_cache(tmp_path / "cache", uninterrupted, exact=False)


def test_bfloat16_pass_agrees_with_float32(models, tmp_path):
    dataset = Clips(2, motion={0})
    reference = preprocess(make_config(tmp_path / "fp32", storage_dtype="float32"), dataset, models)
    assert reference.motion_clips == 1
    bf16_models = copy.deepcopy(models)
    preprocess(make_config(tmp_path / "bf16", dtype="bfloat16", storage_dtype="float32"), dataset, bf16_models)
    assert next(bf16_models[0].parameters()).dtype == torch.bfloat16
    fp32, bf16 = samples_by_caption(tmp_path / "fp32"), samples_by_caption(tmp_path / "bf16")
    for caption, expected in fp32.items():
        got = bf16[caption]
        assert int(got["grid_index"]) == int(expected["grid_index"])
        for name in ("z_t", "eps_cond", "eps_uncond"):
            error = (got[name] - expected[name]).norm() / expected[name].norm()
            assert error < 0.05, (caption, name, float(error))
    motion = next(sample for sample in fp32.values() if sample["use_motion"])
    got_score = bf16[motion["caption"]]["score"].flatten()
    cosine = torch.nn.functional.cosine_similarity(got_score, motion["score"].flatten(), dim=0)
    assert cosine > 0.9, float(cosine)


def test_preprocess_then_train(uninterrupted, models, tmp_path):
    cache = TeacherCache(uninterrupted)
    assert cache.dtype == torch.float16 and len(cache) == 5
    save_pretrained(models[0], tmp_path / "teacher")
    config = TrainConfig(
        teacher=str(tmp_path / "teacher"), cache=str(uninterrupted), output_dir=str(tmp_path / "run"), max_steps=2,
        batch_size=2, checkpoint_every=0, kernels="off", progress=False,
    )
    result = train(config)
    assert result.steps == 2 and len(result.losses) == 2
    assert all(math.isfinite(loss) and loss > 0 for loss in result.losses)
    assert (result.student_dir / "config.json").is_file()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_preprocess_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["preprocess", *argv])
    return args.handler(args)


def test_command_line_synthetic_tiny_preset(tmp_path, capsys):
    # The synthetic world needs a 24-pixel short side.
    common = ["--preset", "tiny", "--frames", "4", "--height", "24", "--width", "24", "--batch-size", "2",
              "--dtype", "float32", "--cpu", "--no-progress"]
    status = run_cli(["--data", "synthetic", "--cache", str(tmp_path / "cache"), "--limit", "2", "--no-motion", *common])
    assert status == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 2
    sample = cache[0]
    assert sample["z_t"].shape == (4, 4, 12, 12) and sample["context"].shape == (77, 32)
    assert not bool(sample["use_motion"]) and torch.count_nonzero(sample["score"]) == 0
    assert cache.config["preset"] == "tiny" and cache.config["motion"] is False
    # The commands chain as the README shows: train reads that cache with the same random teacher.
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command", required=True))
    train_args = parser.parse_args([
        "train", "--preset", "tiny", "--data", "synthetic", "--cache", str(tmp_path / "cache"), "--max-steps", "1",
        "--output-dir", str(tmp_path / "run"), "--no-progress", "kernels=off", "batch_size=2", "cpu=true",
    ])
    assert train_args.handler(train_args) == 0
    assert "trained 1 steps" in capsys.readouterr().out

    status = run_cli(["--model", str(tmp_path / "missing"), "--cache", str(tmp_path / "other"), "--frames", "4"])
    assert status == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "other").exists(), "a refused run leaves no cache directory behind"
    (tmp_path / "a-file").write_text("")
    assert run_cli(["--preset", "tiny", "--cache", str(tmp_path / "a-file"), "--frames", "4", "--cpu"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert run_cli(["--preset", "tiny", "--cache", str(tmp_path / "a-file" / "c"), "--frames", "4", "--cpu"]) == 2
    assert "a-file is a file, so" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
        (["--frames", "-2"], "argument --frames: must be a positive integer, got -2"),
        (["--limit", "0"], "argument --limit: must be a positive integer, got 0"),
        (["--num-workers", "-1"], "argument --num-workers: must be 0 or more, got -1"),
        (["--fps", "eight"], "argument --fps: must be an integer, got 'eight'"),
        (["--grid-range", "5", "2"], "--grid-range must be LO HI with 0 <= LO < HI <= 200, got 5 2"),
        (["--motion-grid-range", "100", "201"], "--motion-grid-range must be LO HI with 0 <= LO < HI <= 200"),
    ],
)
def test_command_line_errors_name_the_flag(tmp_path, capsys, flags, message):
    """Not the PreprocessConfig field behind it (num_frames for --frames)."""
    argv = ["--preset", "tiny", "--cache", str(tmp_path / "cache"), "--cpu", "--no-progress", *flags]
    try:
        status = run_cli(argv)
    except SystemExit as stopped:  # argparse's own usage error
        status = stopped.code
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("bounds", [(5, 2), (100, 201), (-1, 10), (0.0, 10), (3,)])
def test_a_config_refuses_grid_ranges_off_the_grid(tmp_path, bounds):
    for name in ("grid_range", "motion_grid_range"):
        with pytest.raises(ValueError, match=f"{name} must be integers \\[lo, hi\\) with 0 <= lo < hi <= 200"):
            PreprocessConfig(cache=str(tmp_path / "cache"), preset="tiny", **{name: bounds})


def test_command_line_fails_when_every_clip_is_unreadable(tmp_path, capsys):
    """Said by preprocess, not left to train's "the cache holds no samples"."""
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "videos.csv").write_text("path,caption\nzero.mp4,a\ntext.mp4,b\n")
    common = ["--preset", "tiny", "--frames", "4", "--height", "24", "--width", "24", "--dtype", "float32", "--cpu",
              "--no-progress", "--no-motion"]
    assert run_cli(["--data", str(tmp_path / "videos.csv"), "--cache", str(tmp_path / "cache"), *common]) == 1
    captured = capsys.readouterr()
    assert "2 unreadable clips skipped" in captured.out
    assert "every clip of" in captured.err and "was unreadable" in captured.err


CLI_SCRIPT = "import sys\nfrom t2v_turbo.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"


@pytest.mark.slow
def test_a_process_given_only_unreadable_clips_does_not_fail_the_launch(tmp_path):
    """Under `accelerate launch` (torchrun here) the unreadable-data verdict and the summary line are
    the run's: a process that got only unreadable clips does not fail a run whose other process
    stored its clips, and the main process alone prints the totals."""
    write_video(torch.linspace(0, 1, 16 * 3 * 32 * 32).reshape(16, 3, 32, 32), tmp_path / "ramp.mp4", fps=16)
    (tmp_path / "text.mp4").write_text("not a video")
    # Process 0 takes row 0 (a video), process 1 row 1 (text).
    (tmp_path / "videos.csv").write_text("path,caption\nramp.mp4,a ramp\ntext.mp4,b\n")
    output = torchrun(
        CLI_SCRIPT, tmp_path, "preprocess", "--preset", "tiny", "--data", str(tmp_path / "videos.csv"), "--cache",
        str(tmp_path / "cache"), "--frames", "4", "--height", "16", "--width", "16", "--dtype", "float32", "--cpu",
        "--no-progress", "--no-motion",
    )
    assert "error:" not in output, output[-2000:]
    assert output.count("wrote ") == 1 and "wrote 1 samples" in output and "by 2 processes" in output, output[-2000:]
    assert "1 unreadable clips skipped (1 in all)" in output, output[-2000:]


def test_command_line_interrupted_says_where_the_finished_clips_are(tmp_path, capsys, monkeypatch):
    """Ctrl-C (the library has stored the finished clips as a last shard): one line saying so,
    status 130, no traceback."""
    from t2v_turbo import preprocess as preprocess_module

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess_module, "preprocess", interrupted)
    assert run_cli(["--preset", "tiny", "--cache", str(tmp_path / "cache"), "--cpu", "--no-progress"]) == 130
    assert f"interrupted; the clips finished before it (if any) are stored in {tmp_path / 'cache'}" in capsys.readouterr().err


def test_a_frame_size_the_teacher_cannot_take_stops_before_the_cache_is_begun(models, tmp_path):
    """The size must divide by the VAE's factor times the UNet's (a two-level UNet: 2); the
    manifest is not written, so the corrected command starts the cache."""
    _, vae, text_encoder = models
    two_levels = VC2UNet(**{**SMALL_UNET, "channel_mult": [1, 1]}).eval()
    size = (SIZE[0] + vae.downsample, SIZE[1])  # a whole number of latents, but an odd one
    with pytest.raises(ValueError, match=f"height must be a multiple of {2 * vae.downsample}"):
        preprocess(make_config(tmp_path / "cache", size=size), Clips(2), (two_levels, vae, text_encoder))
    assert not (tmp_path / "cache").exists()


def test_clip_settings_come_from_the_model_directory_unless_given(tmp_path):
    from t2v_turbo.commands.preprocess import CLIP_DEFAULTS, clip_settings
    from t2v_turbo.pipeline import PIPELINE_CONFIG_NAME

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / PIPELINE_CONFIG_NAME).write_text(json.dumps({"fps": 4, "num_frames": 8, "height": 32, "width": 48}))
    flags = dict(frames=None, fps=None, height=None, width=None)
    assert clip_settings(SimpleNamespace(model=None, **flags)) == CLIP_DEFAULTS
    from_model = clip_settings(SimpleNamespace(model=str(tmp_path / "model"), **flags))
    assert from_model == {"frames": 8, "fps": 4, "height": 32, "width": 48}
    given = clip_settings(SimpleNamespace(model=str(tmp_path / "model"), **{**flags, "height": 64}))
    assert given == {**from_model, "height": 64}


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord is not installed (pip install decord)")
def test_a_video_cache_continues_only_with_the_decoder_that_began_it(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = torch.linspace(0, 1, 16 * 3 * 64 * 64).reshape(16, 3, 64, 64)  # decord misreads 16-pixel frames
    write_video(clip, videos / "ramp.mp4", fps=16)
    (videos / "manifest.csv").write_text("path,caption\nramp.mp4,a ramp\nramp.mp4,the ramp again\n")
    common = ["--preset", "tiny", "--data", str(videos), "--cache", str(tmp_path / "cache"), "--frames", "4",
              "--height", "16", "--width", "16", "--batch-size", "1", "--dtype", "float32", "--no-motion", "--cpu",
              "--no-progress"]
    # PyAV, the default, is not recorded (caches from before the choice continue); decord is.
    assert run_cli([*common, "--limit", "1", "--video-backend", "pyav"]) == 0
    assert "video_backend" not in TeacherCache(tmp_path / "cache").config
    capsys.readouterr()
    assert run_cli([*common, "--video-backend", "decord"]) == 2
    assert "another config" in capsys.readouterr().err
    assert run_cli([*common]) == 0
    assert len(TeacherCache(tmp_path / "cache")) == 2
    decord_cache = ["--cache", str(tmp_path / "decord-cache")]
    assert run_cli([*common, *decord_cache, "--limit", "1", "--video-backend", "decord"]) == 0
    assert TeacherCache(tmp_path / "decord-cache").config["video_backend"] == "decord"
    capsys.readouterr()
    assert run_cli([*common, *decord_cache]) == 2
    assert "another config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model="somewhere"), "exactly one of model"),
        (dict(preset=None), "exactly one of model"),
        (dict(preset="huge"), "preset must be one of"),
        (dict(motion_grid_range=(150, 100)), "motion_grid_range"),
        (dict(grid_range=(0, 201)), "grid_range"),
        (dict(dtype="float64"), "dtype must be one of"),
        (dict(batch_size=0), "batch_size"),
        (dict(limit=0), "limit"),
        (dict(seed=-1), "seed must be an int in"),
        (dict(seed=2**64), "seed must be an int in"),
        (dict(video_backend="opencv"), "video_backend must be one of"),
        (dict(compile="fastest"), "compile must be None or a torch.compile backend"),
        (dict(num_workers=-1), "num_workers must be an int >= 0 or None"),
    ],
)
def test_bad_config_is_rejected_with_the_field_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def test_video_files_decode_in_worker_processes_by_default(tmp_path):
    from t2v_turbo.preprocess import VIDEO_DECODE_WORKERS

    assert make_config(tmp_path, data="synthetic").loader_workers() == 0
    assert make_config(tmp_path, data="videos/manifest.csv").loader_workers() == VIDEO_DECODE_WORKERS == 2
    assert make_config(tmp_path, data="videos/manifest.csv", num_workers=0).loader_workers() == 0


def test_a_cache_larger_than_the_limit_allows_is_told_from_one_of_other_data(tmp_path):
    from t2v_turbo.preprocess import _resume_position

    # 8 samples: more than --limit 5 gives, fewer than the 10 clips without it.
    with pytest.raises(ValueError, match="larger limit"):
        _resume_position(range(5), 8, set(), tmp_path, 5, range(10))
    # 20 samples: more than the whole data holds, whatever the limit.
    with pytest.raises(ValueError, match="other data"):
        _resume_position(range(5), 20, set(), tmp_path, 5, range(10))


def test_resumed_batches_keep_the_uninterrupted_runs_boundaries():
    from t2v_turbo.preprocess import _aligned_batches

    clips = list(range(100, 110))
    assert _aligned_batches(clips, 0, 4) == [clips[0:4], clips[4:8], clips[8:10]]
    # Resuming at position 3: only the first batch is short, the rest fall where a whole run put them.
    assert _aligned_batches(clips, 3, 4) == [clips[3:4], clips[4:8], clips[8:10]]
    assert _aligned_batches(clips, 4, 4) == [clips[4:8], clips[8:10]]
    assert _aligned_batches(clips, 10, 4) == []


def test_resume_position_counts_only_clips_that_were_not_skipped(tmp_path):
    from t2v_turbo.preprocess import _resume_position

    clips = [0, 2, 4, 6, 8, 10]
    assert _resume_position(clips, 0, set(), tmp_path) == 0
    assert _resume_position(clips, 0, {0}, tmp_path) == 0
    assert _resume_position(clips, 2, set(), tmp_path) == 2
    # Clips 2 and 4 were skipped: the 2nd stored sample is clip 6, so the run continues at clip 8.
    assert _resume_position(clips, 2, {2, 4}, tmp_path) == 4
    # A skipped clip right after the stored ones is met again (and skipped again) on resume.
    assert _resume_position(clips, 1, {2}, tmp_path) == 1
    assert _resume_position(clips, 5, {2}, tmp_path) == 6
    assert _resume_position(clips, 6, set(), tmp_path) == 6
