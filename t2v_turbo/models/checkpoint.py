"""VC2UNet weights on disk: the release's checkpoints (.ckpt / .pt / .bin, read with
weights_only=True), safetensors files, and a pretrained directory (config.json + model.safetensors).
Every file is written atomically: to a temporary file in the same directory, then os.replace."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from t2v_turbo.files import (
    SAFETENSORS_SUFFIX, read_json_file, read_tensor_file, write_atomically, write_files_atomically,
)
from t2v_turbo.models.vc2_unet import VC2UNet, strip_original_prefix

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_UNET_CLASS = "UNet3DConditionModel"


def unet_state_dict(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """The bare UNet state dict inside a checkpoint: under its "state_dict" key if it has one, and
    only the keys under `model.diffusion_model.` (prefix stripped) when any key carries it."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise TypeError(f"the checkpoint's 'state_dict' is a {type(state).__name__}, not a mapping")
    state = strip_original_prefix(state)
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise TypeError(f"{len(not_tensors)} state dict entries are not tensors: {not_tensors[:20]}")
    return dict(state)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The UNet state dict of a .safetensors, .pt, .pth, .ckpt or .bin file, on the CPU (see
    unet_state_dict)."""
    path = Path(path)
    checkpoint = read_tensor_file(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    return unet_state_dict(checkpoint)


def load_checkpoint(model: VC2UNet, path: str | os.PathLike, strict: bool = True) -> VC2UNet:
    """Loads a checkpoint file into `model`; strictly, a mismatch names the missing and unexpected
    keys. strict=False starts a student from VideoCrafter2's model.ckpt, which lacks its three
    conditioning projections (VC2UNet.load_original_state_dict)."""
    state = load_state_dict_file(path)
    try:
        model.load_original_state_dict(state, strict=strict)
    except (KeyError, ValueError) as error:
        raise type(error)(f"{path}: {error.args[0]}") from None
    return model


def save_state_dict_file(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Writes a state dict as safetensors, atomically."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path}: the output must be a {SAFETENSORS_SUFFIX} file")
    tensors, storages = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied weights, views): later ones are copied.
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))


def save_pretrained(model: VC2UNet, directory: str | os.PathLike) -> None:
    """Writes config.json (the constructor kwargs) and model.safetensors into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = json.dumps(model.config, indent=2) + "\n"
    write_atomically(directory / CONFIG_NAME, lambda temporary: temporary.write_text(config))
    save_state_dict_file(model.state_dict(), directory / WEIGHTS_NAME)


def from_pretrained(directory: str | os.PathLike, use_kernels: bool = True) -> VC2UNet:
    """The model save_pretrained wrote, in eval mode, in the saved dtype, on the CPU."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} holds no {name} (a VC2UNet directory has {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = read_json_file(directory / CONFIG_NAME)
    try:
        with torch.device("meta"):
            model = VC2UNet(**config, use_kernels=use_kernels)
    except TypeError as error:
        raise ValueError(f"{directory / CONFIG_NAME} is not a VC2UNet configuration ({error})") from None
    # Fresh (allocator-aligned) copies: CPU kernels on the file's buffer can round differently.
    state = {key: value.clone() for key, value in read_tensor_file(directory / WEIGHTS_NAME).items()}
    try:
        model.load_original_state_dict(state, assign=True)
    except (KeyError, ValueError) as error:
        raise type(error)(f"{directory / WEIGHTS_NAME}: {error.args[0]}") from None
    return model.eval()


def is_diffusers_unet_dir(directory: str | os.PathLike) -> bool:
    """Whether a directory's config.json was written by diffusers' UNet3DConditionModel.save_pretrained."""
    config_path = Path(directory) / CONFIG_NAME
    if not config_path.is_file():
        return False
    config = read_json_file(config_path)
    return isinstance(config, Mapping) and config.get("_class_name") == DIFFUSERS_UNET_CLASS


def load_unet_dir(directory: str | os.PathLike, use_kernels: bool = True) -> torch.nn.Module:
    """The UNet a save_pretrained directory holds, told apart by its config.json: a VC2UNet
    (`from_pretrained`) or a diffusers UNet3DConditionModel (diffusers' own from_pretrained), in
    eval mode on the CPU. A directory without config.json reaches `from_pretrained`, which names
    what is missing."""
    if is_diffusers_unet_dir(directory):
        from diffusers import UNet3DConditionModel

        try:
            return UNet3DConditionModel.from_pretrained(directory).eval()
        # diffusers reports a directory without its weights file as an OSError.
        except OSError as error:
            raise FileNotFoundError(f"{directory}: {error}") from None
    return from_pretrained(directory, use_kernels=use_kernels)


def save_unet_dir(unet: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Writes a VC2UNet with `save_pretrained`, a diffusers UNet with its own save_pretrained
    (safetensors); `load_unet_dir` reads either."""
    from t2v_turbo.models.adapter import is_diffusers_unet3d

    if isinstance(unet, VC2UNet):
        save_pretrained(unet, directory)
    elif is_diffusers_unet3d(unet):
        write_files_atomically(Path(directory), lambda staging: unet.save_pretrained(staging, safe_serialization=True))
    else:
        raise TypeError(f"can save a VC2UNet or a diffusers {DIFFUSERS_UNET_CLASS}, not a {type(unet).__name__}")
