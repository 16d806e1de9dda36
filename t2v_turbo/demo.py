"""`t2v-turbo demo`: the whole T2V-Turbo-v2 recipe on the toy world, with its effect measured.

From the shipped world models (`t2v-turbo pretrain` made them; see assets/world/recipe.json):
1. preprocess: the frozen teacher's pass over training clips of the world (latents, noisy latents,
   conditional and unconditional ε, prompt embeddings) and motion priors (DDIM inversion, temporal
   attention energy, its gradient) for the clips whose captions describe motion;
2. distil four 4-step students from the same cache, the paper's ablation: (a) consistency
   distillation only, (b) + reward feedback (the toy image-text and video-text models, through the
   same RewardMixture as the real recipe), (c) + motion guidance in the teacher's solver, (d) both;
3. sample the teacher (50 DDIM steps with CFG, 2 UNet passes a step) and every student (4 steps)
   from the same held-out prompts and seeds, and score them: agreement with the teacher's samples
   (PSNR), the image-text and video-text reward scores, motion fidelity (the centroid track of the
   object against the caption's direction: no learned model), how many clips move the captioned way
   rather than the opposite one, and sampling time;
4. write a report folder: a GIF grid per prompt (teacher | a | b | c | d), loss and reward curves,
   a markdown table and the numbers as JSON.
The numbers are whatever the run measures; the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from t2v_turbo.data.world import WorldDataset, parse_caption, prompts
from t2v_turbo.models import checkpoint
from t2v_turbo.pretrain import REWARD_DIRS, WORLD, WORLD_FPS
from t2v_turbo.rewards.mixture import RewardEntry, RewardMixture
from t2v_turbo.rewards.loading import toy_spec
from t2v_turbo.rewards.toy import load_toy_reward

WORLD_MODELS = Path(__file__).resolve().parent / "assets" / "world"
TOY_SPEC = toy_spec(WORLD.frame_shape[0])
GIF_SCALE = 3
GIF_LABELS = {"a": "(a) CD", "b": "(b) +reward", "c": "(c) +motion", "d": "(d) both"}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    rewards: bool
    motion: bool


VARIANTS = (
    Variant("a", "(a) CD only", rewards=False, motion=False),
    Variant("b", "(b) CD + rewards", rewards=True, motion=False),
    Variant("c", "(c) CD + motion guidance", rewards=False, motion=True),
    Variant("d", "(d) CD + rewards + motion", rewards=True, motion=True),
)


@dataclass
class DemoConfig:
    output_dir: str = "demo-report"
    models: str = str(WORLD_MODELS)
    seed: int = 0
    train_clips: int = 64
    train_steps: int = 80
    batch_size: int = 4
    lr: float = 1e-4
    image_reward_weight: float = 0.2
    video_reward_weight: float = 0.5 * 2 / 6
    motion_strength: float = 0.05
    # Grid indices of motion clips: SPEC 2's noisier half; the inversion runs n + 1 teacher steps.
    motion_grid_range: tuple[int, int] = (100, 200)
    eval_prompts: int = 16
    teacher_steps: int = 50
    student_steps: int = 4
    # w in the LCM convention the students are distilled in; the teacher samples with the classic
    # CFG scale it equals, w + 1 (SPEC 3.1), so both rows aim at the same guided distribution.
    guidance_scale: float = 7.5
    variants: str = "abcd"
    threads: int = 0
    progress: bool = True

    def validate(self) -> None:
        unknown = set(self.variants) - {v.name for v in VARIANTS}
        if unknown or not self.variants:
            raise ValueError(f"variants must be letters from 'abcd', got {self.variants!r}")
        from t2v_turbo import schedule
        from t2v_turbo.pipeline import TEACHER_MAX_STEPS

        for name in ("train_clips", "train_steps", "batch_size", "eval_prompts", "teacher_steps", "student_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        # Checked here, not when the samplers refuse them after the run's training.
        for name, most in (("teacher_steps", TEACHER_MAX_STEPS), ("student_steps", schedule.DDIM_GRID_STEPS)):
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be at most {most}, got {getattr(self, name)}")
        if self.train_clips < self.batch_size:
            raise ValueError(f"train_clips ({self.train_clips}) must hold at least one batch ({self.batch_size})")
        if not Path(self.models).is_dir():
            raise ValueError(f"models directory {self.models} does not exist (t2v-turbo pretrain writes one)")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (torch's default) or more, got {self.threads}")
        for name in ("lr", "image_reward_weight", "video_reward_weight", "motion_strength", "guidance_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite {'positive' if name == 'lr' else 'non-negative'} number, got {value}")
        low, high = self.motion_grid_range
        if not 0 <= low < high <= 200:
            raise ValueError(f"motion_grid_range must be [lo, hi) with 0 <= lo < hi <= 200, got {self.motion_grid_range}")


# What each `t2v-turbo demo` flag sets.
FIELD_HELP = {
    "output_dir": "where the report, GIFs, curves, cache and runs go",
    "models": "the world models directory (teacher pipeline and toy reward models)",
    "seed": "seed of the data, the preprocessing draws and training",
    "train_clips": "world clips to preprocess and train on",
    "train_steps": "optimizer steps a student",
    "batch_size": "clips a training step",
    "lr": "AdamW learning rate",
    "image_reward_weight": "weight of the image reward (variants b, d)",
    "video_reward_weight": "weight of the video reward (variants b, d)",
    "motion_strength": "motion-guidance strength m (variants c, d)",
    "motion_grid_range": "grid indices [LO, HI) of motion clips",
    "eval_prompts": "held-out prompts sampled for the report",
    "teacher_steps": "DDIM steps of the teacher row",
    "student_steps": "sampling steps of the students",
    "guidance_scale": "guidance w the students are distilled and sampled at",
    "variants": "which students to train: letters of abcd",
    "threads": "torch CPU threads (0: torch's default)",
    "progress": "progress bars",
}


@dataclass
class VariantResult:
    label: str
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _reward_models(models_dir: Path):
    image = load_toy_reward(models_dir / REWARD_DIRS["image"])
    video = load_toy_reward(models_dir / REWARD_DIRS["video"])
    return image, video


def training_mixture(image, video, config: DemoConfig) -> RewardMixture:
    """The release's mixture shape: the image model on 2 random frames with the short caption, the
    video model on its strided frames with the dense caption, at the release's effective weights."""
    return RewardMixture(
        [
            RewardEntry("image", image, TOY_SPEC, frames="random", weight=config.image_reward_weight, caption="short"),
            RewardEntry("video", video, TOY_SPEC, frames="strided", weight=config.video_reward_weight, caption="dense"),
        ]
    )


def evaluation_mixture(image, video) -> RewardMixture:
    """Scores for the table: the image model on every frame, the video model on the whole clip."""
    every_frame = list(range(WORLD.num_frames))
    return RewardMixture(
        [
            RewardEntry("image", image, TOY_SPEC, frames=every_frame, num_frames=WORLD.num_frames, caption="short"),
            RewardEntry("video", video, TOY_SPEC, frames=every_frame, caption="dense"),
        ]
    )


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per clip, frames in [0, 1]."""
    mse = (a - b).square().flatten(1).mean(dim=1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def score_samples(frames: torch.Tensor, captions: list[str], scorer: RewardMixture) -> dict[str, torch.Tensor]:
    """Per clip: image and video reward scores, motion fidelity and whether it moves as captioned
    rather than the opposite way (NaN for static captions); frames (B, 3, F, H, W) in [0, 1]."""
    from t2v_turbo.data.world import motion_fidelity, moves_as_captioned, short_caption

    attributes = [parse_caption(caption) for caption in captions]
    shorts = [short_caption(a) for a in attributes]
    frame_indices = scorer.select_frames(frames.shape[2])
    with torch.no_grad():
        _, scores = scorer(frames[:, :, frame_indices], frame_indices, captions, shorts)
    directions = [a.direction for a in attributes]
    backgrounds = [a.background for a in attributes]
    return {
        "image_reward": scores["image"],
        "video_reward": scores["video"],
        "motion_fidelity": motion_fidelity(frames, directions, backgrounds),
        "moves_as_captioned": moves_as_captioned(frames, directions, backgrounds),
    }


def summarise_scores(scores: dict[str, torch.Tensor]) -> dict[str, float | int | None]:
    """Means over the clips; `moves_as_captioned` is the share of the clips whose caption names a
    direction (None when none does), and `clips_with_direction` their count."""
    follows = scores["moves_as_captioned"]
    moving = follows[~follows.isnan()]
    summary = {k: float(v.mean()) for k, v in scores.items() if k != "moves_as_captioned"}
    summary["moves_as_captioned"] = float(moving.mean()) if len(moving) else None
    summary["clips_with_direction"] = len(moving)
    return summary


def _plot_curves(results: dict[str, VariantResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss_cd", "consistency distillation loss"), ("reward_image", "image reward"), ("reward_video", "video reward")]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for axis, (key, title) in zip(axes, panels):
        for result in results.values():
            points = [(row["step"], row[key]) for row in result.history if key in row]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=result.label)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:  # reward panels stay empty for students without rewards
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = (
        "| model | steps | PSNR vs teacher (dB) | image reward | video reward | motion fidelity | moves as captioned "
        "| s / clip |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for label, m in rows:
        psnr = "—" if m.get("psnr_vs_teacher") is None else f"{m['psnr_vs_teacher']:.2f}"
        follows = "—" if m["moves_as_captioned"] is None else (
            f"{round(m['moves_as_captioned'] * m['clips_with_direction'])}/{m['clips_with_direction']}"
        )
        lines.append(
            f"| {label} | {m['sampling_steps']} | {psnr} | {m['image_reward']:.4f} | {m['video_reward']:.4f} | "
            f"{m['motion_fidelity']:.3f} | {follows} | {m['seconds_per_clip']:.3f} |"
        )
    return header + "\n".join(lines) + "\n"


def run_demo(config: DemoConfig) -> Path:
    from t2v_turbo.pipeline import T2VTurboPipeline
    from t2v_turbo.preprocess import PreprocessConfig, preprocess
    from t2v_turbo.train import TrainConfig, train
    from t2v_turbo.video_io import write_gif_grid

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    models_dir = Path(config.models)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    teacher = T2VTurboPipeline.from_pretrained(models_dir, use_kernels=torch.cuda.is_available())
    image_model, video_model = _reward_models(models_dir)
    timings: dict[str, float] = {}

    # 1. The teacher pass and the motion priors.
    clock = time.perf_counter()
    cache_dir = output / "cache"
    preprocess(
        PreprocessConfig(
            cache=str(cache_dir),
            model=str(models_dir),
            num_frames=WORLD.num_frames,
            size=WORLD.frame_shape,
            batch_size=16,
            # float32 even on a GPU: preprocess casts the models it is handed in place, and these
            # also sample the teacher row and decode the reward path afterwards.
            dtype="float32",
            motion_grid_range=tuple(config.motion_grid_range),
            seed=config.seed,
            progress=config.progress,
        ),
        dataset=WorldDataset("train", size=config.train_clips, seed=config.seed, config=WORLD),
        models=(teacher.unet, teacher.vae, teacher.text_encoder),
    )
    timings["preprocess_s"] = time.perf_counter() - clock

    # 2. The four students, from the same cache and the same seed.
    results: dict[str, VariantResult] = {}
    student_dirs: dict[str, Path] = {}
    for variant in (v for v in VARIANTS if v.name in config.variants):
        clock = time.perf_counter()
        run_dir = output / "runs" / variant.name
        # The report is made anew each time; the variants train from step 0 (train refuses a
        # directory holding an earlier run's student).
        shutil.rmtree(run_dir, ignore_errors=True)
        train_config = TrainConfig(
            teacher=str(models_dir / "unet"),
            cache=str(cache_dir),
            output_dir=str(run_dir),
            max_steps=config.train_steps,
            batch_size=config.batch_size,
            lr=config.lr,
            motion_strength=config.motion_strength if variant.motion else 0.0,
            image_reward_weight=config.image_reward_weight,
            video_reward_weight=config.video_reward_weight,
            checkpoint_every=0,
            seed=config.seed,
            kernels="on" if torch.cuda.is_available() else "off",
            progress=config.progress,
        )
        mixture = training_mixture(image_model, video_model, config) if variant.rewards else None
        result = train(train_config, reward=mixture, vae=teacher.vae if variant.rewards else None)
        results[variant.name] = VariantResult(variant.label, result.history)
        student_dirs[variant.name] = result.student_dir
        timings[f"train_{variant.name}_s"] = time.perf_counter() - clock

    # 3. Sampling and scoring on held-out prompts.
    clock = time.perf_counter()
    eval_prompts = prompts("heldout", config.eval_prompts, seed=config.seed, config=WORLD)
    # preprocess placed the teacher's models on the accelerator; the students load on the CPU and
    # the reward models are where training left them (on the CPU when no variant used them).
    device = teacher.device
    scorer = evaluation_mixture(image_model, video_model).to(device)
    teacher_out = teacher.sample_teacher(
        eval_prompts, num_steps=config.teacher_steps, guidance_scale=config.guidance_scale + 1, seed=config.seed,
        progress=config.progress,
    )
    rows: list[tuple[str, dict[str, float]]] = []
    teacher_scores = score_samples(teacher_out.frames, eval_prompts, scorer)
    rows.append(
        (
            f"teacher (DDIM {config.teacher_steps} steps, CFG {config.guidance_scale + 1:g})",
            {
                "sampling_steps": config.teacher_steps,
                "psnr_vs_teacher": None,
                **summarise_scores(teacher_scores),
                "seconds_per_clip": teacher_out.timings["total_s"] / len(eval_prompts),
            },
        )
    )
    samples = {"teacher": teacher_out.frames}
    for name, student_dir in student_dirs.items():
        unet = checkpoint.from_pretrained(student_dir, use_kernels=torch.cuda.is_available())
        student = T2VTurboPipeline(
            unet, teacher.vae, teacher.text_encoder, fps=WORLD_FPS, defaults=teacher.defaults,
            use_kernels=torch.cuda.is_available(),
        ).to(device)
        variant = next(v for v in VARIANTS if v.name == name)
        out = student.generate(
            eval_prompts,
            num_steps=config.student_steps,
            guidance_scale=config.guidance_scale,
            motion_strength=config.motion_strength if variant.motion else 0.0,
            seed=config.seed,
            progress=config.progress,
        )
        scores = score_samples(out.frames, eval_prompts, scorer)
        metrics = {
            "sampling_steps": config.student_steps,
            "psnr_vs_teacher": float(_psnr(out.frames, teacher_out.frames).mean()),
            **summarise_scores(scores),
            "seconds_per_clip": out.timings["total_s"] / len(eval_prompts),
        }
        results[name].metrics = metrics
        rows.append((results[name].label + f", {config.student_steps} steps", metrics))
        samples[name] = out.frames
    timings["evaluate_s"] = time.perf_counter() - clock

    # 4. The report.
    gifs = output / "samples"
    gifs.mkdir(exist_ok=True)
    labels = ["teacher"] + [GIF_LABELS[name] for name in student_dirs]
    for index, prompt in enumerate(tqdm(eval_prompts, desc="report", disable=not config.progress)):
        # Enlarged (nearest neighbour) so a 32-pixel clip is wide enough to carry its label.
        clips = [
            F.interpolate(samples[key][index].transpose(0, 1), scale_factor=GIF_SCALE, mode="nearest")
            for key in ["teacher", *student_dirs]
        ]
        write_gif_grid(clips, gifs / f"prompt_{index:02d}.gif", labels=labels, fps=WORLD_FPS)
    _plot_curves(results, output / "curves.png")
    timings["total_s"] = time.perf_counter() - started
    table = _table(rows)
    (output / "results.json").write_text(
        json.dumps(
            {
                "config": asdict(config),
                "prompts": eval_prompts,
                "rows": [{"model": label, **m} for label, m in rows],
                "timings": timings,
                "device": str(teacher.device),
            },
            indent=2,
        )
        + "\n"
    )
    (output / "README.md").write_text(_report_text(config, eval_prompts, table, timings))
    return output


def _report_text(config: DemoConfig, eval_prompts: list[str], table: str, timings: dict[str, float]) -> str:
    prompt_lines = "\n".join(f"{i}. {p} (`samples/prompt_{i:02d}.gif`)" for i, p in enumerate(eval_prompts))
    timing_lines = "\n".join(f"- {name}: {value:.1f} s" for name, value in timings.items())
    return f"""# T2V-Turbo-v2 on the toy world

Teacher: the world's VC2-architecture UNet, {config.teacher_steps}-step DDIM with classifier-free guidance
{config.guidance_scale + 1:g} (classic scale; the students' w = {config.guidance_scale:g} in the LCM convention is the same guidance).
Students: 4-step consistency models distilled from it for {config.train_steps} steps of batch {config.batch_size}
on {config.train_clips} training clips (the same cache and seed for every row).

{table}
Columns: PSNR of the student's clip against the teacher's clip from the same prompt and seed
(higher: closer to the teacher); the toy image-text and video-text reward models' cosine scores;
motion fidelity (centroid track against the caption's direction, 1 = moves as captioned); of the
prompts that name a direction, how many clips move more the captioned way than the opposite way
(a sampler blind to the direction word gets about half); wall time per clip. Held-out prompts
(attribute combinations never seen in training):

{prompt_lines}

These numbers are measured, not asserted: at this scale (a few dozen clips, {config.train_steps}
optimizer steps, {len(eval_prompts)} prompts) differences between rows of a few hundredths are
within run-to-run noise. `curves.png` shows the distillation loss and the reward scores during training.

Timings:
{timing_lines}
"""


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole recipe on the toy world and write a report",
        description="Preprocess world clips with the shipped teacher (motion priors included), distil four 4-step "
        "students (CD, + rewards, + motion guidance, both), sample them and the 50-step teacher on held-out "
        "prompts, and write GIFs, curves and a table to --output-dir.",
    )
    for item in fields(DemoConfig):
        flag = "--" + item.name.replace("_", "-")
        described = dict(default=item.default, help=f"{FIELD_HELP[item.name]} (default: %(default)s)")
        if item.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **described)
        elif isinstance(item.default, tuple):
            parser.add_argument(flag, type=int, nargs=2, metavar=("LO", "HI"), **described)
        else:
            parser.add_argument(flag, type=type(item.default), **described)

    def run(args) -> int:
        config = DemoConfig(**{item.name: getattr(args, item.name) for item in fields(DemoConfig)})
        from t2v_turbo.cache import CacheMismatchError

        # Settings the demo cannot use end with error: (a bad flag, a missing models directory, a
        # cache in --output-dir made with other settings); errors of the run keep their traceback.
        try:
            config.validate()
        except ValueError as error:
            print(f"t2v-turbo demo: error: {error}", file=sys.stderr)
            return 2
        try:
            output = run_demo(config)
        except CacheMismatchError as error:
            print(f"t2v-turbo demo: error: {error}", file=sys.stderr)
            return 2
        print(f"report written to {output / 'README.md'}")
        return 0

    parser.set_defaults(handler=run)
