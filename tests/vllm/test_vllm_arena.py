"""SoupArena on a toy model (no engine): the merge against float64, republishing, failures, the memory check.

The toy's linear layers behave like vLLM's on CPU: post-load processing packs a
copy of the weight, drops the parameter, and the forward reads only the copy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bonesoup.vllm.arena as arena_mod
from bonesoup.vllm.arena import SoupArena


class PackingMethod:
    """Stands in for vLLM's CPU UnquantizedLinearMethod (a packed copy; the weight dropped)."""

    def __init__(self):
        self.fail_next = 0

    def process_weights_after_loading(self, layer):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("packing failed")
        layer.packed = layer.weight.detach().clone()
        layer.weight = nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)


class PackedLinear(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(o, i), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(o), requires_grad=False)
        self.quant_method = PackingMethod()

    def forward(self, x):
        return x @ self.packed.T + self.bias


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lin = PackedLinear(6, 5)
        self.norm = nn.Parameter(torch.empty(5, dtype=torch.bfloat16), requires_grad=False)  # a second dtype


def _states(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": ((11, 6), torch.float32), "lin.weight": ((5, 6), torch.float32),
              "lin.bias": ((5,), torch.float32), "norm": ((5,), torch.bfloat16)}
    return [{n: torch.randn(s, generator=g).to(dt) for n, (s, dt) in shapes.items()} for _ in range(k)]


def _build(states, skip=None):
    model = Toy().requires_grad_(False)
    arena = SoupArena(model, [f"src{i}" for i in range(len(states))])
    params = dict(model.named_parameters())

    def load_row(i):
        for name, t in states[i].items():
            if name != skip:
                params[name].data.copy_(t)

    arena.capture(load_row)
    model.lin.quant_method.process_weights_after_loading(model.lin)  # what vLLM does after loading
    return model, arena


def _expected(states, c, name):
    ref = sum(ci * s[name].double() for ci, s in zip(c, states))
    return ref.to(states[0][name].dtype)


def test_merge_matches_float64_and_republishes_the_packed_copy():
    states = _states(3)
    model, arena = _build(states)
    assert torch.equal(model.lin.packed, states[2]["lin.weight"])  # as loaded: the last row
    assert model.lin.weight.numel() == 0  # packing dropped it, as on vLLM's CPU backend
    c = [1.75, -0.75, 0.25]
    info = arena.merge(c, 1)
    assert info["launches"] == 2 and info["version"] == 1 and arena.version == 1
    live = arena.live_state()
    for name in states[0]:
        tol = 1e-2 if states[0][name].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(live[name], _expected(states, c, name), rtol=tol, atol=tol)
    torch.testing.assert_close(model.lin.packed, _expected(states, c, "lin.weight"), rtol=1e-6, atol=1e-6)
    # un-packed parameters are read live: views into the arena
    assert model.embed.weight.data_ptr() == live_ptr(arena, "embed.weight")
    x = torch.randn(2, 6)
    torch.testing.assert_close(model.lin(x), x @ _expected(states, c, "lin.weight").T + _expected(states, c, "lin.bias"))


def live_ptr(arena, name):
    for a in arena._arenas:
        for i, (n, _) in enumerate(a.params):
            if n == name:
                return a.view(i).data_ptr()
    raise KeyError(name)


def test_failed_republish_restores_the_served_weights():
    states = _states(3, seed=1)
    model, arena = _build(states)
    arena.merge([0.5, 0.5, 0.0], 1)
    packed = model.lin.packed.clone()
    model.lin.quant_method.fail_next = 1
    with pytest.raises(RuntimeError, match="packing failed"):
        arena.merge([0.0, 1.0, 0.0], 2)
    assert arena.version == 1 and arena.coefficients == [0.5, 0.5, 0.0]
    assert torch.equal(model.lin.packed, packed)
    torch.testing.assert_close(arena.live_state()["embed.weight"], _expected(states, [0.5, 0.5, 0.0], "embed.weight"))


@pytest.mark.parametrize("bad", [[1.0, 0.0], [1.0, float("nan"), 0.0], ["a", 0, 0]])
def test_bad_coefficients_are_refused_before_writing(bad):
    states = _states(3, seed=2)
    model, arena = _build(states)
    before = arena.live_state()
    with pytest.raises((ValueError, TypeError), match="coefficients must"):
        arena.merge(bad, 1)
    assert all(torch.equal(before[k], v) for k, v in arena.live_state().items()) and arena.version == 0


def test_a_weight_missing_from_a_source_is_named():
    with pytest.raises(ValueError, match=r"src0: parameters \['lin.bias'\] were not loaded"):
        _build(_states(2), skip="lin.bias")


def test_memory_is_checked_before_allocation(monkeypatch):
    monkeypatch.setattr(arena_mod, "free_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match=r"3 stored models \+ the live weights"):
        SoupArena(Toy(), ["a", "b", "c"])


def test_cpu_ranks_filling_their_arenas_from_one_host_memory_are_counted_together(monkeypatch):
    one_rank = SoupArena(Toy(), ["a", "b", "c"]).bytes_needed
    monkeypatch.setattr(arena_mod, "free_bytes", lambda device: one_rank)
    SoupArena(Toy(), ["a", "b", "c"])  # one rank fits exactly
    with pytest.raises(MemoryError, match="for 2 ranks"):
        SoupArena(Toy(), ["a", "b", "c"], host_ranks=2)  # tensor-parallel 2 on CPU: both ranks in the same RAM
