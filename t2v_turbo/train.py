"""Consistency distillation of the T2V-Turbo-v2 student from the teacher cache (SPEC 3 and 5).

One training step, per sample of the cache: w ~ U[w_min, w_max]; m = motion_strength for motion
clips on the noisier half of the grid (n >= 100), else 0; the student's one-step output
f_theta = consistency_output(z_t, eps_theta, t_hi); the teacher's guided DDIM step from the cached
eps_c, eps_u and score (no teacher UNet); the self-target, the online student (or its EMA) under
no_grad at t_lo with the same w and m; pseudo-Huber (or L2) loss; optionally minus the reward
mixture's weighted total on VAE-decoded frames of f_theta. `accelerate` drives devices, processes
and mixed precision.

Reproducibility: the data order is a seeded permutation per epoch, w is drawn for the whole global
batch from a generator seeded by (seed, step), and checkpoints hold every RNG state, so a run
resumed from a checkpoint continues bit for bit (on the CPU) and one process with batch B·P makes
the same update as P processes with batch B each (up to the reduction order).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

import turbo_kernels
from t2v_turbo import schedule
from t2v_turbo.cache import MODELS_HANDED_IN_KEY, PREPROCESS_HINT, TeacherCache, collate_samples
from t2v_turbo.data.videos import default_manifest
from t2v_turbo.models import VC2UNet
from t2v_turbo.models import checkpoint as unet_checkpoint
from t2v_turbo.models.adapter import NoisePredictor
from t2v_turbo.pipeline import UNET_DIR, set_vae_kernels
from t2v_turbo.files import make_readable, uncreatable_reason, write_atomically
from turbo_kernels import MOTION_FORMS

logger = logging.getLogger(__name__)

# Motion guidance applies on the noisier half of the 200-step grid (SPEC 3.2).
MOTION_GRID_START = schedule.DDIM_GRID_STEPS // 2
PRESETS = ("tiny", "vc2")
LOSSES = ("huber", "l2")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
FP16_SMALLEST_SUBNORMAL = 2.0**-24
KERNEL_SWITCHES = ("on", "off")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Layers that the teacher does not have (SPEC 1): with LoRA they are trained in full. The first
# three are VC2UNet's; diffusers' UNet3DConditionModel takes the guidance embedding through
# time_embedding.cond_proj.
CONDITIONING_LAYERS = ("time_cond_proj", "motion_cond_proj", "combine_proj", "time_embedding.cond_proj")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.csv"
STUDENT_NAME = "student"


@dataclass
class TrainConfig:
    """Everything a training run reads. Load with `TrainConfig.load(file, overrides)`."""

    preset: str = "tiny"
    # A save_pretrained VC2UNet directory or a diffusers UNet3DConditionModel one; None: random init from the preset.
    teacher: Optional[str] = None
    cache: Optional[str] = None
    # What the cache must have been built from (`t2v-turbo preprocess --data`); None: not checked.
    # Training reads only the cache.
    data: Optional[str] = None
    vae: Optional[str] = None  # for the reward path, when no VAE object is handed to train()
    output_dir: str = "runs/train"
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    max_steps: int = 100
    batch_size: int = 1  # per process
    lr: float = 1e-5
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = True  # bitsandbytes AdamW8bit when installed and on CUDA; else AdamW, with a warning
    grad_clip: float = 1.0
    w_min: float = 5.0
    w_max: float = 15.0
    motion_strength: float = 0.05  # must be 0 for a student without motion conditioning (a diffusers UNet)
    motion_form: str = "release"
    huber_c: float = 1e-3
    loss: str = "huber"
    ema_decay: Optional[float] = None  # None: the online student is its own target (the release)
    # Weights of the reward mixture, relative to the distillation loss: the release's effective
    # weights (SPEC 3.7). The mixture applies them; the loop subtracts its weighted total.
    image_reward_weight: float = 0.2
    video_reward_weight: float = 0.5 * 2 / 6
    # 0: every process scores its samples with the whole mixture. k >= 1: the release's split
    # (SPEC 3.7): the last k processes score only the video reward and skip L_CD, the others
    # compute L_CD and the image rewards; the weights stay the effective ones.
    video_reward_processes: int = 0
    decode_chunk_size: int = 8
    temporal_conv_dropout: float = 0.1
    # None: what `accelerate launch` sets (its --mixed_precision, or the file `accelerate config`
    # wrote), else "no".
    mixed_precision: Optional[str] = None
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # 0: full fine-tune
    cpu: bool = False  # force the CPU even when a GPU is present
    checkpoint_every: int = 500
    keep_last: int = 3
    seed: int = 0
    kernels: str = "on"
    log_every: int = 1
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choices = {
            "preset": PRESETS, "loss": LOSSES, "mixed_precision": (None, *MIXED_PRECISIONS),
            "motion_form": MOTION_FORMS, "kernels": KERNEL_SWITCHES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_steps", "batch_size", "keep_last", "log_every", "decode_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "lora_rank", "num_workers", "lr_warmup_steps", "video_reward_processes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        floats = [f.name for f in dataclasses.fields(self) if f.type in ("float", "Optional[float]")]
        not_finite = [name for name in floats if getattr(self, name) is not None and not math.isfinite(getattr(self, name))]
        if not_finite:
            raise ValueError(f"{', '.join(not_finite)} must be finite, got {[getattr(self, n) for n in not_finite]}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must lie in [0, 2**64) (torch's generators take no other), got {self.seed}")
        if not self.w_min <= self.w_max:
            raise ValueError(f"w_min must be <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None, got {self.ema_decay}")
        if not 0.0 <= self.temporal_conv_dropout < 1.0:
            raise ValueError(f"temporal_conv_dropout must lie in [0, 1), got {self.temporal_conv_dropout}")
        for name in ("lr", "huber_c", "grad_clip", "adam_epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping; values are converted to each field's type (so "1e-5" works)."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
        """Reads a .yaml/.yml/.toml file (when given), then applies overrides: a mapping or `key=value` strings."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_config_file(Path(path)))
        if isinstance(overrides, Mapping):
            values.update(overrides)
        else:
            values.update(parse_overrides(overrides))
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        if path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(path.read_text()) or {}
        elif path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        else:
            raise ValueError(f"config file {path}: expected a .yaml, .yml or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"config file {path} does not parse: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
    return values


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: value}; values are parsed as YAML scalars."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: the value does not parse as YAML ({error})") from None
    return values


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the type of config field `name` (hint), or a ValueError naming the field."""
    optional = type(None) in typing.get_args(hint)
    base = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name} must not be empty")
    try:
        if base is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "on", "off", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return lowered in ("true", "on", "yes", "1")
            return bool(value)
        if base is int:
            # YAML reads `true` as a bool, which int() would take as 1.
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str and isinstance(value, bool):
            # YAML 1.1 reads on/off/no as booleans: `kernels: on` means the string "on",
            # `mixed_precision: no` the string "no".
            if name == "mixed_precision" and not value:
                return "no"
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", str: "a string"}.get(base, getattr(base, "__name__", base))
        raise ValueError(f"{name} must be {kind}, got {value!r}") from None


class RewardMixture(Protocol):
    """What train() asks of the reward mixture (t2v_turbo.rewards)."""

    def select_frames(self, num_frames: int, generator: torch.Generator) -> list[int]: ...

    def __call__(
        self, frames: Tensor, frame_indices: Sequence[int], captions: Sequence[str], short_captions: Sequence[str]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


# Reduced with each step's loss terms: how many processes were asked to stop (SIGINT, SIGTERM).
STOP_REQUESTS = "stop_requests"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM ask the run to stop after a whole
    step, with a checkpoint: a cluster's preemption notice or a Ctrl-C loses no step. The first
    one hands both signals back to their previous handlers, so a second SIGINT stops at once (as
    KeyboardInterrupt) and a second SIGTERM as it would have. A signal that was ignored (a run
    started in the background) or handled outside Python stays as it was. A process stuck in C
    code (a collective whose peer died) runs no Python handler: SIGKILL ends it."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                handler = signal.getsignal(signum)
                if handler is not None and handler is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        self._restore()
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(Ctrl-C again stops at once)", file=sys.stderr)


def _ignore_stop_signals(worker_id: int) -> None:
    """A data loader worker leaves SIGINT and SIGTERM to the main process, which stops the run
    between steps; a worker that died of them would end it mid-step (spawn and forkserver workers
    do not inherit the main process's handlers)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class NonFiniteLossError(RuntimeError):
    """A loss term went NaN or inf; the last good state was checkpointed before this was raised."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed, counting those before a resume
    losses: list[float]  # total loss of each step this call ran (mean over processes)
    student_dir: Path
    last_checkpoint: Optional[Path]
    metrics_path: Path
    history: list[dict[str, float]] = field(default_factory=list)  # every logged row of this call


# ---- data order -------------------------------------------------------------------------------


def _step_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepBatchSampler(Sampler[list[int]]):
    """This process's sample indices for steps start_step .. max_steps - 1.

    Epoch e visits the cache in the order torch.randperm(N) under seed (seed, e), in global batches
    of batch_size·num_processes (the tail that does not fill one is dropped); process r takes its
    slice of each. The order is a function of (seed, epoch, step) alone, so resuming at a step
    skips exactly the consumed batches."""

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, start_step: int, max_steps: int,
        process_index: int = 0, num_processes: int = 1,
    ):
        self.global_batch = batch_size * num_processes
        if num_samples < self.global_batch:
            raise ValueError(
                f"the cache holds {num_samples} samples, fewer than one global batch "
                f"(batch_size {batch_size} x {num_processes} processes)"
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.process_index = process_index
        self.steps_per_epoch = num_samples // self.global_batch

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a step."""
        return divmod(step, self.steps_per_epoch)

    def _permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(_step_seed(self.seed, 0, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, permutation = None, None
        for step in range(self.start_step, self.max_steps):
            step_epoch, batch = self.position(step)
            if step_epoch != epoch:
                epoch, permutation = step_epoch, self._permutation(step_epoch)
            start = batch * self.global_batch + self.process_index * self.batch_size
            yield permutation[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(self.max_steps - self.start_step, 0)


def draw_guidance_scales(config: TrainConfig, step: int, global_batch: int, process_index: int) -> Tensor:
    """w ~ U[w_min, w_max] for this process's samples of a step, drawn for the whole global batch
    from a generator seeded by (seed, step)."""
    generator = torch.Generator().manual_seed(_step_seed(config.seed, 1, step))
    w = torch.rand(global_batch, generator=generator, dtype=torch.float64) * (config.w_max - config.w_min) + config.w_min
    return w[process_index * config.batch_size : (process_index + 1) * config.batch_size].float()


# The cache fields a step reads on the host: their values pick timesteps and strengths.
HOST_FIELDS = ("grid_index", "use_motion")


def motion_strengths(grid_index: Tensor, use_motion: Tensor, strength: float) -> Tensor:
    """m of SPEC 3.2: `strength` for motion clips whose grid index lies in the noisier half, else 0."""
    on = use_motion.bool() & (grid_index >= MOTION_GRID_START)
    return torch.where(on, strength, 0.0).float()


# ---- the step ---------------------------------------------------------------------------------


@dataclass
class StepOutput:
    loss_cd: Tensor
    f_theta: Tensor


def student_prediction(
    student: nn.Module, batch: Mapping[str, Tensor], w: Tensor, m: Tensor, alphas_cumprod: Tensor,
    fps: int | Tensor = schedule.DEFAULT_FPS,
) -> Tensor:
    """f_theta, the student's one-step prediction of z_0 from the cached z_t at t_hi (SPEC 3.3)."""
    z_t = batch["z_t"].float()
    t_hi = schedule.solver_timesteps(batch["grid_index"])[0].to(z_t.device, non_blocking=True)
    predictor = NoisePredictor(student)
    # The UNet returns a (B, F, C, h, w)-ordered view; the solver kernels stream one shared layout.
    eps_theta = predictor(z_t, t_hi, batch["context"].float(), fps, guidance=w.to(z_t.device), motion=m.to(z_t.device))
    return turbo_kernels.consistency_output(z_t, eps_theta.float().contiguous(), t_hi, alphas_cumprod)


def distillation_loss(
    student: nn.Module, target_net: nn.Module, batch: Mapping[str, Tensor], w: Tensor, m: Tensor,
    alphas_cumprod: Tensor, config: TrainConfig, fps: int | Tensor = schedule.DEFAULT_FPS,
) -> StepOutput:
    """L_CD of SPEC 3.3-3.6 for a batch of cached samples (tensors on the model's device, but
    grid_index best on the host: its timesteps are looked up and checked there without a wait).
    student and target_net: VC2UNets or diffusers UNet3DConditionModels (possibly wrapped by
    DDP / peft), called through NoisePredictor; fps: the fps conditioning the cache was made with."""
    z_t = batch["z_t"].float()
    context = batch["context"].float()
    t_hi, t_lo = (t.to(z_t.device, non_blocking=True) for t in schedule.solver_timesteps(batch["grid_index"]))
    w, m = w.to(z_t.device), m.to(z_t.device)
    f_theta = student_prediction(student, batch, w, m, alphas_cumprod, fps)
    with torch.no_grad():
        z_lo, _ = turbo_kernels.guided_solver_step(
            z_t, batch["eps_cond"].float(), batch["eps_uncond"].float(), t_hi, t_lo, w, alphas_cumprod,
            score=batch["score"].float(), motion_scale=m, motion_form=config.motion_form,
        )
        eps_target = NoisePredictor(target_net)(z_lo, t_lo, context, fps, guidance=w, motion=m).float().contiguous()
        target = turbo_kernels.consistency_output(z_lo, eps_target, t_lo, alphas_cumprod)
    if config.loss == "huber":
        loss = turbo_kernels.pseudo_huber_loss(f_theta, target, config.huber_c)
    else:
        loss = F.mse_loss(f_theta, target)
    return StepOutput(loss, f_theta)


# ---- model setup ------------------------------------------------------------------------------


def build_student(config: TrainConfig) -> nn.Module:
    """The student in float32 (master weights): the teacher's weights (a VC2UNet directory or a
    diffusers UNet3DConditionModel one, told apart by its config.json), or a seeded random init.
    Whatever is drawn (a random preset, layers a diffusers teacher lacks) comes from config.seed
    alone, so every process builds the same student: FSDP shards it without a broadcast."""
    use_kernels = config.kernels == "on"
    # The CPU generator only (torch.manual_seed would also reseed every GPU's, which fork_rng(devices=[])
    # does not restore, and leave the same dropout draws on every process).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(config.seed)
        if config.teacher is not None:
            student = unet_checkpoint.load_unet_dir(config.teacher, use_kernels=use_kernels)
        else:
            student = VC2UNet.preset(config.preset, use_kernels=use_kernels)
    for module in student.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = config.temporal_conv_dropout
    return student.float().train()


def apply_lora(student: nn.Module, rank: int, seed: int) -> nn.Module:
    """peft LoRA on LORA_TARGETS, the CONDITIONING_LAYERS trained in full; the adapters' random
    init drawn from `seed` alone, the same on every process."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), modules_to_save=list(CONDITIONING_LAYERS)
    )
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # the CPU's only, as in build_student
        return get_peft_model(student, lora)


def _make_optimizer(parameters, config: TrainConfig, device: torch.device, sharded: bool = False) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    if config.use_8bit_adam:
        if sharded:
            # bitsandbytes' 8-bit states are not known to work on FSDP2's sharded parameters.
            _warn_once("use_8bit_adam is set but the run shards its optimizer state with FSDP: using torch.optim.AdamW")
        elif device.type != "cuda":
            _warn_once(f"use_8bit_adam is set but the device is {device.type}, not CUDA: using torch.optim.AdamW")
        else:
            try:
                import bitsandbytes
            except ImportError:
                _warn_once("use_8bit_adam is set but bitsandbytes is not installed: using torch.optim.AdamW")
            else:
                return bitsandbytes.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _warmup_factor(warmup_steps: int, step: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


# ---- checkpoints ------------------------------------------------------------------------------


def _trainable_state(model: nn.Module, lora: bool) -> dict[str, Tensor]:
    if lora:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def _load_trainable_state(model: nn.Module, state: dict[str, Tensor], lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise KeyError(f"adapter weights do not match the model: unexpected {result.unexpected_keys[:20]}")
    else:
        model.load_state_dict(state)


def _rng_state() -> tuple[dict[str, Tensor], dict[str, str]]:
    python_version, python_internal, python_gauss = random.getstate()
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(python_internal, dtype=torch.int64),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    metadata = {
        "python": json.dumps([python_version, python_gauss]),
        "numpy": json.dumps([numpy_kind, int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)]),
    }
    return tensors, metadata


def _set_rng_state(tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    python_version, python_gauss = json.loads(metadata["python"])
    random.setstate((python_version, tuple(tensors["python"].tolist()), python_gauss))
    numpy_kind, numpy_pos, numpy_has_gauss, numpy_gauss = json.loads(metadata["numpy"])
    np.random.set_state((numpy_kind, tensors["numpy"].numpy().astype(np.uint32), numpy_pos, numpy_has_gauss, numpy_gauss))
    cuda_states = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first (temporary directories are ignored)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        path for path in output_dir.iterdir()
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit()
        and (path / STATE_NAME).is_file()
    ]
    return sorted(found, key=_checkpoint_step)


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory `resume` names: "latest" (None when there is none yet) or a path."""
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no {STATE_NAME})")
    return path


def reward_role(process_index: int, num_processes: int, video_processes: int) -> str:
    """"video" for the last `video_processes` of `num_processes` processes (they score only the
    video reward), "main" for the others (L_CD and the image rewards; all of them when 0)."""
    return "video" if process_index >= num_processes - video_processes else "main"


ROLE_KINDS = {"main": ("image",), "video": ("video",)}


def video_reward_scale(num_processes: int, video_processes: int) -> float:
    """What a video process multiplies its reward by so that DDP's mean over processes gives it
    its configured weight relative to L_CD: L_CD is averaged over num_processes - video_processes
    processes' samples, the video reward over video_processes' (0.5 = 1/6 · 6/2 for the release)."""
    return (num_processes - video_processes) / video_processes


def check_distribution(accelerator) -> bool:
    """Whether the run shards the student and its optimizer state across processes (FSDP2); such
    runs save and load whole state dicts gathered through torch.distributed.checkpoint. FSDP1,
    DeepSpeed and Megatron-LM shard in ways the checkpoints here do not handle: they stop before
    training instead of writing checkpoints that cannot resume."""
    from accelerate.utils import DistributedType

    refused = {getattr(DistributedType, name, None) for name in ("DEEPSPEED", "MEGATRON_LM")} - {None}
    if accelerator.distributed_type in refused:
        raise NotImplementedError(
            f"t2v-turbo train does not support {accelerator.distributed_type.value}: choose data parallelism (DDP) or "
            "FSDP version 2 in `accelerate config`"
        )
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not getattr(accelerator, "is_fsdp2", False):
        raise NotImplementedError(
            "t2v-turbo train does not support FSDP version 1: set fsdp_version: 2 in `accelerate config` (or "
            "--fsdp_version 2 for `accelerate launch`)"
        )
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    policy = accelerator.state.fsdp_plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is size_based_auto_wrap_policy:
        # accelerate's FSDP2 size-based policy also picks ModuleList containers, which fully_shard refuses.
        raise ValueError(
            "fsdp_auto_wrap_policy SIZE_BASED_WRAP does not work with FSDP2 on these UNets (it shards "
            "ModuleList containers): choose TRANSFORMER_BASED_WRAP (VC2UNet names its blocks) or NO_WRAP"
        )
    return True


def _whole_state_options(**options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


class _Trainer:
    """The state of one run: models, optimizer, data position, logging."""

    def __init__(self, config: TrainConfig, reward, vae, accelerator):
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
        self.sharded = check_distribution(self.accelerator)
        if self.accelerator.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision {self.accelerator.mixed_precision!r} (from accelerate launch) is not "
                             f"supported: use one of {MIXED_PRECISIONS}")
        if self.accelerator.mixed_precision == "fp16" and not self.accelerator.native_amp:
            raise ValueError(f"mixed_precision=fp16 needs a GPU: on {self.accelerator.device.type} accelerate runs neither "
                             "fp16 autocast nor a loss scaler, so the run would be float32; use bf16 or no")
        if self.sharded and config.ema_decay is not None:
            raise ValueError("ema_decay is not supported with FSDP (the EMA target would be a whole network on every "
                             "process): set ema_decay=null or train with DDP")
        self.output_dir = Path(config.output_dir)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.role, self.reward_scale = self._reward_split(config)
        if reward is not None and config.video_reward_processes:
            if not callable(getattr(reward, "subset", None)):
                raise TypeError("video_reward_processes splits the reward by model kind: pass a "
                                f"t2v_turbo.rewards.RewardMixture, not a {type(reward).__name__}")
            if vae is None and config.vae is None:  # checked here, on every process, before the split
                raise ValueError("a reward mixture needs a VAE: pass vae= or set config.vae")
            reward = reward.subset(ROLE_KINDS[self.role])
        self.reward = reward
        if isinstance(reward, nn.Module):
            reward.to(self.device)
        self.term_names = self._split_term_names() if config.video_reward_processes else None
        self.stop_signals = _StopSignals()
        # Dropout and other global draws differ per process; data order and w do not (see module doc).
        seed_all((config.seed + self.rank) % 2**64)  # the seed's range is the generators'

        if config.cache is None:
            raise ValueError(f"config.cache is not set: training reads a teacher cache; {PREPROCESS_HINT}")
        self.dataset = TeacherCache(config.cache)
        if config.teacher is not None and not Path(config.teacher).is_dir():
            raise FileNotFoundError(f"teacher: no UNet directory at {config.teacher} (a save_pretrained UNet, e.g. MODEL_DIR/unet)")
        check_cache_teacher(self.dataset.config, config)
        check_cache_data(self.dataset.config, config)
        check_cache_size(len(self.dataset), config, self.world)
        problem = uncreatable_reason(self.output_dir, directory=True)
        if problem:
            raise ValueError(f"output_dir: {problem}")
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.fps = int(self.dataset.config.get("fps", schedule.DEFAULT_FPS))
        self.lora = config.lora_rank > 0
        if self.lora and config.ema_decay is not None:
            raise ValueError("ema_decay is not supported with lora_rank > 0 (the EMA target is a full network)")
        student = build_student(config)
        self._check_student_fits(NoisePredictor(student))
        self.vae = self._reward_vae(vae)
        self.ema = None
        if config.ema_decay is not None:
            self.ema = copy.deepcopy(student).requires_grad_(False)
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if self.lora:
            student = apply_lora(student, config.lora_rank, config.seed)
        self.trainable_names = [name for name, p in student.named_parameters() if p.requires_grad]
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = _make_optimizer(trainable, config, self.device, self.sharded)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup_factor, config.lr_warmup_steps))
        # The scheduler stays unprepared: accelerate would step it once per process per step.
        self.model, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.scheduler = scheduler
        if self.ema is not None:
            self.ema.to(self.device)
        # The table preprocess built z_t with, so x0 is rebuilt from z_t with the same alpha.
        self.alphas_cumprod = schedule.release_alphas_cumprod(torch.float32, self.device)
        self.step = 0

    def _reward_split(self, config: TrainConfig) -> tuple[str, float]:
        """This process's role and the factor on its reward total (module doc, video_reward_processes)."""
        video = config.video_reward_processes
        if not video:
            return "main", 1.0
        if self.world <= video:
            raise ValueError(
                f"video_reward_processes={video} leaves no process for L_CD: the run has {self.world} process(es)"
            )
        if self.sharded:
            # Under FSDP every process must run the same forwards (each one all-gathers shards),
            # and the video processes skip the self-target's.
            raise ValueError("video_reward_processes does not work with FSDP: train with DDP or set it to 0")
        role = reward_role(self.rank, self.world, video)
        return role, video_reward_scale(self.world, video) if role == "video" else 1.0

    def _split_term_names(self) -> list[str]:
        """With split rewards, the loss terms logged, the same list on every process: the union of
        what each computes (its own terms only), agreed on once. Every process that scores the
        video reward must have a video model: one without stops them all."""
        from accelerate.utils import gather_object

        local = ["loss_cd"] if self.role == "main" else []
        if self.reward is not None:
            local += ["reward_total"] + [f"reward_{entry.name}" for entry in self.reward.entries]
        problem = None
        if self.role == "video" and self.reward is None:
            problem = f"process {self.rank} scores the video reward (video_reward_processes), but its mixture has no video model"
        gathered = gather_object([(local, problem)]) if self.world > 1 else [(local, problem)]
        problems = [p for _, p in gathered if p is not None]
        if problems:
            raise ValueError(problems[0])
        names = set().union(*(names for names, _ in gathered))
        order = ["loss_cd", "reward_total"]
        return [n for n in order if n in names] + sorted(names - set(order)) + ["loss"]

    def _check_student_fits(self, student: NoisePredictor) -> None:
        if not student.accepts_guidance:
            raise ValueError(f"the student ({type(student.network).__name__}) has no time_cond_proj_dim: it cannot "
                             "take the guidance embedding that consistency distillation conditions on")
        if not student.accepts_motion and self.config.motion_strength != 0:
            raise ValueError(
                f"motion_strength is {self.config.motion_strength}, but the student ({type(student.network).__name__}) "
                "has no motion conditioning: set motion_strength=0"
            )
        sample = self.dataset[0]
        channels, context_dim = student.in_channels, student.context_dim
        if sample["z_t"].shape[0] != channels or sample["context"].shape[-1] != context_dim:
            raise ValueError(
                f"cache {self.config.cache} holds latents with {sample['z_t'].shape[0]} channels and context width "
                f"{sample['context'].shape[-1]}; the student expects {channels} and {context_dim}"
            )

    def _reward_vae(self, vae):
        if self.reward is None:
            return None
        if vae is None:
            if self.config.vae is None:
                raise ValueError("a reward mixture needs a VAE: pass vae= or set config.vae")
            from t2v_turbo.models.vae import load_vae

            vae = load_vae(self.config.vae, gradient_checkpointing=self.config.gradient_checkpointing)
        set_vae_kernels(vae, self.config.kernels == "on")
        return vae.to(self.device).requires_grad_(False)

    @property
    def unwrapped(self) -> nn.Module:
        """The student itself: no DDP and no torch.compile wrapper (accelerate's dynamo_backend),
        keyed as the checkpoints and the saved student are."""
        # keep_torch_compile=True would rebind the compiled wrapper's _orig_mod to the bare student.
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def target_network(self) -> nn.Module:
        """What computes the self-target under no_grad: the EMA, else the bare online student
        (eager: outside DDP, which only the gradient-taking call needs, and outside its compiled
        wrapper, which accelerate compiles around DDP)."""
        return self.ema if self.ema is not None else self.unwrapped

    # -- checkpoints --

    def save_checkpoint(self, rng_state: tuple[dict[str, Tensor], dict[str, str]] | None = None) -> Path:
        """checkpoint-{step:06d}: weights (safetensors), optimizer and scheduler (torch.save, read
        back with weights_only=True), every process's RNG states (`rng_state`, an `_rng_state()`
        snapshot, instead of the current ones when given), the data position and fp16's loss
        scaler state."""
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        temporary = self.output_dir / f".{final.name}.tmp"
        accelerator = self.accelerator
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rng_tensors, rng_metadata = _rng_state() if rng_state is None else rng_state
        save_file(rng_tensors, str(temporary / f"rng-p{self.rank}.safetensors"), metadata=rng_metadata)
        # Every process's RNG file is in place before the main process publishes the directory.
        accelerator.wait_for_everyone()
        weights, optimizer_state = self._training_state()
        if accelerator.is_main_process:
            name = "adapter.safetensors" if self.lora else "model.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(temporary / name))
            if self.ema is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()},
                          str(temporary / "ema.safetensors"))
            torch.save(optimizer_state, temporary / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), temporary / "scheduler.pt")
            epoch, batch = self.sampler.position(self.step)
            state = {
                "step": self.step, "epoch": epoch, "batch_in_epoch": batch, "config": self.config.to_dict(),
                **self._resume_identity(),
            }
            if accelerator.scaler is not None:
                state["grad_scaler"] = accelerator.scaler.state_dict()
            (temporary / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
            for written in temporary.iterdir():
                make_readable(written)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            for old in checkpoint_dirs(self.output_dir)[: -self.config.keep_last]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def _training_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The weights a checkpoint keeps (only the trainable ones with LoRA) and the optimizer
        state, whole; with FSDP gathered from every process (call it on all of them), whole on the
        main process only."""
        if not self.sharded:
            return _trainable_state(self.unwrapped, self.lora), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        # With LoRA only the trainable parameters are gathered: the frozen base stays sharded.
        weights = get_model_state_dict(
            self.model, options=_whole_state_options(cpu_offload=True, ignore_frozen_params=self.lora)
        )
        if self.lora and weights:  # only the main process receives the whole state
            weights = {key: weights[name] for key, name in self._adapter_keys().items()}
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=_whole_state_options(cpu_offload=True))
        return weights, optimizer_state

    def _adapter_keys(self) -> dict[str, str]:
        """{key in peft's adapter format, as the unsharded path writes it: the trainable
        parameter's name}, from peft's own renaming of marker tensors."""
        from peft import get_peft_model_state_dict

        markers = {name: torch.tensor(index) for index, name in enumerate(self.trainable_names)}
        renamed = get_peft_model_state_dict(self.unwrapped, state_dict=markers)
        keys = {key: self.trainable_names[int(marker)] for key, marker in renamed.items()}
        unmapped = sorted(set(self.trainable_names) - set(keys.values()))
        if unmapped:
            raise RuntimeError(f"peft's adapter format leaves out trainable parameters {unmapped[:10]}")
        return keys

    def _load_training_state(self, weights: dict[str, Tensor], optimizer_state: dict[str, Any]) -> None:
        if not self.sharded:
            _load_trainable_state(self.unwrapped, weights, self.lora)
            self.optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.lora:
            names = self._adapter_keys()
            missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
            if missing or unexpected:
                raise KeyError(f"adapter weights do not match the model: missing {missing[:20]}, unexpected {unexpected[:20]}")
            weights = {names[key]: value for key, value in weights.items()}
        set_model_state_dict(self.model, weights, options=_whole_state_options(strict=not self.lora))
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=_whole_state_options())

    def _resume_identity(self) -> dict[str, Any]:
        """What a checkpoint records and a resumed run must find again to continue exactly: the
        seed, process count and batch size (the data order and draws), LoRA and sharding (the
        saved states' form), the cache (the data order is drawn over its samples) and whether an
        EMA target is kept (a checkpoint without one cannot give it its state)."""
        return {
            "seed": self.config.seed, "num_processes": self.world, "batch_size": self.config.batch_size,
            "lora": self.lora, "sharded": self.sharded, "cache_samples": len(self.dataset),
            "cache_config": self.dataset.config, "ema": self.ema is not None,
        }

    def load_checkpoint(self, path: Path) -> None:
        try:
            self._read_checkpoint(path)
        except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, pickle.UnpicklingError) as error:
            # Checkpoints are written atomically, so this one was damaged after it was written.
            raise ValueError(f"checkpoint {path} is unreadable ({error}); resume from another with --resume PATH") from None

    def _read_checkpoint(self, path: Path) -> None:
        state = json.loads((path / STATE_NAME).read_text())
        expected = self._resume_identity()
        # Checkpoints from before FSDP support are unsharded; those from before the cache was
        # recorded are taken at their word; whether one kept an EMA its config says.
        kept_ema = state.get("config", {}).get("ema_decay") is not None
        earlier = {"sharded": False, "ema": kept_ema, "cache_samples": expected["cache_samples"],
                   "cache_config": expected["cache_config"]}
        recorded = {**earlier, **state}
        differing = {k: (recorded.get(k), v) for k, v in expected.items() if recorded.get(k) != v}
        if differing:
            raise ValueError(f"cannot resume {path} exactly: (checkpoint, now) differ for {differing}")
        name = "adapter.safetensors" if self.lora else "model.safetensors"
        # With FSDP the whole states stay on the CPU: set_*_state_dict moves each process's shards.
        self._load_training_state(
            load_file(str(path / name)),
            torch.load(path / "optimizer.pt", map_location="cpu" if self.sharded else self.device, weights_only=True),
        )
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        rng_path = path / f"rng-p{self.rank}.safetensors"
        with safe_open(str(rng_path), framework="pt") as handle:
            metadata = handle.metadata()
        _set_rng_state(load_file(str(rng_path)), metadata)
        self.step = int(state["step"])

    # -- the loop --

    def run(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        self.sampler = StepBatchSampler(
            len(self.dataset), config.batch_size, config.seed, self.step, config.max_steps, self.rank, self.world
        )
        # The loader's own generator keeps its worker seeding off the global RNG, which resuming restores.
        loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=collate_samples, num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed), pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals,
        )
        logger = _MetricsLogger(self.output_dir, accelerator.is_main_process, self.step)
        progress = tqdm(
            total=config.max_steps, initial=self.step, desc="train",
            disable=not (config.progress and accelerator.is_main_process),
        )
        losses: list[float] = []
        last_checkpoint = checkpoint_dirs(self.output_dir)[-1] if checkpoint_dirs(self.output_dir) else None
        # "on" leaves the choice to turbo_kernels' dispatch; "off" forces the plain PyTorch references.
        kernels = turbo_kernels.backend("reference") if config.kernels == "off" else contextlib.nullcontext()
        try:
            with kernels, self.stop_signals:
                for batch in loader:
                    started = time.perf_counter()
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                    # A failed step has drawn from the RNGs (dropout): its checkpoint keeps them as before it.
                    rng_before_step = _rng_state()
                    try:
                        metrics = self.train_step(batch)
                    except NonFiniteLossError as error:
                        if not self._saved_at_this_step(last_checkpoint):
                            last_checkpoint = self.save_checkpoint(rng_before_step)
                        raise NonFiniteLossError(f"{error}; the last good state is in {last_checkpoint}") from None
                    self.step += 1
                    stop_requested = metrics.pop(STOP_REQUESTS) > 0
                    metrics["step_time"] = time.perf_counter() - started
                    if self.device.type == "cuda":
                        metrics["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
                    else:
                        metrics["max_rss_mib"] = max_rss_mib()
                    losses.append(metrics["loss"])
                    if self.step % config.log_every == 0 or self.step == config.max_steps:
                        logger.log(self.step, metrics)
                    progress.set_postfix(
                        {k: f"{v:.4g}" for k, v in metrics.items() if k in PROGRESS_COLUMNS or k.startswith("reward_")}
                    )
                    progress.update(1)
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        last_checkpoint = self.save_checkpoint()
                    # A stop in the last step lets the run finish (its checkpoint and student).
                    if stop_requested and self.step < config.max_steps:
                        # Written even with checkpoint_every=0: the run would otherwise be lost.
                        if not self._saved_at_this_step(last_checkpoint):
                            self.save_checkpoint()
                        raise KeyboardInterrupt
        finally:
            progress.close()
            logger.close()
        # The last steps too, so that a longer run can resume from where this one ended (a resumed
        # run with no step left to take writes nothing).
        if config.checkpoint_every and losses and not self._saved_at_this_step(last_checkpoint):
            last_checkpoint = self.save_checkpoint()
        student_dir = self.output_dir / STUDENT_NAME
        accelerator.wait_for_everyone()
        final = self._whole_student()
        if accelerator.is_main_process:
            if self.lora:
                final = copy.deepcopy(final).merge_and_unload()
            unet_checkpoint.save_unet_dir(final, student_dir)
        accelerator.wait_for_everyone()
        return TrainResult(self.step, losses, student_dir, last_checkpoint, logger.path, logger.history)

    def _saved_at_this_step(self, last_checkpoint: Optional[Path]) -> bool:
        return last_checkpoint is not None and _checkpoint_step(last_checkpoint) == self.step

    def _whole_student(self) -> nn.Module | None:
        """The trained student as one unsharded module on the main process (None on the others
        with FSDP, whose shards are gathered into a fresh copy: call it on every process)."""
        if not self.sharded:
            return self.unwrapped
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(self.model, options=_whole_state_options(cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        student = build_student(self.config)
        if self.lora:
            student = apply_lora(student, self.config.lora_rank, self.config.seed)
        student.load_state_dict(weights)
        return student

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step; NonFiniteLossError (before any update) when a loss term or the
        gradient is not finite on any process. With fp16's loss scaler a non-finite gradient is an
        overflow: the scaler skips the update and lowers its scale, and only a scale below
        FP16_SMALLEST_SUBNORMAL stops the run (_check_scale_usable)."""
        config, accelerator = self.config, self.accelerator
        # Copies from the host that wait for nothing queued (pinned by the loader on a GPU); the
        # grid indices and motion flags stay there, where the timesteps and motion strengths are
        # formed and checked without a synchronisation. The step's one read of the device is its
        # metrics, below.
        tensors = {
            k: v if k in HOST_FIELDS else v.to(self.device, non_blocking=True)
            for k, v in batch.items() if isinstance(v, Tensor)
        }
        w = draw_guidance_scales(config, self.step, config.batch_size * self.world, self.rank)
        m = motion_strengths(batch["grid_index"], batch["use_motion"], config.motion_strength)
        w, m = w.to(self.device, non_blocking=True), m.to(self.device, non_blocking=True)
        terms: dict[str, Tensor] = {}
        with accelerator.autocast():
            if self.role == "main":
                out = distillation_loss(
                    self.model, self.target_network, tensors, w, m, self.alphas_cumprod, config, self.fps
                )
                terms["loss_cd"] = total = out.loss_cd
                f_theta = out.f_theta
            else:
                f_theta = student_prediction(self.model, tensors, w, m, self.alphas_cumprod, self.fps)
                total = f_theta.new_zeros((), dtype=torch.float32)
            if self.reward is not None:
                reward_total, scores = self._reward(f_theta, batch)
                terms["reward_total"] = reward_total
                terms.update({f"reward_{name}": score.float().mean() for name, score in scores.items()})
                total = total - self.reward_scale * reward_total
        terms["loss"] = total
        reduced = self._reduce_terms(terms)
        self.optimizer.zero_grad(set_to_none=True)
        # The backward runs before the loss terms are read, so that the step reads the device once:
        # a non-finite term only makes the gradient non-finite, and nothing is updated before the read.
        accelerator.backward(total)
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        reduced["grad_norm"] = torch.as_tensor(grad_norm, device=self.device).float()
        metrics = self._read_metrics(reduced)
        grad_norm_value = metrics.pop("grad_norm")
        self._check_finite(metrics, "loss term")
        scaler = accelerator.scaler
        if scaler is None:
            self._check_finite({"grad_norm": grad_norm_value}, "gradient")
        metrics["grad_norm"] = grad_norm_value
        self.optimizer.step()
        # fp16: an overflowing gradient is the loss scaler's to handle. It skipped the update and
        # lowered its scale, and the schedule and the EMA skip the step with it.
        skipped = scaler is not None and self.optimizer.step_was_skipped
        if scaler is not None:
            metrics["loss_scale"] = scaler.get_scale()
        if skipped:
            self._check_scale_usable(metrics["loss_scale"], grad_norm_value)
            logger.info("step %d: gradient overflow in fp16, update skipped, loss scale now %g",
                        self.step + 1, metrics["loss_scale"])
        else:
            self.scheduler.step()
            if self.ema is not None:
                ema_update(self.ema, self.unwrapped, config.ema_decay)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _check_scale_usable(self, scale: float, grad_norm: float) -> None:
        """A gradient that stays non-finite however far the scaler lowers its scale is not an
        overflow: below fp16's smallest subnormal every scaled loss is 0, so stop there."""
        if scale < FP16_SMALLEST_SUBNORMAL:
            raise NonFiniteLossError(
                f"step {self.step + 1}: non-finite gradient grad_norm={grad_norm} with the fp16 loss scale down to "
                f"{scale:g}"
            )

    @staticmethod
    def _read_metrics(reduced: dict[str, Tensor]) -> dict[str, float]:
        """The step's values on the host, in one copy: on a GPU, the one wait of a step for the
        work queued before it (the ops' value checks aside, TURBO_KERNELS_VALIDATE)."""
        return dict(zip(reduced, torch.stack(list(reduced.values())).tolist()))

    def _reduce_terms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each term's mean over the processes that compute it (all of them, unless rewards are
        split: then over `term_names`), in one collective."""
        names = self.term_names or list(terms)
        zero = torch.zeros((), device=self.device)
        values = torch.stack([terms.get(name, zero).detach().float().to(self.device) for name in names])
        # Whether this process was asked to stop rides along, so that every process reads the
        # same verdict in the same step.
        host = [float(name in terms) for name in names] + [float(self.stop_signals.received is not None)]
        present = torch.tensor(host).to(self.device, non_blocking=True)
        reduced = self.accelerator.reduce(torch.cat([values, present]), "sum")
        sums, counts, stops = reduced.split([len(names), len(names), 1])
        return {**{name: sums[i] / counts[i] for i, name in enumerate(names)}, STOP_REQUESTS: stops[0]}

    def _check_finite(self, values: dict[str, float], what: str) -> None:
        # The values are already averaged over processes, so every process stops together.
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            shown = ", ".join(f"{name}={values[name]}" for name in bad)
            raise NonFiniteLossError(f"step {self.step + 1}: non-finite {what} {shown}")

    def _reward(self, f_theta: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed, 2, self.step))
        frame_indices = list(self.reward.select_frames(f_theta.shape[2], generator))
        decoded = self.vae.decode(f_theta, decode_chunk_size=self.config.decode_chunk_size, frame_indices=frame_indices)
        frames = (decoded.float() / 2 + 0.5).clamp(0, 1)
        total, scores = self.reward(frames, frame_indices, batch["caption"], batch["short_caption"])
        return total.float(), scores


def max_rss_mib() -> float:
    """The most resident memory this process has held so far, MiB (the memory figure of a run
    without CUDA, whose allocator keeps no statistics)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def ema_update(ema: nn.Module, online: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·online, parameter by parameter, in place."""
    with torch.no_grad():
        for target, source in zip(ema.parameters(), online.parameters()):
            target.lerp_(source.detach(), 1.0 - decay)


# What the progress bar shows of each logged step (peak_memory_mib on CUDA, max_rss_mib elsewhere).
# On the progress bar, besides every reward term (reward_total and one a model).
PROGRESS_COLUMNS = ("loss", "loss_cd", "step_time", "peak_memory_mib", "max_rss_mib")


class _MetricsLogger:
    """metrics.csv (always; rows past the resume step are dropped) and TensorBoard when installed."""

    BASE_COLUMNS = (
        "step", "loss", "loss_cd", "reward_total", "grad_norm", "lr", "step_time", "peak_memory_mib", "max_rss_mib",
    )

    def __init__(self, output_dir: Path, enabled: bool, start_step: int):
        self.path = output_dir / METRICS_NAME
        self.enabled = enabled
        self.history: list[dict[str, float]] = []
        self.columns: list[str] | None = None
        self.tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            with self.path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            kept = [row for row in rows if row.get("step") and int(row["step"]) <= start_step]
            self.columns = list(rows[0].keys()) if rows else None
            if self.columns:
                self._rewrite(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        columns = self.columns

        def write(temporary: Path) -> None:
            with temporary.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        write_atomically(self.path, write)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        if not self.enabled:
            return
        if self.columns is None:
            extra = sorted(set(metrics) - set(self.BASE_COLUMNS))
            self.columns = list(self.BASE_COLUMNS) + extra
            self._rewrite([])
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, restval="", extrasaction="ignore").writerow(row)
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if math.isfinite(value):
                    self.tensorboard.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def check_cache_teacher(cache_config: Mapping[str, Any], config: TrainConfig) -> None:
    """The student must start from the teacher whose outputs the cache holds, or it would be
    distilled from an unrelated network's. A cache made from a model directory (preprocess
    --model DIR) needs teacher= set: without one the student would be a random preset network;
    a teacher other than DIR/unet is only warned about (it may be a copy). A cache made from a
    seeded random preset teacher must be trained with that same teacher (no teacher directory,
    the same preset and seed). Caches from handed-in models or without these fields (older
    caches) are not checked."""
    if cache_config.get(MODELS_HANDED_IN_KEY):
        return
    model_dir = cache_config.get("model")
    if model_dir is not None:
        unet_dir = str(Path(model_dir) / UNET_DIR)
        if config.teacher is None:
            raise ValueError(
                f"cache {config.cache} was made by the teacher in {model_dir}: set teacher={unet_dir} (the student "
                f"starts from the teacher's weights; without it, it would be a random {config.preset!r} network)"
            )
        if not _same_path(unet_dir, config.teacher):
            logger.warning("cache %s was made by the teacher in %s, but the student starts from teacher=%s: "
                           "train from %s unless that is a copy of it", config.cache, unet_dir, config.teacher, unet_dir)
        return
    preset, seed = cache_config.get("preset"), cache_config.get("seed")
    if preset is None or seed is None:
        return
    if config.teacher is not None or config.preset != preset or config.seed != seed:
        raise ValueError(
            f"cache {config.cache} was made by the random {preset!r} preset teacher with seed {seed}, but training "
            f"builds its student from teacher={config.teacher!r}, preset={config.preset!r}, seed={config.seed}: "
            f"set teacher=None, preset={preset!r} and seed={seed}"
        )


def check_cache_data(cache_config: Mapping[str, Any], config: TrainConfig) -> None:
    """With config.data set, the cache must have been built from that data: the same string, or
    paths that resolve to the same place, a directory and the manifest it is read through counting
    as one. Caches that do not record their data are not checked."""
    built_from = cache_config.get("data")
    if config.data is None or built_from is None or built_from == config.data:
        return
    if built_from != "synthetic" and config.data != "synthetic" and any(
        _same_path(built_from, spelling) for spelling in _data_spellings(config.data)
    ):
        return
    raise ValueError(f"cache {config.cache} was built from data {built_from!r}, not from data={config.data!r}")


def _data_spellings(data: str) -> list[str]:
    """`data` and, where it names a directory of videos or the manifest that directory is read
    through by default, the other of the two."""
    path = Path(data)
    if path.is_dir():
        manifest = default_manifest(path)
        return [data] if manifest is None else [data, str(manifest)]
    if path.is_file() and default_manifest(path.parent) == path:
        return [data, str(path.parent)]
    return [data]


def _same_path(recorded: str, given: str) -> bool:
    """Whether `given` names the file or folder the cache recorded. The cache records the path as
    preprocess was given it; a relative one is compared by its trailing components, since the
    folder preprocess ran in is not known."""
    given_path = Path(given).resolve()
    recorded_path = Path(recorded)
    if recorded_path.is_absolute() or ".." in recorded_path.parts:
        return recorded_path.resolve() == given_path
    tail = Path(*[part for part in recorded_path.parts if part != "."]).parts
    return given_path.parts[-len(tail):] == tail if tail else False


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig, reward: RewardMixture | None = None, vae: nn.Module | None = None, accelerator=None) -> TrainResult:
    """Runs consistency distillation for config.max_steps optimizer steps in all (SPEC 3), with the
    reward path when `reward` (and a VAE: `vae` or config.vae) is given. Resumes from
    config.resume ("latest" or a checkpoint directory). Writes checkpoints, metrics.csv and the
    final student (output_dir/student, a save_pretrained directory)."""
    return prepare_training(config, reward, vae, accelerator).run()


def prepare_training(
    config: TrainConfig, reward: RewardMixture | None = None, vae: nn.Module | None = None, accelerator=None
) -> _Trainer:
    """Everything `train` does before the first step: checks the config, finds the checkpoint to
    resume, checks the cache against the run, builds the student, optimizer and reward path and
    loads the checkpoint. What fails here is the run's settings; `.run()` then trains."""
    config.validate()
    resume = None if config.resume is None else resolve_resume(config.resume, config.output_dir)
    if resume is None:
        check_no_earlier_run(config.output_dir, resuming=config.resume is not None)
    trainer = _Trainer(config, reward, vae, accelerator)
    if resume is not None:
        trainer.load_checkpoint(resume)
        if trainer.step > config.max_steps:
            raise ValueError(
                f"{resume} is at step {trainer.step}, beyond max_steps={config.max_steps}: resuming would rewrite "
                f"{Path(config.output_dir) / STUDENT_NAME} with an earlier state; raise --max-steps to train on"
            )
    return trainer


def check_no_earlier_run(output_dir: str | os.PathLike, resuming: bool = False) -> None:
    """A run that starts at step 0 refuses an output_dir holding what an earlier run wrote there:
    its checkpoints (its own would be mixed with them, and keep_last would delete its own first),
    its student or, for a fresh run, its metrics. `resuming` (--resume latest finding no
    checkpoint): a run killed before its first checkpoint left metrics.csv only, and starts over."""
    found = checkpoint_dirs(output_dir)
    if found:
        raise ValueError(
            f"{output_dir} holds checkpoints of an earlier run (latest: {found[-1].name}): pass --resume latest to "
            "continue it, or choose another --output-dir"
        )
    earlier = [Path(output_dir) / STUDENT_NAME] + ([] if resuming else [Path(output_dir) / METRICS_NAME])
    written = [path.name for path in earlier if path.exists()]
    if written:
        raise ValueError(
            f"{output_dir} holds an earlier run's {' and '.join(written)} and no checkpoint to resume from: "
            "choose another --output-dir, or move them away to start over there"
        )


def check_cache_size(num_samples: int, config: TrainConfig, num_processes: int) -> None:
    """The cache must hold at least one global batch (batch_size a process, every process)."""
    if num_samples == 0:
        raise ValueError(f"the cache at {config.cache} holds no samples (a preprocess run stopped before its first "
                         f"shard?); {PREPROCESS_HINT}")
    if num_samples < config.batch_size * num_processes:
        raise ValueError(
            f"the cache at {config.cache} holds {num_samples} samples, fewer than one global batch "
            f"(batch_size={config.batch_size} x {num_processes} processes): lower batch_size or preprocess more clips"
        )
