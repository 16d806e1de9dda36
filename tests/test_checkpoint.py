"""Checkpoint files and pretrained directories for VC2UNet, with the tiny golden's weights
(shared/vc2_reference/tiny_unet.safetensors)."""

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2v_turbo.cli import main
from t2v_turbo.models import VC2UNet
from t2v_turbo.models import checkpoint
from t2v_turbo.models.vc2_unet import ORIGINAL_PREFIX, STUDENT_ONLY_KEYS
from t2v_turbo.models.checkpoint import (
    from_pretrained,
    load_checkpoint,
    load_state_dict_file,
    save_pretrained,
    save_state_dict_file,
)

from .helpers import SHARED

GOLDEN = SHARED / "vc2_reference"
TINY_WEIGHTS = GOLDEN / "tiny_unet.safetensors"

pytestmark = pytest.mark.skipif(
    not TINY_WEIGHTS.is_file(), reason=f"VC2 reference data not found at {GOLDEN} (shared/vc2_reference is absent)"
)


@pytest.fixture(scope="module")
def tiny_state():
    return load_file(str(TINY_WEIGHTS))


def _release_checkpoint(state):
    """The layout of VideoCrafter2's model.ckpt: a nested state_dict holding the whole LatentDiffusion."""
    return {
        "epoch": 3,
        "state_dict": {
            **{ORIGINAL_PREFIX + key: value for key, value in state.items()},
            "first_stage_model.decoder.conv_in.weight": torch.ones(2, 2),
            "cond_stage_model.model.token_embedding.weight": torch.ones(3),
        },
    }


def _assert_identical(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def _no_temporary_files(directory):
    return not [path.name for path in Path(directory).iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_release_checkpoint_loads_the_unet_alone(tmp_path, tiny_state, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(_release_checkpoint(tiny_state), path)
    _assert_identical(load_state_dict_file(path), tiny_state)


def test_bare_state_dicts_load_as_they_are(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "unet_mg.pt")
    torch.save({"state_dict": tiny_state}, tmp_path / "nested.pt")
    _assert_identical(load_state_dict_file(tmp_path / "unet_mg.pt"), tiny_state)
    _assert_identical(load_state_dict_file(tmp_path / "nested.pt"), tiny_state)
    _assert_identical(load_state_dict_file(TINY_WEIGHTS), tiny_state)


def test_pickled_objects_are_refused(tmp_path, tiny_state):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(Exception, match="weights_only"):
        load_state_dict_file(path)


def test_non_tensor_entries_and_unknown_formats_are_refused(tmp_path, tiny_state):
    torch.save({**tiny_state, "epoch": 3}, tmp_path / "model.pt")
    with pytest.raises(TypeError, match=r"1 state dict entries are not tensors: \['epoch'\]"):
        load_state_dict_file(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_state_dict_file(tmp_path / "model.npz")


def test_load_checkpoint_names_missing_and_unexpected_keys(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["extra.weight"] = state.pop("out.2.weight")
    path = tmp_path / "model.ckpt"
    torch.save(_release_checkpoint(state), path)
    with pytest.raises(KeyError, match=r"model.ckpt: .*1 missing \['out.2.weight'\], 1 unexpected \['extra.weight'\]"):
        load_checkpoint(VC2UNet.preset("tiny"), path)


TEACHER_LACKS = ("time_cond_proj.weight", "motion_cond_proj.weight", "combine_proj.weight")


def test_student_only_keys_are_the_three_conditioning_projections():
    assert STUDENT_ONLY_KEYS == set(TEACHER_LACKS)


def test_a_student_starts_from_videocrafter2s_teacher_checkpoint(tmp_path, tiny_state):
    """VideoCrafter2's model.ckpt has no conditioning projections: strictly it is refused, naming
    them; not strictly the student takes every teacher weight and keeps its projections as built."""
    teacher = {key: value for key, value in tiny_state.items() if key not in TEACHER_LACKS}
    path = tmp_path / "model.ckpt"
    torch.save(_release_checkpoint(teacher), path)
    with pytest.raises(KeyError, match=r"3 missing \['combine_proj.weight', 'motion_cond_proj.weight', 'time_cond_proj"):
        load_checkpoint(VC2UNet.preset("tiny"), path)
    torch.manual_seed(0)
    student = VC2UNet.preset("tiny")
    built = {key: student.state_dict()[key].clone() for key in TEACHER_LACKS}
    load_checkpoint(student, path, strict=False)
    loaded = student.state_dict()
    _assert_identical({key: loaded[key] for key in teacher}, teacher)
    _assert_identical({key: loaded[key] for key in TEACHER_LACKS}, built)


def test_load_original_state_dict_reads_a_whole_latent_diffusion(tiny_state):
    """The release's whole-model keys (model.diffusion_model.*, besides the VAE's and text
    encoder's) load as the bare ones do, strict or not. Not strict, only the student's three
    projections may be missing: any other gap, an unexpected key, an unrelated or empty state
    dict is an error naming the keys, not a partial load."""
    whole = _release_checkpoint(tiny_state)["state_dict"]
    for strict in (True, False):
        model = VC2UNet.preset("tiny")
        model.load_original_state_dict(whole, strict=strict)
        _assert_identical(model.state_dict(), tiny_state)
    lacking_more = {key: value for key, value in tiny_state.items() if key not in ("out.2.weight", *TEACHER_LACKS)}
    with pytest.raises(KeyError, match=r"4 missing \['combine_proj.weight', .*'out.2.weight'.*strict=False lets only"):
        VC2UNet.preset("tiny").load_original_state_dict(lacking_more, strict=False)
    with pytest.raises(KeyError, match=r"0 missing \[\], 1 unexpected \['extra'\]"):
        VC2UNet.preset("tiny").load_original_state_dict({**tiny_state, "extra": torch.ones(1)}, strict=False)
    unrelated = {"encoder." + key: value for key, value in tiny_state.items()}
    for state in (unrelated, {}):
        with pytest.raises(KeyError, match="945 missing"):
            VC2UNet.preset("tiny").load_original_state_dict(state, strict=False)
    teacher = {key: value for key, value in tiny_state.items() if key not in TEACHER_LACKS}
    with torch.device("meta"):
        on_meta = VC2UNet.preset("tiny")
    with pytest.raises(ValueError, match="built on the meta device, so they have no initialisation"):
        on_meta.load_original_state_dict(teacher, strict=False, assign=True)


def test_the_unet_names_an_input_of_another_dtype_than_its_weights():
    """Outside autocast x must have the weights' dtype (from_pretrained keeps the saved one);
    autocast reconciles float32 weights or its own dtype's, not float16 ones under bfloat16."""
    model = VC2UNet.preset("tiny", use_kernels=False).half()
    x, context = torch.randn(1, 4, 2, 16, 16), torch.randn(1, 77, model.config["context_dim"])
    with pytest.raises(ValueError, match="x is torch.float32 but the model's weights are torch.float16"):
        model(x, 10, context, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="dtype=torch.float16"):
        model(x, 10, context, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.float()(x.bfloat16(), 10, context, 8).dtype == torch.bfloat16


def test_absent_unreadable_and_misshapen_checkpoints_fail_clearly(tmp_path, tiny_state):
    with pytest.raises(FileNotFoundError, match="absent.ckpt does not exist"):
        load_state_dict_file(tmp_path / "absent.ckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    for name in ("junk.pt", "junk.safetensors"):
        with pytest.raises(ValueError, match=f"{name}: not a readable"):
            load_state_dict_file(tmp_path / name)
    state = dict(tiny_state)
    state["out.2.weight"] = state["out.2.weight"][:1]
    torch.save(state, tmp_path / "narrow.pt")
    shape = tuple(tiny_state["out.2.weight"].shape)
    with pytest.raises(ValueError, match=r"1 with other shapes \(out.2.weight: \(1, .* in the state dict, " + re.escape(str(shape))):
        load_checkpoint(VC2UNet.preset("tiny"), tmp_path / "narrow.pt")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        from_pretrained(tmp_path)


def test_every_weights_reader_names_a_file_it_cannot_read(tmp_path, tiny_state):
    """Truncated downloads, empty files and foreign files are errors naming the file wherever weights
    are read (a reward model's, a UNet directory's, its config): the parsers' own errors (OSError,
    EOFError, KeyError, SafetensorError) reached `train` as tracebacks or as a bare "101"."""
    from t2v_turbo.rewards.internvideo2 import read_state_dict_file

    torch.save(tiny_state, tmp_path / "whole.pt")
    save_pretrained(VC2UNet.preset("tiny"), tmp_path / "unet")
    files = {
        "empty.pt": b"",
        "foreign.pt": b"hello\n",
        "truncated.pt": (tmp_path / "whole.pt").read_bytes()[:5000],
        "truncated.safetensors": (tmp_path / "unet" / "model.safetensors").read_bytes()[:5000],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{re.escape(name)}: not a readable"):
            read_state_dict_file(tmp_path / name)
    (tmp_path / "unet" / "model.safetensors").write_bytes(files["truncated.safetensors"])
    with pytest.raises(ValueError, match="model.safetensors: not a readable"):
        from_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a JSON file"):
        from_pretrained(tmp_path / "unet")


class _RunsACommand:
    """Pickles as a call of os.system, which torch's weights_only loader blocks outright."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_convert_cli_reports_unreadable_inputs(tmp_path, capsys):
    output = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp_path / "absent.ckpt"), str(output)]) == 2
    assert "t2v-turbo convert: error:" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["convert", str(tmp_path / "junk.pt"), str(output)]) == 2
    assert "not a readable .pt checkpoint" in capsys.readouterr().err
    assert not output.exists()
    # torch's refusal is paragraphs long (and advises weights_only=False): one line says what it refused.
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "lightning.ckpt")
    assert main(["convert", str(tmp_path / "lightning.ckpt"), str(output)]) == 2
    error = capsys.readouterr().err
    assert "it pickles argparse.Namespace, which weights_only=True does not build" in error
    assert error.count("\n") == 1 and "Check the documentation" not in error
    torch.save({"w": torch.zeros(1), "payload": _RunsACommand()}, tmp_path / "hostile.pt")
    assert main(["convert", str(tmp_path / "hostile.pt"), str(output)]) == 2
    assert re.search(r"it pickles \w+\.system, which no weights file holds: never load it", capsys.readouterr().err)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert main(["convert", str(tmp_path / "empty.pt"), str(output)]) == 2
    assert "empty.pt: not a readable .pt checkpoint (the file ends early: empty or truncated)" in capsys.readouterr().err


def test_convert_cli_creates_the_output_folder(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "model.pt")
    output = tmp_path / "new" / "folder" / "model.safetensors"
    assert main(["convert", str(tmp_path / "model.pt"), str(output)]) == 0
    assert load_file(str(output)).keys() == tiny_state.keys()


def test_convert_refuses_an_output_under_a_file(tmp_path, capsys, tiny_state):
    torch.save(tiny_state, tmp_path / "model.pt")
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as stopped:
        main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "afile" / "o.safetensors")])
    assert stopped.value.code == 2 and f"OUTPUT: {tmp_path / 'afile'} is a file, so" in capsys.readouterr().err


def test_a_state_dict_with_shared_tensors_is_written(tmp_path):
    """Tied weights and views share memory, which safetensors refuses: each key gets its own copy."""
    weight = torch.randn(4, 3)
    state = {"a.weight": weight, "b.weight": weight, "row": weight[1]}
    torch.save(state, tmp_path / "tied.pt")
    assert main(["convert", str(tmp_path / "tied.pt"), str(tmp_path / "tied.safetensors")]) == 0
    written = load_file(str(tmp_path / "tied.safetensors"))
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())


def test_train_overrides_may_sit_between_its_flags(tmp_path, capsys):
    """Every KEY=VALUE reaches the config wherever it sits (the unknown key proves the second did)."""
    argv = ["train", "--cache", str(tmp_path), "kernels=off", "--max-steps", "1", "not_a_field=1"]
    assert main(argv) == 2
    assert "unknown config keys ['not_a_field']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--cache", str(tmp_path), "--not-a-flag"])


def test_load_checkpoint_fills_the_model(tmp_path, tiny_state):
    path = tmp_path / "model.ckpt"
    torch.save(_release_checkpoint(tiny_state), path)
    _assert_identical(load_checkpoint(VC2UNet.preset("tiny"), path).state_dict(), tiny_state)


def test_save_pretrained_round_trip_reproduces_outputs(tmp_path, tiny_state):
    model = VC2UNet.preset("tiny", use_kernels=False)
    model.load_original_state_dict(tiny_state)
    save_pretrained(model.eval(), tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config == model.config and config["model_channels"] == 32
    assert _no_temporary_files(tmp_path / "tiny")

    loaded = from_pretrained(tmp_path / "tiny", use_kernels=False)
    assert not loaded.training and not loaded.use_kernels
    model.save_pretrained(tmp_path / "by-method")  # the methods are the same functions
    _assert_identical(VC2UNet.from_pretrained(tmp_path / "by-method").state_dict(), model.state_dict())
    _assert_identical(loaded.state_dict(), model.state_dict())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        assert torch.equal(loaded(x, 500, context, 8), model(x, 500, context, 8))


def test_from_pretrained_keeps_the_saved_dtype(tmp_path, tiny_state):
    model = VC2UNet.preset("tiny")
    model.load_original_state_dict(tiny_state)
    save_pretrained(model.double(), tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.use_kernels
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_failed_write_keeps_the_old_file(tmp_path, tiny_state, monkeypatch):
    path = tmp_path / "unet.safetensors"
    save_state_dict_file(tiny_state, path)

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict_file({"x": torch.zeros(1)}, path)
    _assert_identical(load_file(str(path)), tiny_state)
    assert _no_temporary_files(tmp_path)


def test_convert_cli_writes_the_unet_as_safetensors(tmp_path, tiny_state, capsys):
    source, output = tmp_path / "model.ckpt", tmp_path / "unet.safetensors"
    torch.save(_release_checkpoint(tiny_state), source)
    assert main(["convert", str(source), str(output)]) == 0
    assert f"{len(tiny_state)} tensors" in capsys.readouterr().out
    _assert_identical(load_file(str(output)), tiny_state)
    assert _no_temporary_files(tmp_path)


def test_convert_cli_refuses_other_outputs(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(TINY_WEIGHTS), str(tmp_path / "unet.pt")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "unet.pt").exists()


def test_atomically_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """A checkpoint and a video end up readable by whoever the umask allows (not mkstemp's 0600)."""
    import os

    from t2v_turbo.video_io import write_video

    previous = os.umask(0o022)
    try:
        save_state_dict_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
        write_video(torch.zeros(2, 3, 8, 8), tmp_path / "clip.gif")
    finally:
        os.umask(previous)
    for name in ("weights.safetensors", "clip.gif"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
