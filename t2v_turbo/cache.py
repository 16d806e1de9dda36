"""The teacher cache (SPEC 2): what the offline teacher pass stores and the training loop reads.

A cache is a directory of safetensors shards and a JSON manifest. Each shard stacks N samples:
z_t, eps_cond, eps_uncond, score (N, C, F, h, w) and context (N, L, D) in the storage dtype
(float16 by default), grid_index (N,) int64 and use_motion (N,) uint8; the captions and short
captions are JSON lists in the shard's metadata. The score is zero where a clip has no motion prior.

Writing is crash-safe: a shard is written to a temporary file and renamed, and only then listed in
the manifest (also replaced atomically), so a killed preprocess leaves complete shards and a
manifest that lists a prefix of them. A finished shard is never rewritten: a resumed writer adopts
a shard that was renamed into place before the kill and continues with the next index.

With several processes (accelerate launch) process r writes `shard-p{r}-{i:05d}.safetensors` and
its own `manifest-p{r}.json`; a single process writes `shard-{i:05d}.safetensors` and
`manifest.json`. TeacherCache reads every manifest in the directory.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from t2v_turbo.files import write_atomically

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Latent-shaped fields (N, C, F, h, w) and the prompt embedding, stored in the cache's float dtype.
LATENT_FIELDS = ("z_t", "eps_cond", "eps_uncond", "score")
FLOAT_FIELDS = LATENT_FIELDS + ("context",)
TENSOR_FIELDS = FLOAT_FIELDS + ("grid_index", "use_motion")
TEXT_FIELDS = ("caption", "short_caption")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PREPROCESS_HINT = "build it with `t2v-turbo preprocess --model MODEL_DIR --data DATA --cache DIR` (--preset tiny|vc2 for a random teacher)"
# Set in a cache's producing config when preprocess() was handed its models: its model / preset
# fields then do not name the teacher.
MODELS_HANDED_IN_KEY = "models_handed_in"


def manifest_name(process_index: int, num_processes: int) -> str:
    return MANIFEST_NAME if num_processes == 1 else f"manifest-p{process_index}.json"


def shard_name(index: int, process_index: int, num_processes: int) -> str:
    prefix = "shard" if num_processes == 1 else f"shard-p{process_index}"
    return f"{prefix}-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype}")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupt cache manifest ({error}); delete the cache and {PREPROCESS_HINT}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: corrupt cache manifest (no 'shards' list); delete the cache and {PREPROCESS_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: cache format version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return manifest


def _shard_sample_count(path: Path) -> int | None:
    """The sample count of a complete shard file, or None when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as shard:
            return int(shard.get_slice("grid_index").get_shape()[0])
    except Exception:
        return None


def _as_text_list(value: Any, name: str, count: int) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if len(texts) != count or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"batch[{name!r}] must be {count} strings (one per sample), got {value!r}")
    return texts


class CacheMismatchError(ValueError):
    """A cache directory holds samples made otherwise (another config or storage dtype) than a
    writer asked to continue it."""


class CacheWriter:
    """Appends teacher samples to a cache directory, one shard of `shard_size` samples at a time.

    add(batch): batch maps z_t, eps_cond, eps_uncond (N, C, F, h, w), context (N, L, D),
    grid_index (N,), use_motion (N,) bool, optionally score (zeros when absent), to tensors and
    caption (and optionally short_caption, defaulting to the caption) to N strings.
    close() writes the last, possibly smaller, shard. Reopening a directory continues after its
    complete shards (see resume_point)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        shard_size: int = 64,
        dtype: torch.dtype = torch.float16,
        config: Mapping[str, Any] | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must lie in [0, num_processes={num_processes}), got {process_index}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.dtype = dtype
        self.dtype_name = _dtype_name(dtype)
        self.process_index = process_index
        self.num_processes = num_processes
        self.config = dict(config or {})
        self.manifest_path = self.directory / manifest_name(process_index, num_processes)
        self._pending: list[dict[str, Any]] = []
        self._adding = False
        self.manifest = self._open_manifest()

    def _open_manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            manifest = _read_manifest(self.manifest_path)
            if manifest.get("dtype") != self.dtype_name:
                raise CacheMismatchError(
                    f"{self.manifest_path}: the cache stores {manifest.get('dtype')}, this writer was given {self.dtype_name}"
                )
            config = json.loads(json.dumps(self.config))
            if manifest.get("config") != config:
                stored = manifest.get("config") or {}
                differing = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
                values = "; ".join(f"{k}: {stored.get(k)!r} stored, {config.get(k)!r} now" for k in differing)
                raise CacheMismatchError(
                    f"{self.manifest_path}: the cache was produced with another config (differing: {values}); "
                    "use a new directory or the same config to continue it"
                )
        else:
            manifest = {
                "format_version": FORMAT_VERSION,
                "num_samples": 0,
                "dtype": self.dtype_name,
                "process_index": self.process_index,
                "num_processes": self.num_processes,
                "config": self.config,
                "shards": [],
            }
        # A shard renamed into place just before a kill is complete: list it instead of rewriting it.
        adopted = False
        while (count := self._orphan_count(manifest)) is not None:
            self._append_shard(manifest, count)
            adopted = True
        if adopted or not self.manifest_path.exists():
            self._write_manifest(manifest)
        return manifest

    def _orphan_count(self, manifest: dict[str, Any]) -> int | None:
        path = self.directory / shard_name(len(manifest["shards"]), self.process_index, self.num_processes)
        return _shard_sample_count(path) if path.exists() else None

    def _append_shard(self, manifest: dict[str, Any], count: int) -> None:
        name = shard_name(len(manifest["shards"]), self.process_index, self.num_processes)
        manifest["shards"].append({"file": name, "num_samples": count})
        manifest["num_samples"] += count

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=2) + "\n"
        write_atomically(self.manifest_path, lambda temporary: temporary.write_text(text))

    @staticmethod
    def resume_point(directory: str | os.PathLike, process_index: int = 0, num_processes: int = 1) -> int:
        """How many of this process's samples are already stored in complete shards: a resumed
        preprocess skips that many of its samples and adds the rest."""
        directory = Path(directory)
        path = directory / manifest_name(process_index, num_processes)
        manifest = _read_manifest(path) if path.exists() else {"num_samples": 0, "shards": []}
        done, index = manifest["num_samples"], len(manifest["shards"])
        while (shard := directory / shard_name(index, process_index, num_processes)).exists():
            count = _shard_sample_count(shard)
            if count is None:
                break
            done += count
            index += 1
        return done

    @property
    def num_samples(self) -> int:
        """Samples stored in complete shards (buffered samples not included)."""
        return self.manifest["num_samples"]

    def add(self, batch: Mapping[str, Any]) -> None:
        # Left set when _add raises: __exit__ then knows the buffer may hold half a batch.
        self._adding = True
        self._add(batch)
        self._adding = False

    def _add(self, batch: Mapping[str, Any]) -> None:
        required = ("z_t", "eps_cond", "eps_uncond", "context", "grid_index", "use_motion", "caption")
        missing = [name for name in required if name not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}")
        count = batch["z_t"].shape[0]
        latent_shape = tuple(batch["z_t"].shape)
        if len(latent_shape) != 5:
            raise ValueError(f"batch['z_t'] must be (N, C, F, h, w), got shape {latent_shape}")
        for name in LATENT_FIELDS:
            if name in batch and tuple(batch[name].shape) != latent_shape:
                raise ValueError(f"batch[{name!r}] has shape {tuple(batch[name].shape)}, expected {latent_shape}")
        if batch["context"].dim() != 3 or batch["context"].shape[0] != count:
            raise ValueError(f"batch['context'] must be ({count}, L, D), got shape {tuple(batch['context'].shape)}")
        for name in ("grid_index", "use_motion"):
            if tuple(batch[name].shape) != (count,):
                raise ValueError(f"batch[{name!r}] must have shape ({count},), got {tuple(batch[name].shape)}")
        captions = _as_text_list(batch["caption"], "caption", count)
        short = _as_text_list(batch.get("short_caption", captions), "short_caption", count)
        for i in range(count):
            sample = {name: batch[name][i].detach().to("cpu", self.dtype) for name in FLOAT_FIELDS if name in batch}
            sample.setdefault("score", torch.zeros_like(sample["z_t"]))
            sample["grid_index"] = batch["grid_index"][i].detach().to("cpu", torch.int64)
            sample["use_motion"] = batch["use_motion"][i].detach().to("cpu", torch.uint8)
            sample["caption"], sample["short_caption"] = captions[i], short[i]
            self._pending.append(sample)
            if len(self._pending) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors = {name: torch.stack([s[name] for s in self._pending]).contiguous() for name in TENSOR_FIELDS}
        metadata = {
            "format_version": str(FORMAT_VERSION),
            **{name: json.dumps([s[name] for s in self._pending]) for name in TEXT_FIELDS},
        }
        path = self.directory / shard_name(len(self.manifest["shards"]), self.process_index, self.num_processes)
        if path.exists():
            raise FileExistsError(f"{path} exists but is not in {self.manifest_path}; refusing to overwrite a shard")
        write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
        self._append_shard(self.manifest, len(self._pending))
        self._write_manifest(self.manifest)
        self._pending = []

    def close(self) -> None:
        """Writes the buffered samples as a last shard."""
        self._flush()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Ctrl-C between batches (the teacher's time) keeps the samples already made, as a last
        # shorter shard the next run continues after. Ctrl-C inside add() may have left a batch
        # half buffered or a shard half published, and a failed producer may have stored anything:
        # both leave only complete shards, the buffer dropped.
        interrupted_between_batches = exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and not self._adding
        if exc_type is None or interrupted_between_batches:
            self.close()


def _check_shard_header(path: Path, num_samples: int) -> None:
    """A shard's safetensors header (which also covers the file's length) names every field and
    holds the `num_samples` its manifest lists."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys, metadata = set(handle.keys()), handle.metadata() or {}
            held = handle.get_slice("grid_index").get_shape()[0] if "grid_index" in keys else None
    except Exception as error:
        raise ValueError(f"{path}: corrupt cache shard ({error})") from None
    missing = [name for name in (*TENSOR_FIELDS, *TEXT_FIELDS) if name not in keys | set(metadata)]
    if missing:
        raise ValueError(f"{path}: cache shard lacks {missing}")
    if held != num_samples:
        raise ValueError(f"{path}: holds {held} samples, its manifest lists {num_samples} (a shard of another cache?)")


class TeacherCache(Dataset):
    """The samples of a cache directory as a map-style dataset of dicts: the tensor fields of one
    sample (without the batch dimension, in the storage dtype) plus its caption and short_caption.
    Shards are loaded on first use and the `max_loaded_shards` most recent are kept; every shard's
    header is read when the cache opens, so a truncated or foreign shard stops a run before its
    first step, not hours in when the shard is first needed."""

    def __init__(self, directory: str | os.PathLike, max_loaded_shards: int = 2):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"teacher cache {self.directory} does not exist; {PREPROCESS_HINT}")
        manifest_paths = sorted(
            path for path in self.directory.glob("manifest*.json") if re.fullmatch(r"manifest(-p\d+)?\.json", path.name)
        )
        if not manifest_paths:
            raise FileNotFoundError(f"teacher cache {self.directory} has no {MANIFEST_NAME}; {PREPROCESS_HINT}")
        self.manifests = [_read_manifest(path) for path in manifest_paths]
        dtypes = {manifest.get("dtype") for manifest in self.manifests}
        if len(dtypes) != 1:
            raise ValueError(f"{self.directory}: manifests disagree on the storage dtype: {sorted(map(str, dtypes))}")
        self.shards: list[tuple[str, int]] = []
        for path, manifest in zip(manifest_paths, self.manifests):
            for shard in manifest["shards"]:
                if not (self.directory / shard["file"]).is_file():
                    raise FileNotFoundError(f"{path} lists {shard['file']}, which is missing from {self.directory}")
                _check_shard_header(self.directory / shard["file"], int(shard["num_samples"]))
                self.shards.append((shard["file"], int(shard["num_samples"])))
        self._starts = []
        total = 0
        for _, count in self.shards:
            self._starts.append(total)
            total += count
        self._length = total
        self.max_loaded_shards = max_loaded_shards
        self._loaded: OrderedDict[int, tuple[dict[str, Tensor], dict[str, list[str]]]] = OrderedDict()

    @property
    def config(self) -> dict[str, Any]:
        """The producing configuration (of the first manifest)."""
        return self.manifests[0].get("config", {})

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.manifests[0]["dtype"]]

    def __len__(self) -> int:
        return self._length

    def _shard(self, index: int) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
        if index in self._loaded:
            self._loaded.move_to_end(index)
            return self._loaded[index]
        path = self.directory / self.shards[index][0]
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            texts = {name: json.loads(metadata[name]) for name in TEXT_FIELDS}
        except Exception as error:
            raise ValueError(f"{path}: corrupt cache shard ({error})") from None
        missing = [name for name in TENSOR_FIELDS if name not in tensors]
        if missing:
            raise ValueError(f"{path}: cache shard lacks {missing}")
        self._loaded[index] = (tensors, texts)
        while len(self._loaded) > self.max_loaded_shards:
            self._loaded.popitem(last=False)
        return self._loaded[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._length <= index < self._length:
            raise IndexError(f"sample index {index} out of range for a cache of {self._length} samples")
        index %= self._length
        shard = bisect.bisect_right(self._starts, index) - 1
        offset = index - self._starts[shard]
        tensors, texts = self._shard(shard)
        sample: dict[str, Any] = {name: tensors[name][offset] for name in TENSOR_FIELDS}
        sample["use_motion"] = sample["use_motion"].bool()
        for name in TEXT_FIELDS:
            sample[name] = texts[name][offset]
        return sample


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stacks TeacherCache samples into a batch: tensors get a leading batch dimension, texts become lists."""
    batch: dict[str, Any] = {name: torch.stack([sample[name] for sample in samples]) for name in TENSOR_FIELDS}
    for name in TEXT_FIELDS:
        batch[name] = [sample[name] for sample in samples]
    return batch
