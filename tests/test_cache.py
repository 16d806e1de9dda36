"""The teacher cache (t2v_turbo.cache): round trip, atomic shards, resuming a killed writer,
per-process shards, and clear errors for broken caches."""

import json

import pytest
import torch
from safetensors import safe_open

from t2v_turbo.cache import (
    MANIFEST_NAME,
    CacheWriter,
    TeacherCache,
    collate_samples,
)


def _batch(n: int, seed: int, with_score: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4, 2, 3, 5)
    batch = {
        "z_t": torch.randn(shape, generator=g),
        "eps_cond": torch.randn(shape, generator=g),
        "eps_uncond": torch.randn(shape, generator=g),
        "context": torch.randn(n, 7, 6, generator=g),
        "grid_index": torch.randint(0, 200, (n,), generator=g),
        "use_motion": torch.rand(n, generator=g) < 0.5,
        "caption": [f"a dense caption {seed}-{i}" for i in range(n)],
        "short_caption": [f"short {seed}-{i}" for i in range(n)],
    }
    if with_score:
        batch["score"] = torch.randn(shape, generator=g)
    return batch


def test_round_trip_values_dtypes_and_metadata(tmp_path):
    first, second = _batch(3, 0), _batch(4, 1, with_score=False)
    del second["short_caption"]
    with CacheWriter(tmp_path, shard_size=3, config={"preset": "tiny", "n": 7}) as writer:
        writer.add(first)
        writer.add(second)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["num_samples"] == 7
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert manifest["config"] == {"preset": "tiny", "n": 7} and manifest["dtype"] == "float16"

    with safe_open(str(tmp_path / "shard-00000.safetensors"), framework="pt") as shard:
        assert shard.get_tensor("z_t").dtype == torch.float16
        assert shard.get_tensor("grid_index").dtype == torch.int64
        assert shard.get_tensor("use_motion").dtype == torch.uint8
        assert json.loads(shard.metadata()["caption"]) == first["caption"]

    cache = TeacherCache(tmp_path)
    assert len(cache) == 7 and cache.config["preset"] == "tiny"
    for i in range(7):
        source, j = (first, i) if i < 3 else (second, i - 3)
        sample = cache[i]
        for name in ("z_t", "eps_cond", "eps_uncond", "context"):
            assert sample[name].dtype == torch.float16
            # One float16 rounding: relative error <= 2^-11.
            torch.testing.assert_close(sample[name].float(), source[name][j], rtol=2**-11, atol=1e-4)
        expected_score = source["score"][j] if "score" in source else torch.zeros_like(source["z_t"][j])
        torch.testing.assert_close(sample["score"].float(), expected_score, rtol=2**-11, atol=1e-4)
        assert int(sample["grid_index"]) == int(source["grid_index"][j])
        assert bool(sample["use_motion"]) == bool(source["use_motion"][j])
        assert sample["caption"] == source["caption"][j]
        # Without short captions the caption stands in.
        assert sample["short_caption"] == source.get("short_caption", source["caption"])[j]
    assert cache[-1]["caption"] == second["caption"][-1]
    with pytest.raises(IndexError):
        cache[7]

    batch = collate_samples([cache[0], cache[5]])
    assert batch["z_t"].shape == (2, 4, 2, 3, 5) and batch["caption"] == [first["caption"][0], second["caption"][2]]


def test_float32_storage_is_exact(tmp_path):
    data = _batch(2, 3)
    with CacheWriter(tmp_path, dtype=torch.float32) as writer:
        writer.add(data)
    sample = TeacherCache(tmp_path)[1]
    assert torch.equal(sample["z_t"], data["z_t"][1]) and torch.equal(sample["context"], data["context"][1])


def test_resume_after_a_kill_never_rewrites_a_finished_shard(tmp_path):
    writer = CacheWriter(tmp_path, shard_size=2)
    writer.add(_batch(5, 0))  # two shards written, one sample buffered, then "killed"
    assert CacheWriter.resume_point(tmp_path) == 4
    finished = (tmp_path / "shard-00001.safetensors").stat().st_mtime_ns
    # A temporary file left by a kill mid-write is ignored by the reader and by resume_point.
    (tmp_path / ".shard-00002.safetensors.abcd.tmp").write_bytes(b"half a shard")
    assert len(TeacherCache(tmp_path)) == 4

    resumed = CacheWriter(tmp_path, shard_size=2)
    assert resumed.num_samples == 4
    resumed.add(_batch(3, 1))
    resumed.close()
    assert (tmp_path / "shard-00001.safetensors").stat().st_mtime_ns == finished
    cache = TeacherCache(tmp_path)
    assert len(cache) == 7 and cache[4]["caption"] == "a dense caption 1-0"


def test_ctrl_c_keeps_the_buffered_samples_and_a_failure_drops_them(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt), CacheWriter(tmp_path / "interrupted", shard_size=4) as writer:
        writer.add(_batch(3, 0))
        raise KeyboardInterrupt
    assert CacheWriter.resume_point(tmp_path / "interrupted") == 3
    # Ctrl-C while add() publishes a shard: nothing is written twice, nothing half a batch.
    with monkeypatch.context() as patch:
        publish_manifest = CacheWriter._write_manifest

        def interrupted_after_publishing(writer, manifest):
            publish_manifest(writer, manifest)
            if manifest["shards"]:
                raise KeyboardInterrupt

        patch.setattr(CacheWriter, "_write_manifest", interrupted_after_publishing)
        with pytest.raises(KeyboardInterrupt), CacheWriter(tmp_path / "mid-shard", shard_size=4) as writer:
            writer.add(_batch(3, 0))
            writer.add(_batch(3, 1))
    assert CacheWriter.resume_point(tmp_path / "mid-shard") == 4
    assert len(TeacherCache(tmp_path / "mid-shard")) == 4
    with pytest.raises(RuntimeError), CacheWriter(tmp_path / "failed", shard_size=4) as writer:
        writer.add(_batch(3, 0))
        raise RuntimeError("the teacher failed")
    assert CacheWriter.resume_point(tmp_path / "failed") == 0


def test_a_shard_renamed_before_the_manifest_update_is_adopted(tmp_path):
    with CacheWriter(tmp_path, shard_size=2) as writer:
        writer.add(_batch(2, 0))
    saved_manifest = (tmp_path / MANIFEST_NAME).read_text()
    with CacheWriter(tmp_path, shard_size=2) as writer:
        writer.add(_batch(2, 1))
    # The kill fell between the shard's rename and the manifest's: the manifest is one shard behind.
    (tmp_path / MANIFEST_NAME).write_text(saved_manifest)
    assert CacheWriter.resume_point(tmp_path) == 4
    CacheWriter(tmp_path, shard_size=2).close()
    assert len(TeacherCache(tmp_path)) == 4


def test_a_different_config_cannot_continue_a_cache(tmp_path):
    with CacheWriter(tmp_path, config={"seed": 0, "fps": 8}) as writer:
        writer.add(_batch(1, 0))
    with pytest.raises(ValueError, match=r"another config \(differing: seed: 0 stored, 1 now\)"):
        CacheWriter(tmp_path, config={"seed": 1, "fps": 8})


def test_process_shards_are_read_together(tmp_path):
    for rank in range(2):
        with CacheWriter(tmp_path, shard_size=2, process_index=rank, num_processes=2) as writer:
            writer.add(_batch(3, rank))
    assert (tmp_path / "shard-p1-00001.safetensors").is_file() and (tmp_path / "manifest-p0.json").is_file()
    assert CacheWriter.resume_point(tmp_path, process_index=1, num_processes=2) == 3
    cache = TeacherCache(tmp_path)
    assert len(cache) == 6
    assert sorted(cache[i]["caption"] for i in range(6)) == sorted(
        f"a dense caption {rank}-{i}" for rank in range(2) for i in range(3)
    )


def test_a_truncated_shard_is_found_when_the_cache_opens(tmp_path):
    """Not when training first reads it, hours in, past its last checkpoint."""
    with CacheWriter(tmp_path, shard_size=2) as writer:
        writer.add(_batch(4, 0))
    shard = sorted(tmp_path.glob("shard-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{shard.name}: corrupt cache shard"):
        TeacherCache(tmp_path)


def test_a_shard_of_another_cache_is_found_when_the_cache_opens(tmp_path):
    """A whole shard, but not the one the manifest lists: its sample count gives it away (reading
    past its end failed with an IndexError when training reached it)."""
    for name, shard_size in (("a", 3), ("b", 2)):
        with CacheWriter(tmp_path / name, shard_size=shard_size) as writer:
            writer.add(_batch(6, 0))
    (tmp_path / "a" / "shard-00001.safetensors").write_bytes((tmp_path / "b" / "shard-00001.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shard-00001.safetensors: holds 2 samples, its manifest lists 3"):
        TeacherCache(tmp_path / "a")


def test_broken_caches_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess"):
        TeacherCache(tmp_path / "absent")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest"):
        TeacherCache(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt cache manifest"):
        TeacherCache(corrupt)
    with pytest.raises(ValueError, match="z_t"):
        CacheWriter(tmp_path / "bad").add({k: v for k, v in _batch(2, 0).items() if k != "z_t"})
    with pytest.raises(ValueError, match="eps_cond"):
        CacheWriter(tmp_path / "bad2").add({**_batch(2, 0), "eps_cond": torch.zeros(2, 4, 2, 3, 4)})
    with pytest.raises(ValueError, match="caption"):
        CacheWriter(tmp_path / "bad3").add({**_batch(2, 0), "caption": ["only one"]})


def test_an_unreadable_file_at_the_next_shard_name_is_never_overwritten(tmp_path):
    # A file the writer cannot adopt (not a complete shard) sits where its first shard would go:
    # the writer refuses to replace it rather than silently rewriting a shard name.
    junk = b"not a safetensors file"
    (tmp_path / "shard-00000.safetensors").write_bytes(junk)
    assert CacheWriter.resume_point(tmp_path) == 0
    writer = CacheWriter(tmp_path, shard_size=2)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        writer.add(_batch(2, 0))
    assert (tmp_path / "shard-00000.safetensors").read_bytes() == junk
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["shards"] == []
