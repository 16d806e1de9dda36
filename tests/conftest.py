import os

import torch

# Without a GPU, Triton kernels run on the CPU through Triton's interpreter, which has to be switched
# on before triton is first imported.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture
def chosen(monkeypatch):
    """Records (op, backend) for every op call dispatch makes, so a test can prove which kernel ran."""
    from turbo_kernels import dispatch

    record = []
    original = dispatch.select

    def spy(op, device, *args):
        name = original(op, device, *args)
        record.append((op, name))
        return name

    monkeypatch.setattr(dispatch, "select", spy)
    return record
