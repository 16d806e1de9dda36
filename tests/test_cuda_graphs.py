"""CUDA graphs of sampling's UNet calls (t2v_turbo.cuda_graphs, T2VTurboPipeline.enable_cuda_graphs).

On the CPU the capture itself is replaced by a recording stand-in, so these tests check what
GraphedCall decides (warm up, capture, replay, recapture, run eagerly) and that its replays
return the values of the current call, never those of the call it captured. The `gpu` tests
capture for real: sampling with graphs equals sampling without, with the kernels and without.
That the UNet forward never reads a value back to the host (which a capture refuses) is checked
on the CPU by watching the dispatcher.
"""

import pytest
import torch

import turbo_kernels
from t2v_turbo import cuda_graphs
from t2v_turbo.commands.generate import main
from t2v_turbo.cuda_graphs import GraphedCall
from t2v_turbo.models import VC2UNet, guidance_embedding, motion_embedding
from t2v_turbo.pipeline import T2VTurboPipeline
from tests.helpers import HOST_READS, RecordedOps, record_graph_captures
from tests.test_pipeline import FRAMES, SIZE, LatentsAsPixels, PromptLength, small_unet


@pytest.fixture
def recorded_capture(monkeypatch):
    return record_graph_captures(monkeypatch)


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(2.0))
        self.calls = 0

    def forward(self, x, shift=0.0):
        self.calls += 1
        return x * self.weight + shift


def test_calls_without_a_gpu_run_eagerly():
    model = Affine()
    graphed = GraphedCall(model, [model])
    x = torch.randn(3)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(graphed(x), x * 2, rtol=0, atol=0)
    assert graphed.num_graphs == 0 and model.calls == 3


def test_calls_with_gradients_or_under_autocast_run_eagerly(recorded_capture, monkeypatch):
    model = Affine()
    graphed = GraphedCall(model, [model])
    x = torch.randn(3, requires_grad=True)
    for _ in range(3):
        out = graphed(x)
    out.sum().backward()
    assert x.grad is not None and model.calls == 3
    # CUDA autocast switches itself off without a GPU: what GraphedCall asks is answered here.
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    with torch.no_grad():
        for _ in range(3):
            graphed(x)
    assert not recorded_capture and model.calls == 6


@torch.no_grad()
def test_first_call_warms_up_second_captures_then_replays_current_inputs(recorded_capture):
    seen_strides = []

    def fn(x):
        seen_strides.append(x.stride())
        return x * 2

    graphed = GraphedCall(fn)
    inputs = [torch.randn(1).expand(3) for _ in range(4)]  # stride 0, as expanded timesteps come
    first = graphed(inputs[0])
    assert graphed.num_graphs == 0 and not recorded_capture, "the first call of a shape is the eager warm-up"
    second = graphed(inputs[1])
    (graph,) = recorded_capture
    assert graphed.num_graphs == 1 and graph.replays == 1
    third = graphed(inputs[2])
    assert graph.replays == 2 and len(recorded_capture) == 1
    for out, x in zip((first, second, third), inputs):
        torch.testing.assert_close(out, x * 2, rtol=0, atol=0)
    third.fill_(0)  # what a call returns is the caller's: the graph's own output is untouched
    torch.testing.assert_close(graphed(inputs[3]), inputs[3] * 2, rtol=0, atol=0)
    torch.testing.assert_close(second, inputs[1] * 2, rtol=0, atol=0)
    # The warm-up ran on the static copies the capture uses, not on the caller's expanded tensor.
    assert set(seen_strides) == {(1,)}


@torch.no_grad()
def test_a_warm_up_that_raised_is_warmed_up_again_before_a_capture(recorded_capture):
    """A first call that raises (out of memory, caught by the caller, which retries) has not done
    its first-time work: the retry is the warm-up, and only the call after it captures."""
    calls = []

    def fn(x):
        calls.append("fails" if not calls else "runs")
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return x + 1

    graphed = GraphedCall(fn)
    x = torch.randn(3)
    with pytest.raises(torch.OutOfMemoryError):
        graphed(x)
    torch.testing.assert_close(graphed(x), x + 1, rtol=0, atol=0)
    assert not recorded_capture, "the retry is the warm-up, not a capture"
    torch.testing.assert_close(graphed(x), x + 1, rtol=0, atol=0)
    assert len(recorded_capture) == 1 and graphed.num_graphs == 1


@torch.no_grad()
def test_each_signature_gets_a_graph_and_they_share_one_pool(recorded_capture):
    model = Affine()
    graphed = GraphedCall(model, [model])
    calls = [
        (torch.randn(3), {}),
        (torch.randn(4), {}),  # another shape
        (torch.randn(3), {"shift": 1.0}),  # another non-tensor value
        (torch.randn(3, dtype=torch.float64), {}),  # another dtype
    ]
    for x, kwargs in calls + calls:
        torch.testing.assert_close(graphed(x, **kwargs), x * 2 + kwargs.get("shift", 0.0))
    assert graphed.num_graphs == 4
    first_pool = recorded_capture[0].pool()
    assert [graph.pool_token for graph in recorded_capture] == [None] + [first_pool] * 3
    with turbo_kernels.backend("reference"):  # the requested backend is part of the signature
        graphed(calls[0][0]), graphed(calls[0][0])
    assert graphed.num_graphs == 5
    with torch.inference_mode():  # static copies made there are inference tensors
        graphed(calls[0][0]), graphed(calls[0][0])
    assert graphed.num_graphs == 6
    graphed(calls[0][0])  # back outside inference mode: its own graph, replayed
    model.train(False)  # the module's mode is part of the signature
    graphed(calls[0][0]), graphed(calls[0][0])
    assert graphed.num_graphs == 7


@torch.no_grad()
def test_replaced_weights_recapture_while_in_place_updates_replay(recorded_capture):
    model = Affine()
    graphed = GraphedCall(model, [model])
    x = torch.randn(3)
    graphed(x), graphed(x)
    assert len(recorded_capture) == 1
    model.weight.mul_(3)  # in place: the graph reads the new values at the same address
    torch.testing.assert_close(graphed(x), x * 6)
    assert len(recorded_capture) == 1
    model.weight.data = torch.tensor(5.0)  # a new tensor: the graph would read freed memory
    calls = model.calls
    torch.testing.assert_close(graphed(x), x * 5)
    assert model.calls == calls + 1 and len(recorded_capture) == 1, "warm-up again, eagerly"
    torch.testing.assert_close(graphed(x), x * 5)
    assert len(recorded_capture) == 2


@torch.no_grad()
def test_replaced_submodules_start_over(recorded_capture):
    model = torch.nn.Sequential(Affine())
    graphed = GraphedCall(model, [model])
    x = torch.randn(3)
    graphed(x), graphed(x)
    model[0] = Affine()  # e.g. an adapter injected: the old graph would run the old module
    model[0].weight.data.fill_(4.0)
    graphed(x)
    torch.testing.assert_close(graphed(x), x * 4)
    assert len(recorded_capture) == 2


@torch.no_grad()
def test_a_failed_capture_warns_once_and_runs_eagerly_from_then_on(monkeypatch):
    def refuse(fn, device, pool, streams):
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        finally:  # ending the broken capture raises too, with the op's error as its context
            raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(cuda_graphs, "_graph_device", lambda leaves: torch.device("cpu"))
    monkeypatch.setattr(cuda_graphs, "_capture", refuse)
    model = Affine()
    graphed = GraphedCall(model, [model])
    x = torch.randn(3)
    graphed(x)
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*not permitted"):
        torch.testing.assert_close(graphed(x), x * 2)
    assert "not permitted" in graphed.failure
    torch.testing.assert_close(graphed(x + 1), (x + 1) * 2)
    assert graphed.num_graphs == 0


@torch.no_grad()
def test_arguments_a_signature_cannot_hold_run_eagerly(recorded_capture):
    graphed = GraphedCall(lambda x, options: x + len(options))
    x = torch.randn(2)
    for _ in range(3):
        torch.testing.assert_close(graphed(x, options={1, 2}), x + 2)  # a set: an unhashable leaf
    assert not recorded_capture


def _generate(pipeline, prompt="a cat", steps=4):
    return pipeline.generate(
        [prompt], num_steps=steps, motion_strength=0.05, num_frames=FRAMES, height=SIZE, width=SIZE, seed=0,
        progress=False,
    )


def test_pipeline_samples_every_step_with_one_graph(recorded_capture):
    """The steps differ in values only (timestep, motion strength), never in shapes or Python
    values: one graph serves them all, and sampling through it equals eager sampling."""
    model = small_unet(seed=4)
    eager = _generate(T2VTurboPipeline(model, LatentsAsPixels(), PromptLength()))
    pipeline = T2VTurboPipeline(model, LatentsAsPixels(), PromptLength()).enable_cuda_graphs()
    assert pipeline.cuda_graphs
    graphed = _generate(pipeline)
    again = _generate(pipeline, "a horse")
    assert len(recorded_capture) == 1 and recorded_capture[0].replays == 3 + 4
    torch.testing.assert_close(graphed.latents, eager.latents, rtol=1e-6, atol=1e-6)
    assert (again.latents - graphed.latents).abs().max() > 0
    pipeline.use_kernels = not pipeline.use_kernels  # another code path: warm up and capture again
    assert pipeline.noise_predictor.graphs.num_graphs == 0
    _generate(pipeline, steps=2)
    assert len(recorded_capture) == 2
    pipeline.disable_cuda_graphs()
    assert not pipeline.cuda_graphs and pipeline.noise_predictor.graphs is None


def test_generate_command_refuses_cuda_graphs_on_the_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["a cat", "--model", str(tmp_path), "--device", "cpu", "--cuda-graphs"])
    assert stopped.value.code == 2 and "--cuda-graphs needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, flag, expected",
    [("cpu", None, False), ("cpu", "--no-cuda-graphs", False), ("cuda", None, True), ("cuda", "--no-cuda-graphs", False)],
)
def test_generate_command_samples_through_cuda_graphs_by_default_on_a_gpu(device, flag, expected, monkeypatch, tmp_path):
    from t2v_turbo.commands import generate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    monkeypatch.setattr(generate, "run_generate", lambda args: seen.append(args.cuda_graphs) or 0)
    argv = ["a cat", "--model", str(tmp_path), "--device", device, "--out", str(tmp_path / "c.gif")]
    assert main(argv + ([flag] if flag else [])) == 0
    assert seen == [expected]


@pytest.mark.parametrize("use_kernels", [False, True])
@torch.no_grad()
def test_unet_forward_reads_nothing_back_to_the_host(use_kernels, monkeypatch, chosen):
    """Kernels on takes the fused temporal path (on the CPU through the reference backends, whose
    Python around the ops is the kernels'). The ops' value checks are off, as they are while a
    graph is captured. Python-number timesteps and fps are filled in on the device, equal to
    passing tensors."""
    monkeypatch.setenv("TURBO_KERNELS_VALIDATE", "0")
    model = small_unet(seed=1)
    model.use_kernels = use_kernels
    x, context = torch.randn(2, 4, FRAMES, SIZE, SIZE), torch.randn(2, 4, 32)
    w, m = guidance_embedding(torch.tensor([7.5, 3.0])), motion_embedding(torch.tensor([0.05, 0.0]))
    with RecordedOps(HOST_READS) as watcher:
        out = model(x, 999, context, 8, timestep_cond=w, motion_cond=m)
    assert watcher.calls == []
    # The session fixture fuses every temporal layer whatever its size (tests/conftest.py).
    assert (("group_norm_stats", "reference") in chosen) == use_kernels
    with_tensors = model(x, torch.tensor([999, 999]), context, torch.tensor(8), timestep_cond=w, motion_cond=m)
    torch.testing.assert_close(out, with_tensors, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_from_real_cuda_graphs_equals_eager_sampling(use_kernels, dtype):
    model = small_unet(seed=4).cuda().to(dtype)
    pipeline = T2VTurboPipeline(model, LatentsAsPixels(), PromptLength(), use_kernels=use_kernels)
    eager = _generate(pipeline, steps=6)
    pipeline.enable_cuda_graphs()
    graphed = _generate(pipeline, steps=6)
    replayed = _generate(pipeline, steps=6)
    graphs = pipeline.noise_predictor.graphs
    assert graphs.failure is None and graphs.num_graphs == 1
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(graphed.latents, eager.latents, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(replayed.latents, graphed.latents, rtol=0, atol=0)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    model.to(other)  # weights replaced: warmed up and captured anew
    pipeline.disable_cuda_graphs()
    eager_other = _generate(pipeline, steps=3)
    pipeline.enable_cuda_graphs()
    graphs = pipeline.noise_predictor.graphs
    _generate(pipeline, steps=3)
    model.to(dtype)
    model.to(other)
    replaced = _generate(pipeline, steps=3)
    assert graphs.failure is None and graphs.num_graphs == 1
    tolerance = 1e-5 if other == torch.float32 else 2e-2
    torch.testing.assert_close(replaced.latents, eager_other.latents, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
def test_vc2_unet_forward_with_python_numbers_captures():
    model = VC2UNet.preset("tiny", use_kernels=True).cuda().eval()
    graphed = GraphedCall(model, [model])
    x = torch.randn(1, 4, FRAMES, 32, 32, device="cuda")
    context = torch.randn(1, 77, model.config["context_dim"], device="cuda")
    with torch.no_grad():
        outs = [graphed(x, 999, context, 8) for _ in range(3)]
        eager = model(x, 999, context, 8)
    assert graphed.failure is None and graphed.num_graphs == 1
    for out in outs:
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
