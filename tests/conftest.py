import os

import torch

# Without a GPU, Triton kernels run on the CPU through Triton's interpreter, which has to be switched
# on before triton is first imported.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU cuDNN convolutions default to TF32 (a 10-bit mantissa): float32 comparisons through a
# model's convolutions then differ by 1e-4 to 1e-3 (2.5e-4 on an H100 between two paths that
# differ only in attention), above every float32 tolerance here. The tests keep float32 float32.
torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny shapes: on a shared 2-core machine a second thread
    only spins against the first (up to 100x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def chosen(monkeypatch):
    """Records (op, backend) for every op call dispatch makes, so a test can prove which kernel ran."""
    from turbo_kernels import dispatch

    record = []
    original = dispatch.select

    def spy(op, device, *args, **kwargs):
        name = original(op, device, *args, **kwargs)
        record.append((op, name))
        return name

    monkeypatch.setattr(dispatch, "select", spy)
    return record


@pytest.fixture(autouse=True, scope="session")
def fused_temporal_layers_at_every_size():
    """The tiny configurations' latent frames are far below the size where VC2UNet's temporal layers
    switch to the fused path (TemporalTransformer.fused_min_positions, a GPU measurement): the tests
    run the fused path at every size, except where one sets the threshold back, on strided
    projections (temporal_block.CUBLAS_PROJECTIONS_BELOW). Session-wide, so
    that module-scoped fixtures (a cache written once, then compared) see it too."""
    from t2v_turbo.models.vc2_unet import TemporalTransformer
    from turbo_kernels import temporal_block

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TemporalTransformer, "fused_min_positions", 0)
        # And their projections take the strided route, as at VC2UNet's fused sizes; the tests of
        # the cuBLAS route ask for it.
        patch.setattr(temporal_block, "CUBLAS_PROJECTIONS_BELOW", 0)
        yield
