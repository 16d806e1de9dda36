"""Files written atomically (a temporary file beside the target, then os.replace) and readable
as the umask allows: checkpoints, caches, configs and videos; and weight and JSON files read with
errors that name them."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sibling_temporary(path: Path, suffix: str) -> Path:
    """A new empty file beside `path`, its hidden name ending in `suffix`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(descriptor)
    return Path(temporary)


def publish(temporary: Path, path: Path) -> None:
    """Moves a finished temporary file onto `path`, readable as make_readable says."""
    make_readable(temporary)
    os.replace(temporary, path)


def make_readable(path: Path) -> None:
    """Gives a written file the permissions a plain open() would: mkstemp and safetensors create
    files 0600, which would leave checkpoints, caches and videos unreadable to the rest of a team
    on a shared machine."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    # Linux reports the umask; setting it to read it would briefly loosen it for other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path) in path's directory, then moves the result onto path."""
    temporary = sibling_temporary(path, ".tmp")
    try:
        write(temporary)
        publish(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_files_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """write(staging directory) beside `directory`'s files, then publishes each file it wrote into
    `directory` (for libraries that save a folder of files, e.g. diffusers' save_pretrained)."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging."))
    try:
        write(staging)
        for written in staging.iterdir():
            publish(written, directory / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Weight files: safetensors, or torch pickles read with weights_only=True.
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_tensor_file(path: str | os.PathLike) -> Any:
    """What a .safetensors file or a torch pickle (.pt, .pth, .bin, .ckpt; weights_only=True) holds,
    on the CPU. A file that cannot be read (truncated, foreign, empty) is a ValueError naming it:
    the parsers fail with errors of many types (KeyError, EOFError, OSError, UnpicklingError,
    SafetensorError, ...), which all mean the same to the caller."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES):
        expected = ", ".join((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
        raise ValueError(f"{path}: unknown checkpoint format (expected one of {expected})")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable {path.suffix} checkpoint ({_unreadable_reason(error)})") from error


# torch's refusal under weights_only=True: several paragraphs (one advising weights_only=False)
# around the one line that says what was refused.
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
_WEIGHTS_UNPICKLER_MARK = "WeightsUnpickler error:"
_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _unreadable_reason(error: Exception) -> str:
    text = str(error)
    if _WEIGHTS_ONLY_REFUSAL in text:
        pickled = _PICKLED_GLOBAL.search(text)
        if pickled and "is blocked" in text:
            return f"it pickles {pickled.group(1)}, which no weights file holds: never load it with weights_only=False"
        if pickled:
            return (
                f"it pickles {pickled.group(1)}, which weights_only=True does not build: if you trust "
                "the file, load it with torch.load(weights_only=False) yourself and save its state dict with safetensors"
            )
        _, marked, detail = text.partition(_WEIGHTS_UNPICKLER_MARK)
        refused = detail.strip().splitlines() if marked else []
        return f"not a torch checkpoint: {refused[0]}" if refused else "torch refused it under weights_only=True"
    if isinstance(error, EOFError):
        return "the file ends early: empty or truncated"
    package = type(error).__module__.split(".")[0]
    kind = type(error).__name__ if package == "builtins" else f"{package}.{type(error).__name__}"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"{kind}: {first_line}" if first_line else kind


def read_json_file(path: str | os.PathLike) -> Any:
    """A JSON file's value; a ValueError naming the file when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None


def uncreatable_reason(path: str | os.PathLike, directory: bool) -> str | None:
    """Why `path` cannot be written as a directory (`directory`) or a file, checked before the work
    that would write it: it exists as the other kind, or the nearest of its ancestors that exists
    is not a directory. None when it can (permissions aside)."""
    path = Path(path)
    if path.exists():
        if directory and not path.is_dir():
            return f"{path} is a file, not a directory"
        if not directory and path.is_dir():
            return f"{path} is a directory, not a file"
        return None
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, so {path} cannot be created"
    return None
