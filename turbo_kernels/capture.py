"""Record the q and k projections of chosen attention layers during a model's forward pass, e.g.
to compute the motion energy (SPEC 4) of the decoder's temporal attention without patching the
model. Model-agnostic: it needs only attention modules with `to_q` and `to_k` submodules (as
diffusers' `Attention` and the VideoCrafter2 release's attention modules have).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Mapping

from torch import Tensor, nn

PROJECTIONS = ("to_q", "to_k")


def _record(captured: dict, name: str, slot: int, module: nn.Module, inputs, output: Tensor) -> None:
    pair = list(captured.get(name, (None, None)))
    pair[slot] = output
    captured[name] = tuple(pair)


@contextlib.contextmanager
def capture_attention_inputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Within the block, every call of `modules[name].to_q` and `.to_k` records its output in the
    yielded dict as name -> (q, k), exactly as produced: in the layout the module sees (for a
    temporal transformer's attention, the "sequences" layout (B*N, F, heads*d)), with its autograd
    graph, so a loss on them backpropagates into the model. A module called more than once keeps
    its latest call. The hooks are removed on exit; the dict keeps what it recorded.

        layers = {name: unet.get_submodule(name) for name in names}
        with capture_attention_inputs(layers) as qk:
            unet(z_t, t, context)
        energy = motion_energy(*qk[name], ref_probs[name], num_frames, heads, "sequences")

    Modules whose projections run fused (one to_qkv call) never call to_q or to_k and record
    nothing; a name missing from the dict after the forward means its module did not run them.
    """
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    try:
        for name, module in modules.items():
            for slot, projection_name in enumerate(PROJECTIONS):
                projection = getattr(module, projection_name, None)
                if not isinstance(projection, nn.Module):
                    raise TypeError(f"modules[{name!r}] ({type(module).__name__}) has no {projection_name} submodule")
                handles.append(projection.register_forward_hook(functools.partial(_record, captured, name, slot)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
