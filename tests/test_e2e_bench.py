"""The end-to-end benchmark suites (benchmarks.models, .training, .rewards) on their tiny --quick
configuration on the CPU: rows keep the harness's JSON contract, missing components and missing
hardware give skipped rows with reasons, and the target lines judge speed-ups and memory right."""

from __future__ import annotations

import argparse
import json
import math
import sys

import pytest
import torch

from benchmarks import harness, models, rewards, temporal_block, training, video_decode
from t2v_turbo.data.videos import VIDEO_BACKENDS

ROW = {"op": str, "case": str, "impl": str, "pass": str, "median_ms": float, "gbps": float, "bytes": int}


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, suite, *options: str) -> dict:
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    args = parser.parse_args(["--quick", "--warmup", "1", "--iters", "1", "--no-plot", "--out", str(tmp_path), *options])
    harness.run(args, [suite])
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def _check_rows(result: dict) -> None:
    for row in result["rows"]:
        for name, kind in ROW.items():
            assert isinstance(row[name], kind), (name, row)
        assert row["pass"] in harness.PASSES and row["median_ms"] > 0
    for skipped in result["skipped"]:
        assert set(skipped) == {"op", "case", "impl", "pass", "reason"} and skipped["reason"]


def _cpu_options(quick: bool = True) -> harness.SuiteOptions:
    return harness.SuiteOptions(torch.device("cpu"), torch.float32, None, quick=quick)


def test_unet_forward_rows(tmp_path):
    result = _run(tmp_path, models.cases, "--ops", "unet_forward")
    _check_rows(result)
    assert [(r["op"], r["impl"]) for r in result["rows"]] == [
        ("unet_forward", harness.EAGER), ("unet_forward", models.EAGER_NHWC)
    ]
    assert all(r["flops"] == models.unet_flops(models.TINY, 1) for r in result["rows"])
    reasons = {s["impl"]: s["reason"] for s in result["skipped"]}
    assert reasons[models.KERNELS] == reasons[models.KERNELS_COMPILED] == reasons[models.KERNELS_NHWC] == "no GPU"
    assert reasons[models.KERNELS_GRAPHS] == reasons[models.KERNELS_COMPILED_GRAPHS] == "no GPU"
    assert reasons[models.EAGER_GRAPHS] == "CUDA graphs need a GPU"
    assert "compile budget" in reasons[harness.COMPILED]


def test_channels_last_variants_compute_what_their_nchw_variants_do():
    """The NHWC experiment changes the convolutions' weight layout only: the same UNet output and
    the same generated frames (fp32, tiny configuration), and switching back restores NCHW."""
    unet_case, generate_case = (next(c for c in models.cases(_cpu_options()) if c.op == op) for op in ("unet_forward", "generate"))
    for case in (unet_case, generate_case):
        x = case.make_inputs()
        impls = {impl.name: impl for impl in case.impls}
        want = impls[harness.EAGER].fn(x)
        got = impls[models.EAGER_NHWC].fn(x)
        convs = [m for m in x.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        impls[harness.EAGER].fn(x)
        assert all(conv.weight.is_contiguous() for conv in convs)


def test_vae_decode_rows_and_variants(tmp_path):
    """The VAE decode case times the eager variants; each variant decodes the same frames (the
    kernel ones run here on the reference backend), and the reference variants unfuse the norms."""
    from turbo_kernels.patching import GroupNormSiLU

    result = _run(tmp_path, models.cases, "--ops", models.VAE_OP)
    _check_rows(result)
    assert [r["impl"] for r in result["rows"]] == [harness.EAGER, models.EAGER_NHWC]
    assert {s["impl"]: s["reason"] for s in result["skipped"]} == {models.KERNELS: "no GPU", models.KERNELS_NHWC: "no GPU"}
    assert all(r["flops"] == models.vae_decode_flops(models.TINY, 1) for r in result["rows"])
    frames = math.prod((1, 3, models.TINY.frames, models.TINY.height, models.TINY.width))
    assert result["rows"][0]["bytes"] == 4 * (
        models.decoder_parameter_count(models.TINY) + math.prod(models.TINY.latent_shape(1)) + frames
    )

    case = next(c for c in models.cases(_cpu_options()) if c.op == models.VAE_OP)
    x = case.make_inputs()
    impls = {impl.name: impl for impl in case.impls}
    want = impls[harness.EAGER].fn(x)
    for name in (models.KERNELS, models.KERNELS_NHWC):
        torch.testing.assert_close(impls[name].fn(x), want, rtol=1e-4, atol=1e-5)
        assert any(isinstance(m, GroupNormSiLU) for m in x.vae.modules())
    impls[models.EAGER_NHWC].fn(x)
    assert not any(isinstance(m, GroupNormSiLU) for m in x.vae.modules())


def test_vae_lines_compare_the_fused_norms_with_the_reference():
    case = "b1-16x320x512"
    rows = [_row(models.VAE_OP, case, impl, ms) for impl, ms in (
        (harness.EAGER, 120.0), (models.KERNELS, 100.0), (models.EAGER_NHWC, 150.0), (models.KERNELS_NHWC, 80.0),
    )]
    assert models.vae_lines({"rows": rows, "skipped": []}) == [
        f"info  {models.VAE_OP} {case}: {models.KERNELS} 1.20x {harness.EAGER}",
        f"info  {models.VAE_OP} {case}: {models.KERNELS_NHWC} 1.88x {models.EAGER_NHWC}",
        f"info  {models.VAE_OP} {case}: {models.KERNELS_NHWC} 1.50x {harness.EAGER}",
    ]


def test_graph_variants_replay_what_the_eager_variant_computes(monkeypatch):
    """On the CPU with captures recorded (helpers.record_graph_captures): the graph variants' third
    call replays, and the UNet output and generated frames equal the eager variant's."""
    from tests.helpers import record_graph_captures

    captures = record_graph_captures(monkeypatch)
    unet_case, generate_case = (next(c for c in models.cases(_cpu_options()) if c.op == op) for op in ("unet_forward", "generate"))
    for case in (unet_case, generate_case):
        x = case.make_inputs()
        impls = {impl.name: impl for impl in case.impls}
        want = impls[harness.EAGER].fn(x)
        captured = len(captures)
        for _ in range(3):
            got = impls[models.EAGER_GRAPHS].fn(x)
        assert len(captures) == captured + 1 and captures[-1].replays >= 2
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        impls[harness.EAGER].fn(x)
        assert "graphs" not in x.cache, "an eager variant drops the graphs and their memory"


def test_experiment_lines_compare_each_variant_with_the_one_it_changes():
    case = "b1-16x320x512"
    rows = [_row("unet_forward", case, impl, ms) for impl, ms in (
        (harness.EAGER, 100.0), (models.EAGER_NHWC, 80.0), (models.KERNELS, 90.0), (models.KERNELS_NHWC, 100.0),
        (models.KERNELS_GRAPHS, 60.0),
    )]
    # Graphs are judged on latency from an idle GPU: the host's time the device time hides.
    for row, wall in zip(rows, (150.0, 120.0, 135.0, 140.0, 67.5)):
        row["wall_ms"] = wall
    nhwc, graphs = models.experiment_lines({"rows": rows, "skipped": []})
    assert f"{models.EAGER_NHWC} 1.25x {harness.EAGER}" in nhwc and f"{models.KERNELS_NHWC} 0.90x {models.KERNELS}" in nhwc
    assert graphs == f"info  CUDA graphs unet_forward {case} (wall_ms): {models.KERNELS_GRAPHS} 2.00x {models.KERNELS}"


def test_distillation_step_rows(tmp_path):
    result = _run(tmp_path, training.cases, "--ops", training.STEP_OP)
    _check_rows(result)
    assert [(r["op"], r["impl"], r["pass"]) for r in result["rows"]] == [(training.STEP_OP, harness.EAGER, "fwd+bwd")]
    assert result["rows"][0]["flops"] == training.step_flops(models.TINY, 1)


@pytest.mark.parametrize(
    "op", [
        models.UNET_OP, models.GENERATE_OP, models.VAE_OP, training.STEP_OP, training.MOTION_OP, temporal_block.OP,
        rewards.OP,
    ]
)
def test_counted_flops_are_what_the_timed_call_computes(op):
    """A case's FLOPs, counted on the meta device, equal FlopCounterMode's count of its eager
    implementation's second call (the first embeds the reward captions once) on real tensors, with
    SDPA's math backend and nn.MultiheadAttention's fast path off (the counter has formulas for
    neither's CPU kernels), and the distillation step without checkpointing's recomputation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    suites = {
        temporal_block.OP: temporal_block.cases, rewards.OP: rewards.cases, training.STEP_OP: training.cases,
        training.MOTION_OP: training.cases,
    }
    for case in suites.get(op, models.cases)(_cpu_options()):
        if case.op != op:
            continue
        x = case.make_inputs()
        impl = next(impl for impl in case.impls if impl.unavailable is None)
        if op == training.STEP_OP:
            x.student.disable_gradient_checkpointing()
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            impl.fn(x)
            counter = harness.total_flop_counter()  # the motion score calls torch.autograd.grad
            with sdpa_kernel(SDPBackend.MATH), counter:
                impl.fn(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        assert counter.get_total_flops() == case.flops() > 0, (case.case, case.pass_name)


def test_reward_rows_carry_flops(tmp_path):
    result = _run(tmp_path, rewards.cases, "--ops", f"{rewards.OP},{rewards.MATMUL_OP}", "--batch-sizes", "1")
    _check_rows(result)
    measured = {(r["op"], r["impl"], r["pass"]) for r in result["rows"]}
    assert measured == {(rewards.MATMUL_OP, "torch", "fwd")} | {
        (rewards.OP, impl, p) for impl in (rewards.SEQUENTIAL, rewards.BATCHED) for p in harness.PASSES
    }
    reasons = {(s["impl"], s["pass"]): s["reason"] for s in result["skipped"] if s["op"] == rewards.OP}
    assert reasons == {
        (rewards.BATCHED_GRAPHS, "fwd"): "CUDA graphs need a GPU",
        (rewards.BATCHED_GRAPHS, "fwd+bwd"): "CUDA graphs replay the forward only",
    }
    tflops = {(r["op"], r["pass"]): r["tflops"] for r in result["rows"] if r["impl"] == rewards.BATCHED}
    assert tflops[(rewards.OP, "fwd+bwd")] > 0
    flops = {r["pass"]: r["flops"] for r in result["rows"] if r["op"] == rewards.OP}
    assert flops == {p: rewards.mixture_flops(True, p == "fwd+bwd", 1) for p in harness.PASSES}
    # The backward to the pixels repeats every matmul with the weights transposed: more FLOPs than the forward.
    image_fwd, video_fwd = rewards.tower_flops(True, False)
    image_bwd, video_bwd = rewards.tower_flops(True, True)
    assert 1.5 * image_fwd < image_bwd < 3.5 * image_fwd and 1.5 * video_fwd < video_bwd < 3.5 * video_fwd


def test_reward_graph_impl_scores_what_the_batched_one_does(monkeypatch):
    """batched-graphs on the CPU with captures recorded (helpers.record_graph_captures): the same total
    as the batched mixture, replayed from its third call."""
    from tests.helpers import record_graph_captures

    captures = record_graph_captures(monkeypatch)
    case = next(c for c in rewards.cases(_cpu_options()) if c.op == rewards.OP and c.pass_name == "fwd")
    x = case.make_inputs()
    impls = {impl.name: impl for impl in case.impls}
    want = impls[rewards.BATCHED].fn(x)
    for _ in range(3):
        got = impls[rewards.BATCHED_GRAPHS].fn(x)
    assert captures and all(c.replays == 2 for c in captures)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    impls[rewards.BATCHED].fn(x)
    assert not x.mixture.cuda_graphs


def test_reward_summary_judges_batched_and_reports_the_graph_path():
    case = "c2-img16-16x320x512"
    rows = [_row(rewards.OP, case, impl, ms) for impl, ms in (
        (rewards.SEQUENTIAL, 140.0), (rewards.BATCHED, 118.0), (rewards.BATCHED_GRAPHS, 35.0)
    )]
    lines = rewards.summary({"rows": rows, "skipped": []})
    assert any(line.startswith("FAIL") and "batched 1.19x sequential" in line for line in lines)
    (graphs,) = [line for line in lines if "batched-graphs (wall_ms)" in line]
    assert graphs.startswith("info") and graphs.endswith("4.00x sequential, 3.37x batched")


def test_reward_summary_takes_the_runs_matrix_rate_without_the_matmul_op():
    case = "c2-img16-16x320x512"
    rows = [_row(rewards.OP, case, rewards.BATCHED, 100.0)]
    rows[0]["tflops"] = 40.0
    run = {"rows": rows, "skipped": [], "matmul_tflops": 800.0, "settings": {"dtype": "bfloat16"}}
    assert any("5.0% of the measured bf16 matrix rate" in line for line in rewards.summary(run))
    # Another dtype's ceiling is not the bf16 rate the towers are held to.
    run["settings"]["dtype"] = "float32"
    assert any("matrix rate not measured" in line for line in rewards.summary(run))


def test_motion_graph_impl_scores_what_the_batched_one_does(monkeypatch):
    """batched-kernels-graphs on the CPU with captures recorded: the inversion's steps replay a
    graph, and the scores equal batched-kernels' (the ops run their reference backends here)."""
    from tests.helpers import record_graph_captures

    captures = record_graph_captures(monkeypatch)
    case = next(c for c in training.cases(_cpu_options()) if c.op == training.MOTION_OP)
    x = case.make_inputs()
    impls = {impl.name: impl for impl in case.impls}
    want = impls["batched-kernels"].fn(x)
    got = impls["batched-kernels-graphs"].fn(x)
    assert captures and sum(c.replays for c in captures) >= 1
    for got_score, want_score in zip(got, want):
        torch.testing.assert_close(got_score, want_score, rtol=0, atol=0)


def test_motion_prior_rows(tmp_path):
    result = _run(tmp_path, training.cases, "--ops", training.MOTION_OP)
    _check_rows(result)
    assert {r["impl"] for r in result["rows"]} == {"per-clip-reference", "batched-reference"}
    reasons = {s["impl"]: s["reason"] for s in result["skipped"]}
    assert reasons == dict.fromkeys(
        ("per-clip-kernels", "batched-kernels", "batched-kernels-compile", "batched-kernels-graphs"), "no GPU"
    )
    case = result["rows"][0]["case"]
    assert case.startswith("c2-g0-4-"), "clips, then the grid indices' range: the inversion lengths"
    result["rows"] += [_row(training.MOTION_OP, case, "batched-kernels", 2.0, p="fwd+bwd"),
                       _row(training.MOTION_OP, case, "batched-kernels-compile", 1.6, p="fwd+bwd")]
    (compiled,) = [line for line in training.summary(result) if "compiled inversion" in line]
    assert compiled.startswith("PASS") and "1.25x" in compiled


def test_video_decode_rows_and_summary(tmp_path, monkeypatch):
    result = _run(tmp_path, video_decode.cases)
    _check_rows(result)
    measured = {r["impl"] for r in result["rows"]}
    skipped = {s["impl"]: s["reason"] for s in result["skipped"]}
    assert measured | set(skipped) == set(VIDEO_BACKENDS) and "pyav" in measured
    assert all(r["dtype"] == "uint8" and r["shape"] == [4, 32, 48, 3] for r in result["rows"])
    if "decord" in measured:
        (line,) = video_decode.summary(result)
        assert line.startswith("info  video decode tiny") and "PyAV's time" in line
    else:
        assert "needs the decord package" in skipped["decord"] and video_decode.summary(result) == []


def test_missing_components_give_skipped_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "t2v_turbo.rewards.mixture", None)
    monkeypatch.setitem(sys.modules, "t2v_turbo.motion", None)
    reward_cases = [c for c in rewards.cases(_cpu_options()) if c.op == rewards.OP]
    assert reward_cases and all(
        "t2v_turbo.rewards.mixture" in impl.unavailable for c in reward_cases for impl in c.impls
    )
    motion_cases = [c for c in training.cases(_cpu_options()) if c.op == training.MOTION_OP]
    assert motion_cases and all(
        impl.unavailable and "t2v_turbo.motion not available" in impl.unavailable for c in motion_cases for impl in c.impls
    )
    result = _run(tmp_path, rewards.cases, "--ops", rewards.OP)
    # sequential, batched and batched-graphs, each pass.
    assert not result["rows"] and len(result["skipped"]) == 3 * len(harness.PASSES) * len(rewards.QUICK_CLIPS)
    assert all("t2v_turbo.rewards.mixture" in s["reason"] for s in result["skipped"])


def test_full_size_on_a_cpu_is_skipped_not_run():
    for case in models.cases(_cpu_options(quick=False)):
        assert all(impl.unavailable == models.GPU_ONLY for impl in case.impls)


def _row(op, case, impl, ms, peak=None, p="fwd"):
    return {"op": op, "case": case, "impl": impl, "pass": p, "median_ms": ms, "peak_mem_mb": peak, "tflops": None}


def test_target_lines_judge_speed_and_memory():
    case = "steps4-b1-16x320x512"
    result = {
        "rows": [
            _row("generate", case, harness.EAGER, 300.0, peak=1000.0),
            _row("generate", case, harness.COMPILED, 200.0),
            _row("generate", case, models.KERNELS_COMPILED, 180.0, peak=1001.0),
        ],
        "skipped": [],
    }
    eager, compiled, memory = models.summary(result)
    assert eager.startswith("PASS") and "1.67x" in eager  # 300 / 180 = 1.67 >= 1.5
    assert compiled.startswith("FAIL") and "1.11x" in compiled  # 200 / 180 = 1.11 < 1.15
    assert memory.startswith("FAIL")  # 1001 MiB > 1000 MiB


def test_sequential_and_batched_reward_paths_compute_the_same_reward():
    """Issue 5 compares them at equal numerics: the same frames, models and text rows, so the
    same total and the same gradient of the frames (the stand-in video text tower once seeded
    its rows by the batch's length, so the paths scored against different captions)."""
    options = _cpu_options()
    for with_grad in (False, True):
        x = rewards._inputs(2, rewards.TINY, options, with_grad)()
        sequential = rewards._timed(rewards.sequential_rewards)(x)
        batched = rewards._timed(rewards.batched_rewards)(x)
        if with_grad:
            (sequential,), (batched,) = sequential, batched
        torch.testing.assert_close(sequential, batched, rtol=1e-4, atol=1e-6)


def test_device_check_reports_every_verdict_the_summaries_print():
    """device_check.sh ends by grepping bench.log for the target lines: the whole recipe's
    FITS/OVER verdicts (issue 6's one-GPU memory) must be among them."""
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh").read_text()
    (pattern,) = re.findall(r'^grep -E "(\^\(.*\) )" "\$OUT/bench\.log"$', script, flags=re.M)
    recipe = [_row(training.RECIPE_OP, "b3-full-finetune-16x320x512", setup.name, 1000.0, peak=peak, p="fwd+bwd")
              for setup, peak in zip(training.RECIPE_SETUPS, (90_000.0, 60_000.0))]
    lines = training.summary({"rows": recipe, "skipped": []})
    assert {line.split()[0] for line in lines} == {"OVER", "FITS"}
    assert all(re.match(pattern, line) for line in lines), (pattern, lines)


def test_video_backends_decode_the_same_clips(monkeypatch):
    """The backends share the case's one input set: each must draw the same starts, so the
    summary's decord / PyAV ratio compares the same seeks."""
    drawn = {}

    def decode_clip(path, num_frames, fps, size, rng, backend):
        drawn.setdefault(backend, []).append(rng.random())

    monkeypatch.setattr(video_decode, "decode_clip", decode_clip)
    monkeypatch.setattr(video_decode, "write_source", lambda *args: "a video")
    (case,) = video_decode.cases(_cpu_options())
    x = case.make_inputs()
    for impl in case.impls:
        for _ in range(3):
            impl.fn(x)
    assert len(drawn) == len(case.impls) > 1
    first, *others = drawn.values()
    assert len(set(first)) == 3 and all(other == first for other in others)


def test_target_lines_pass_at_their_targets_and_hold_each_reference_to_its_own():
    """A speed-up equal to its target and a peak equal to the reference's pass; the eager
    reference is held to 1.5x and the compiled one to 1.15x; a peak missing on either side is n/a."""
    case = "steps4-b1-16x320x512"

    def lines(eager_ms, compiled_ms, eager_peak, kernels_peak):
        return models.summary({"rows": [
            _row("generate", case, harness.EAGER, eager_ms, peak=eager_peak),
            _row("generate", case, harness.COMPILED, compiled_ms),
            _row("generate", case, models.KERNELS_COMPILED, 200.0, peak=kernels_peak),
        ], "skipped": []})

    eager, compiled, memory = lines(300.0, 230.0, 1000.0, 1000.0)  # 1.5x, 1.15x, equal peaks
    assert eager.startswith("PASS") and compiled.startswith("PASS") and memory.startswith("PASS")
    assert "(target >= 1.5x)" in eager and "(target >= 1.15x)" in compiled
    eager, compiled, memory = lines(280.0, 240.0, None, 900.0)  # 1.4x, 1.2x
    assert eager.startswith("FAIL") and compiled.startswith("PASS") and memory.startswith("n/a")


def test_reward_summary_reads_rates_memory_and_latency_right():
    """Issue 5's lines: batched >= 2x sequential (1.8x fails), batched's peak no higher than
    sequential's, images/s from ms, the towers' share of the bf16_matmul row's rate (the op's own
    measurement, before the run's ceiling), and batched-graphs by latency from an idle GPU."""
    case = "c2-img16-16x320x512"
    rows = [_row(rewards.OP, case, impl, ms, peak=peak) for impl, ms, peak in (
        (rewards.SEQUENTIAL, 144.0, 900.0), (rewards.BATCHED, 80.0, 1000.0), (rewards.BATCHED_GRAPHS, 60.0, None)
    )]
    for row, wall in zip(rows, (200.0, 100.0, 50.0)):
        row["wall_ms"] = wall
    rows[1]["tflops"] = 50.0
    rows.append({"op": rewards.MATMUL_OP, "case": "8192x8192x8192", "impl": "torch", "pass": "fwd", "median_ms": 1.0,
                 "tflops": 500.0})
    lines = rewards.summary({"rows": rows, "skipped": [], "matmul_tflops": 800.0, "settings": {"dtype": "bfloat16"}})
    speed, memory = (line for line in lines if line.split()[0] in ("PASS", "FAIL", "n/a") and case in line)
    assert speed.startswith("FAIL") and "batched 1.80x sequential" in speed
    assert memory.startswith("FAIL") and "batched 1000 MiB vs sequential 900 MiB" in memory
    assert any(line.endswith("batched-graphs (wall_ms) 4.00x sequential, 2.00x batched") for line in lines)
    assert f"info  {rewards.OP} {case} fwd batched: 200.0 images/s, 10.0% of the measured bf16 matrix rate" in lines


def test_training_summary_judges_the_step_motion_against_the_release_and_recipes_against_80_gb():
    """The step's targets from its rows (no peak memory on these: n/a); the motion prior's, batched
    kernels >= 3x the release's one clip at a time; its CUDA-graph line by latency from an idle
    GPU; clips/s from ms. A recipe fits 80 GB (8e10 bytes, 76,294 MiB: 78,000 MiB is over); one
    without a peak, or skipped, is n/a."""
    case = "c2-g10-20-16x320x512"
    motion = [_row(training.MOTION_OP, case, impl, ms, p="fwd+bwd") for impl, ms in (
        ("per-clip-reference", 7.5), ("batched-reference", 4.0), ("batched-kernels", 3.0), ("batched-kernels-graphs", 2.5)
    )]
    motion[2]["wall_ms"], motion[3]["wall_ms"] = 4.0, 2.0
    recipe = [_row(training.RECIPE_OP, "b3-full-finetune-16x320x512", setup.name, 1000.0, peak=peak, p="fwd+bwd")
              for setup, peak in zip(training.RECIPE_SETUPS[:3], (78_000.0, 70_000.0, None))]
    skipped = [{"op": training.RECIPE_OP, "case": "b3-full-finetune-16x320x512", "impl": training.RECIPE_SETUPS[3].name,
                "pass": "fwd+bwd", "reason": "bitsandbytes AdamW8bit needs a GPU"}]
    step = [_row(training.STEP_OP, "b1-16x320x512", impl, ms, p="fwd+bwd") for impl, ms in (
        (harness.EAGER, 300.0), (harness.COMPILED, 200.0), (models.KERNELS_COMPILED, 150.0)
    )]
    lines = training.summary({"rows": step + motion + recipe, "skipped": skipped})
    assert [line.split()[0] for line in lines[:3]] == ["PASS", "PASS", "n/a"]
    assert "training step (b1-16x320x512) vs reference compile: kernels-compile 1.33x" in lines[1]
    (target,) = [line for line in lines if "batched-kernels 2.50x" in line]
    assert target.startswith("FAIL") and "per-clip-reference (target >= 3x)" in target
    assert f"info  motion prior ({case}) inversion from CUDA graphs (wall_ms): 2.00x batched-kernels" in lines
    assert f"info  motion prior ({case}) batched-kernels: 666.667 clips/s" in lines
    recipe_lines = [line for line in lines if "whole recipe" in line]
    assert [line.split()[0] for line in recipe_lines] == ["OVER", "FITS", "n/a", "n/a"]
    assert recipe_lines[3].endswith("8bit-adam: bitsandbytes AdamW8bit needs a GPU")


def test_video_decode_summary_is_decords_time_over_pyavs():
    rows = [_row(video_decode.OP, "360p-g250-to-16x320x512", impl, ms) for impl, ms in (("pyav", 60.0), ("decord", 30.0))]
    assert video_decode.summary({"rows": rows}) == [
        "info  video decode 360p-g250-to-16x320x512: decord 0.50x PyAV's time (60 ms a clip)"
    ]


def test_the_whole_recipe_decodes_with_the_vaes_norms_fused_as_train_does():
    case = next(c for c in training.cases(_cpu_options()) if c.op == training.RECIPE_OP)
    assert case.make_inputs().vae.use_kernels
