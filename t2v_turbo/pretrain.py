"""`t2v-turbo pretrain`: the toy world's models, trained from scratch on the world's clips.

The demo needs a teacher whose CFG samples follow captions and reward models that can tell a good
clip from a bad one, and no public weights can be downloaded here. This module trains, in order:
1. a tiny VAE (diffusers AutoencoderKL, 32x32 frames -> 4x8x8 latents), reconstruction + a small KL;
   its latent scaling factor is measured as 1/std of the training latents, as LDM's 0.18215 was;
2. the teacher: a VC2UNet (the project's VideoCrafter2 architecture at a small preset) on those
   latents, epsilon prediction on SPEC 1's schedule, captions embedded by the frozen MiniLM sentence
   encoder, the caption dropped 10% of the time so classifier-free guidance works, optionally with
   a ranking term that makes the loss under the direction-swapped caption exceed the true one's
   (`teacher_direction_ranking`); the weights kept are an exponential moving average;
3. the image-text and video-text reward models (rewards/toy.py), contrastively (symmetric InfoNCE).
Everything is seeded; `recipe.json` in the output records the command, seeds and final losses so
the shipped weights can be re-created.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from t2v_turbo import schedule
from t2v_turbo.data.world import WorldConfig, WorldDataset, swap_direction
from t2v_turbo.models.text_encoder import MiniLMTextEncoder, PromptCache
from t2v_turbo.models.vae import VideoVAE
from t2v_turbo.models.vc2_unet import VC2UNet
from t2v_turbo.rewards.toy import ToyImageReward, ToyVideoReward
from t2v_turbo.train import ema_update

WORLD = WorldConfig(num_frames=8, size=32)
WORLD_FPS = 8
WORLD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
}
WORLD_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "context_dim": 384,
    "time_cond_proj_dim": 256,
    "motion_cond_proj_dim": 256,
}
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-6
REWARD_DIRS = {"image": "rewards/image", "video": "rewards/video"}


@dataclass
class PretrainConfig:
    output_dir: str = "world-pretrain"
    seed: int = 0
    pool_size: int = 4096
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    teacher_steps: int = 2500
    teacher_batch: int = 8
    teacher_lr: float = 5e-4
    ema_decay: float = 0.999
    # Share of each teacher batch whose timestep is drawn from the noisier half of the schedule
    # (the rest uniformly from all of it). Layout and motion direction are settled there, where the
    # epsilon loss weighs an x0 error by only abar / (1 - abar), so a uniform draw gives them little
    # gradient.
    teacher_noisy_fraction: float = 0.0
    # Weight of a ranking term on the direction word (0: off). The plain epsilon loss barely rewards
    # using it (see teacher_direction_ranking); with this term, for every clip whose caption names a
    # direction, the loss under the caption with that word swapped must exceed the true caption's
    # loss by teacher_direction_margin (relative).
    teacher_direction_ranking: float = 0.0
    teacher_direction_margin: float = 0.05
    reward_steps: int = 400
    reward_batch: int = 64
    reward_lr: float = 1e-3
    threads: int = 0
    progress: bool = True
    # A directory an earlier pretrain wrote: its models are the starting point, the teacher trains
    # on from its weights, and a VAE or reward stage given 0 steps keeps the loaded model.
    init_from: str = ""

    def __post_init__(self) -> None:
        for name in ("vae_steps", "teacher_steps", "reward_steps", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("pool_size", "vae_batch", "teacher_batch", "reward_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_lr", "teacher_lr", "reward_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.teacher_noisy_fraction <= 1.0:
            raise ValueError(f"teacher_noisy_fraction must be in [0, 1], got {self.teacher_noisy_fraction}")
        if self.teacher_direction_ranking < 0 or self.teacher_direction_margin < 0:
            raise ValueError(
                "teacher_direction_ranking and teacher_direction_margin must be >= 0, got "
                f"{self.teacher_direction_ranking} and {self.teacher_direction_margin}"
            )


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def world_pool(size: int, seed: int, progress: bool = True) -> dict:
    """`size` training clips: frames (N, 3, F, H, W) in [-1, 1] and their captions."""
    dataset = WorldDataset("train", size=size, seed=seed, config=WORLD)
    items = [
        dataset[i] for i in tqdm(range(size), desc="rendering world clips", leave=False, disable=not progress)
    ]
    return {
        "frames": torch.stack([item["frames"] for item in items]),
        "caption": [item["caption"] for item in items],
        "short_caption": [item["short_caption"] for item in items],
    }


def _log(progress: tqdm, **values: float) -> None:
    progress.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)


def pretrain_vae(frames: Tensor, config: PretrainConfig, generator: torch.Generator) -> tuple[VideoVAE, dict]:
    vae = VideoVAE(WORLD_VAE_CONFIG)
    autoencoder = vae.autoencoder
    autoencoder.requires_grad_(True).train()
    images = frames.transpose(1, 2).flatten(0, 1)  # (N·F, 3, H, W)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=config.vae_lr)
    progress = tqdm(range(config.vae_steps), desc="VAE", disable=not config.progress)
    for _ in progress:
        batch = images[torch.randint(len(images), (config.vae_batch,), generator=generator)]
        posterior = autoencoder.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = autoencoder.decode(latents).sample
        recon_loss = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean() / batch[0].numel()
        loss = recon_loss + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log(progress, mse=recon_loss.item(), kl=kl.item())
    autoencoder.requires_grad_(False).eval()
    with torch.no_grad():
        sample = images[torch.randint(len(images), (512,), generator=generator)]
        latent_std = autoencoder.encode(sample).latent_dist.mean.std().item()
        recon_mse = F.mse_loss(autoencoder.decode(autoencoder.encode(sample).latent_dist.mean).sample, sample).item()
    autoencoder.register_to_config(scaling_factor=1.0 / latent_std)
    vae = VideoVAE(dict(autoencoder.config))
    vae.autoencoder.load_state_dict(autoencoder.state_dict())
    return vae, {"vae_reconstruction_mse": recon_mse, "vae_scaling_factor": 1.0 / latent_std}


def teacher_timesteps(batch: int, noisy_fraction: float, generator: torch.Generator) -> Tensor:
    """Training timesteps: uniform over the schedule, except that each one is, with probability
    `noisy_fraction`, uniform over its noisier half instead. With noisy_fraction 0 the generator is
    used exactly as a plain uniform draw, so earlier recipes reproduce."""
    t = torch.randint(schedule.NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    if noisy_fraction > 0:
        noisier = torch.rand(batch, generator=generator) < noisy_fraction
        t = torch.where(noisier, schedule.NUM_TRAIN_TIMESTEPS // 2 + t // 2, t)
    return t


def teacher_direction_ranking(loss_true: Tensor, loss_swapped: Tensor, margin: float) -> Tensor:
    """mean(relu((1 + margin) L_true - L_swapped)) / mean(L_true): zero once every clip's epsilon
    loss under its direction-swapped caption exceeds the loss under its true caption by `margin`
    (relative). Dividing by the batch's mean true loss (detached) makes the term a relative shortfall,
    whose size does not shrink as the epsilon loss falls during training.

    Why it exists: where the frames of z_t still show the motion, the caption's direction word is
    redundant, and where they do not, the epsilon loss weighs an x0 error by abar / (1 - abar), so
    the plain loss gives the direction word almost no gradient; the world's teacher trained 13k
    steps on it came out blind to the word (its loss under the swapped word within 0.2%). The
    ranking asks for exactly what classifier-free guidance amplifies: eps(z_t, c) closer to the true
    noise than eps(z_t, swapped c)."""
    scale = loss_true.detach().mean().clamp_min(torch.finfo(loss_true.dtype).tiny)
    return torch.relu((1 + margin) * loss_true - loss_swapped).mean() / scale


def pretrain_teacher(
    latents: Tensor,
    contexts: Tensor,
    empty_context: Tensor,
    config: PretrainConfig,
    generator: torch.Generator,
    initial: VC2UNet | None = None,
    swapped_contexts: Tensor | None = None,
) -> tuple[VC2UNet, dict]:
    """Epsilon-prediction training of the world teacher on the teacher path (no guidance or motion
    embedding), caption dropout for CFG, from `initial`'s weights when given. With
    config.teacher_direction_ranking > 0, `swapped_contexts` (each clip's caption with its direction
    word swapped, encoded) feed `teacher_direction_ranking` on the clips whose caption names a
    direction and was not dropped. Returns the EMA network."""
    ranking = config.teacher_direction_ranking > 0
    if ranking and (swapped_contexts is None or swapped_contexts.shape != contexts.shape):
        raise ValueError("swapped_contexts (shaped as contexts) are needed when teacher_direction_ranking > 0")
    names_direction = (swapped_contexts != contexts).flatten(1).any(dim=1) if ranking else None
    # Pretraining runs on the CPU whatever the machine has: plain PyTorch, so the world models
    # come out the same with or without a GPU.
    unet = VC2UNet(**WORLD_UNET_CONFIG, use_kernels=False)
    if initial is not None:
        unet.load_state_dict(initial.state_dict())
    ema = copy.deepcopy(unet).requires_grad_(False)
    abar = schedule.alphas_cumprod(torch.float32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.teacher_lr, weight_decay=0.0)
    warmup = max(1, config.teacher_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    unet.train()
    progress = tqdm(range(config.teacher_steps), desc="teacher", disable=not config.progress)
    running: dict[str, float] = {}
    for _ in progress:
        index = torch.randint(len(latents), (config.teacher_batch,), generator=generator)
        z0, context = latents[index], contexts[index].clone()
        dropped = torch.rand(len(index), generator=generator) < CAPTION_DROPOUT
        context[dropped] = empty_context
        t = teacher_timesteps(len(index), config.teacher_noisy_fraction, generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        per_clip = (unet(z_t, t, context, WORLD_FPS) - noise).square().mean(dim=(1, 2, 3, 4))
        loss = per_clip.mean()
        values = {"loss": loss.item()}
        ranked = None if names_direction is None else names_direction[index] & ~dropped
        if ranked is not None and bool(ranked.any()):
            swapped = unet(z_t[ranked], t[ranked], swapped_contexts[index[ranked]], WORLD_FPS) - noise[ranked]
            rank = teacher_direction_ranking(
                per_clip[ranked], swapped.square().mean(dim=(1, 2, 3, 4)), config.teacher_direction_margin
            )
            values["ranking"] = rank.item()
            loss = loss + config.teacher_direction_ranking * rank
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema_update(ema, unet, config.ema_decay)
        for name, value in values.items():
            running[name] = value if name not in running else 0.98 * running[name] + 0.02 * value
        _log(progress, **running)
    _zero_student_conditioning(ema)
    metrics = {"teacher_loss_ema": running.get("loss")}
    if "ranking" in running:
        metrics["teacher_direction_ranking_ema"] = running["ranking"]
    return ema.eval(), metrics


def _zero_student_conditioning(unet: VC2UNet) -> None:
    """The teacher path never uses the guidance and motion projections; zeroed, a student
    initialised from this teacher starts as the teacher whatever w and m it is given, and
    combine_proj (left random) still passes them gradient."""
    with torch.no_grad():
        unet.time_cond_proj.weight.zero_()
        unet.motion_cond_proj.weight.zero_()


def _info_nce(visual: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    logits = logit_scale.exp().clamp(max=100) * visual @ text.T
    labels = torch.arange(len(visual))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def pretrain_rewards(
    frames: Tensor,
    dense_sentences: Tensor,
    short_sentences: Tensor,
    config: PretrainConfig,
    generator: torch.Generator,
) -> tuple[ToyImageReward, ToyVideoReward, dict]:
    """Contrastive training: the image model on one random frame per clip against the short caption,
    the video model on the whole clip against the dense caption. Pixels are normalised to [-1, 1],
    what their preprocessing spec (mean 0.5, std 0.5) gives."""
    image_model, video_model = ToyImageReward(), ToyVideoReward(num_frames=WORLD.num_frames)
    metrics = {}
    for name, model, sentences in (("image", image_model, short_sentences), ("video", video_model, dense_sentences)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.reward_lr, weight_decay=1e-4)
        progress = tqdm(range(config.reward_steps), desc=f"{name} reward", disable=not config.progress)
        model.train()
        loss = None
        for _ in progress:
            index = torch.randint(len(frames), (config.reward_batch,), generator=generator)
            clips = frames[index].transpose(1, 2)  # (B, F, 3, H, W) in [-1, 1]
            if name == "image":
                frame = torch.randint(clips.shape[1], (len(index),), generator=generator)
                pixels = clips[torch.arange(len(index)), frame]
            else:
                pixels = clips
            loss = _info_nce(model.embed_visual(pixels), model.embed_sentences(sentences[index]), model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _log(progress, loss=loss.item())
        if loss is not None:
            metrics[f"{name}_reward_loss"] = loss.item()
        model.freeze()
    return image_model, video_model, metrics


def _to_half_storage(module: nn.Module) -> None:
    """Shipped weights are stored in float16 to fit the repository's size budget; loading upcasts."""
    module.half()


def pretrain(config: PretrainConfig) -> Path:
    """Trains every world model and writes a model directory (unet/, vae/, text_encoder/,
    pipeline.json: T2VTurboPipeline.from_pretrained reads it), rewards/image, rewards/video and
    recipe.json into config.output_dir."""
    from t2v_turbo.pipeline import GenerationDefaults, T2VTurboPipeline

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.time()
    output = Path(config.output_dir)
    generator = _seed_everything(config.seed)
    pool = world_pool(config.pool_size, config.seed, config.progress)
    text_encoder = MiniLMTextEncoder()
    cache = PromptCache(text_encoder)

    loaded = _load_world_models(config.init_from) if config.init_from else None
    if loaded is not None and config.vae_steps == 0:
        vae, metrics = loaded["vae"], {}
    else:
        vae, metrics = pretrain_vae(pool["frames"], config, generator)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk, sample=False) for chunk in pool["frames"].split(256)])
        contexts = torch.cat([cache.encode(chunk) for chunk in _chunks(pool["caption"], 256)])
        empty_context = cache.encode([""])[0]
        swapped_contexts = None
        if config.teacher_direction_ranking > 0:
            swapped = [swap_direction(caption) for caption in pool["caption"]]
            swapped_contexts = torch.cat([cache.encode(chunk) for chunk in _chunks(swapped, 256)])
    teacher, teacher_metrics = pretrain_teacher(
        latents, contexts, empty_context, config, generator, initial=None if loaded is None else loaded["unet"],
        swapped_contexts=swapped_contexts,
    )
    metrics.update(teacher_metrics)
    with torch.no_grad():
        dense = torch.cat([text_encoder.pooled(chunk) for chunk in _chunks(pool["caption"], 256)])
        short = torch.cat([text_encoder.pooled(chunk) for chunk in _chunks(pool["short_caption"], 256)])
    if loaded is not None and config.reward_steps == 0:
        image_model, video_model = loaded["image"], loaded["video"]
    else:
        image_model, video_model, reward_metrics = pretrain_rewards(pool["frames"], dense, short, config, generator)
        metrics.update(reward_metrics)

    defaults = GenerationDefaults(num_frames=WORLD.num_frames, height=WORLD.frame_shape[0], width=WORLD.frame_shape[1])
    pipeline = T2VTurboPipeline(teacher, vae, text_encoder, fps=WORLD_FPS, defaults=defaults)
    for module in (teacher, vae, image_model, video_model):
        _to_half_storage(module)
    pipeline.save_pretrained(output)
    image_model.save_pretrained(output / REWARD_DIRS["image"])
    video_model.save_pretrained(output / REWARD_DIRS["video"])
    recipe = {
        "command": command_line(config),
        "config": asdict(config),
        "world": asdict(WORLD),
        "torch": torch.__version__,
        "minutes": round((time.time() - started) / 60, 1),
        "metrics": metrics,
    }
    if loaded is not None:
        recipe["continues"] = loaded["recipe"]
    (output / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return output


def _check_world_directory(directory: Path) -> Path:
    """The recipe.json of a directory an earlier pretrain wrote; FileNotFoundError otherwise."""
    recipe_path = directory / "recipe.json"
    if not recipe_path.is_file():
        raise FileNotFoundError(f"init_from: {directory} holds no recipe.json (not a directory pretrain wrote)")
    return recipe_path


def _load_world_models(directory: str) -> dict:
    """The models and recipe an earlier pretrain wrote into `directory`, in float32."""
    from t2v_turbo.pipeline import T2VTurboPipeline
    from t2v_turbo.rewards.toy import load_toy_reward

    directory = Path(directory)
    recipe_path = _check_world_directory(directory)
    pipeline = T2VTurboPipeline.from_pretrained(directory, use_kernels=False)
    return {
        "unet": pipeline.unet.float(),
        "vae": pipeline.vae.float(),
        "image": load_toy_reward(directory / REWARD_DIRS["image"]),
        "video": load_toy_reward(directory / REWARD_DIRS["video"]),
        "recipe": json.loads(recipe_path.read_text()),
    }


def command_line(config: PretrainConfig) -> str:
    """The `t2v-turbo pretrain` invocation that reproduces `config`."""
    defaults = asdict(PretrainConfig())
    flags = [
        f"--{name.replace('_', '-')} {value}" if not isinstance(value, bool) else f"--{'' if value else 'no-'}{name.replace('_', '-')}"
        for name, value in asdict(config).items()
        if value != defaults[name] and name != "progress"
    ]
    return " ".join(["t2v-turbo pretrain", *flags])


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


PRETRAIN_HELP = {
    "output_dir": "the model directory to write",
    "seed": "seed of the world clips and of every draw",
    "pool_size": "training clips rendered from the world",
    "vae_steps": "VAE optimizer steps (0 with --init-from: keep its VAE)",
    "vae_batch": "frames a VAE step",
    "vae_lr": "VAE learning rate",
    "teacher_steps": "teacher optimizer steps (0 with --init-from: keep its teacher)",
    "teacher_batch": "clips a teacher step",
    "teacher_lr": "teacher learning rate (warmed up over the first 5%% of steps)",
    "ema_decay": "decay of the teacher's EMA, which is the saved teacher",
    "teacher_noisy_fraction": "share of each teacher batch with timesteps from the noisier half",
    "teacher_direction_ranking": "weight of the ranking term on the direction word (0: off)",
    "teacher_direction_margin": "relative margin of that ranking term",
    "reward_steps": "steps of each toy reward model (0 with --init-from: keep its rewards)",
    "reward_batch": "clips a reward step",
    "reward_lr": "reward models' learning rate",
    "threads": "torch intra-op threads (0: torch's default)",
    "progress": "show progress bars",
    "init_from": "a directory an earlier pretrain wrote, to continue from",
}


def add_pretrain_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train the toy world's VAE, teacher and reward models from scratch",
        description="Train, from nothing but the procedural world, the models the demo distils from: a tiny VAE, "
        "the VC2-architecture teacher and the image-text and video-text reward models. Writes a model directory "
        "that `generate` and `demo` read, and recipe.json with the seeds and losses.",
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=PRETRAIN_HELP[name])
        else:
            parser.add_argument(flag, type=type(value), default=value, help=PRETRAIN_HELP[name])

    def run(args) -> int:
        try:
            config = PretrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
            if config.init_from:
                _check_world_directory(Path(config.init_from))
        except (ValueError, FileNotFoundError) as error:
            print(f"t2v-turbo pretrain: error: {error}", file=sys.stderr)
            return 2
        output = pretrain(config)
        print(f"wrote the world models to {output}")
        return 0

    parser.set_defaults(handler=run)
