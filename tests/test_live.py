"""LiveSoup: in-place re-merge of a live model, atomic for readers."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import bonesoup.merge.live as live_mod
from bonesoup import merge_checkpoints
from bonesoup.merge.live import LiveSoup
from bonesoup.tasks.tiny_models import make_tiny_backbones


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    sft, bbs = make_tiny_backbones(root, 2, seed=11, shard_size="100KB")
    return root, sft, bbs


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("pref, alpha", [([0.8, 0.2], 0.0), ([1.0, 0.0], 0.3), ([0.3, 0.7], -0.1)])
def test_matches_offline_merge_bit_for_bit(tiny, pref, alpha):
    root, sft, bbs = tiny
    model = _load(sft)
    soup = LiveSoup(model, bbs, beta=0.7, sft=sft)
    info = soup.set_preference(pref, alpha=alpha)
    out = root / f"offline-{pref}-{alpha}"
    merge_checkpoints(bbs, out, preference=pref, beta=0.7, alpha=alpha, sft=sft, force=True, progress=False)
    ref = _load(out).state_dict()
    for name, w in model.state_dict().items():
        assert torch.equal(w, ref[name]), name
    assert info.version == 1 and soup.version == 1
    assert info.launches == 1 and info.bytes_moved == 4 * soup.param_bytes
    assert info.coefficients == pytest.approx(soup.coefficients(pref, alpha))


def test_tied_head_follows_and_generation_matches(tiny):
    root, sft, bbs = tiny
    model = _load(sft)
    assert model.lm_head.weight is model.transformer.wte.weight
    soup = LiveSoup(model, bbs, beta=0.7, sft=sft)
    soup.set_preference([0.6, 0.4], alpha=0.2)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    out = root / "gen-ref"
    merge_checkpoints(bbs, out, preference=[0.6, 0.4], beta=0.7, alpha=0.2, sft=sft, force=True, progress=False)
    ref = _load(out)
    ids = torch.tensor([[5, 17, 42, 7]])
    with soup.reading() as version, torch.no_grad():
        got = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert version == 1 and torch.equal(got, want)


def test_state_dicts_rewarded_and_delta_store(tiny):
    _, sft, bbs = tiny
    sds = [_load(p).state_dict() for p in bbs]
    sft_sd = _load(sft).state_dict()
    full = _load(sft)
    LiveSoup(full, sds, method="rewarded", sft=sft_sd).set_preference([0.25, 0.75], alpha=0.5)
    delta = _load(sft)
    LiveSoup(delta, sds, method="rewarded", sft=sft_sd, store="delta").set_preference([0.25, 0.75], alpha=0.5)
    for name, w in full.state_dict().items():
        ref = 1.5 * (0.25 * sds[0][name].double() + 0.75 * sds[1][name].double()) - 0.5 * sft_sd[name].double()
        torch.testing.assert_close(w.double(), ref, rtol=0, atol=2e-6)
        torch.testing.assert_close(delta.state_dict()[name].double(), ref, rtol=0, atol=2e-6)


def test_version_and_refusals(tiny):
    _, sft, bbs = tiny
    model = _load(sft)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    soup = LiveSoup(model, bbs, beta=0.7)
    assert soup.version == 0 and soup.preference is None
    for k, v in model.state_dict().items():  # construction does not change the weights
        assert torch.equal(v, before[k])
    for bad, match in [([0.5, 0.6], "sum to 1"), ([0.5, 0.25, 0.25], "must have 2 entries"),
                       ([1.5, -0.5], "non-negative"), ([float("nan"), 1.0], "finite")]:
        with pytest.raises(ValueError, match=match):
            soup.set_preference(bad)
    with pytest.raises(ValueError, match="built without"):
        soup.set_preference([0.5, 0.5], alpha=0.1)
    assert soup.version == 0
    assert soup.set_preference([0.5, 0.5]).version == 1
    assert soup.set_preference([0.5, 0.5]).version == 2


def test_construction_errors(tiny, monkeypatch):
    _, sft, bbs = tiny
    sd = _load(bbs[0]).state_dict()
    broken = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc.weight'.*missing from backbones\[1\]"):
        LiveSoup(_load(sft), [sd, broken], beta=0.7)
    wrong = dict(sd, **{"transformer.h.0.attn.c_attn.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"c_attn.bias' has shape \(192,\) in the model but \(5,\)"):
        LiveSoup(_load(sft), [sd, wrong], beta=0.7)
    with pytest.raises(ValueError, match="beta is required"):
        LiveSoup(_load(sft), bbs)
    with pytest.raises(ValueError, match="sft is required"):
        LiveSoup(_load(sft), bbs, beta=0.7, store="delta")
    monkeypatch.setattr(live_mod, "_free_bytes", lambda device: 1000)
    model = _load(sft)
    ptr = model.transformer.wte.weight.data_ptr()
    with pytest.raises(MemoryError, match=r"needs .* GiB .* only 0.00 GiB is free"):
        LiveSoup(model, bbs, beta=0.7)
    assert model.transformer.wte.weight.data_ptr() == ptr  # nothing was re-pointed


def test_readers_never_see_a_mix(tiny):
    """Readers checksum every weight under reading(); a writer keeps re-merging.

    Each reader's checksum must be one of the whole-model checksums of the
    preferences being set (a torn read would mix two of them).
    """
    _, sft, bbs = tiny
    model = _load(sft)
    soup = LiveSoup(model, bbs, beta=0.7)
    prefs = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    sums = {}
    for p in prefs:
        soup.set_preference(p)
        sums[tuple(p)] = sum(float(w.detach().double().sum()) for w in model.parameters())
    seen, errors = [], []
    stop = time.monotonic() + 3.0

    def reader():
        while time.monotonic() < stop:
            with soup.reading() as version:
                s = sum(float(w.detach().double().sum()) for w in model.parameters())
                pref = tuple(soup.preference)
                time.sleep(0.001)  # hold the read lock across a possible re-merge attempt
                s2 = sum(float(w.detach().double().sum()) for w in model.parameters())
                seen.append(version)
                if s != s2 or s != sums[pref]:
                    errors.append((version, pref, s, s2))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    merges = 0
    while time.monotonic() < stop:
        soup.set_preference(prefs[merges % 3])
        merges += 1
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert merges > 10 and len(seen) > 30 and len(set(seen)) > 3


@pytest.mark.gpu
def test_cuda_live_soup_matches_cpu(tiny):
    _, sft, bbs = tiny
    cpu, gpu = _load(sft), _load(sft).cuda()
    LiveSoup(cpu, bbs, beta=0.7, sft=sft).set_preference([0.7, 0.3], alpha=0.2)
    soup = LiveSoup(gpu, bbs, beta=0.7, sft=sft)
    assert soup.device.type == "cuda"
    info = soup.set_preference([0.7, 0.3], alpha=0.2)
    assert info.launches == 1
    for name, w in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[name].cpu(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("store", ["full", "delta"])
def test_set_coefficients_one_hot_is_bit_for_bit_and_matches_set_preference(tiny, store):
    from safetensors.torch import load_file
    from bonesoup.merge.coefficients import per_objective_extrapolation
    from bonesoup.merge.checkpoint import CheckpointDir

    root, sft, bbs = tiny
    model = _load(sft)
    soup = LiveSoup(model, bbs, beta=0.7, sft=sft, store=store)

    def stored(path):
        ck = CheckpointDir(path)
        out = {}
        for f in set(ck.weight_map.values()):
            out.update(load_file(ck.path / f))
        return out

    # One-hot rows serve each stored model exactly (store="delta" refolds: d_j + s is not bit-exact).
    if store == "full":
        for j, path in enumerate([*bbs, sft]):
            c = [0.0] * 3
            c[j] = 1.0
            info = soup.set_coefficients(c)
            want = stored(path)
            for name, w in model.state_dict().items():
                key = name if name in want else "transformer.wte.weight"  # tied head
                assert torch.equal(w, want[key]), (j, name)
            assert info.preference == [] and soup.preference is None
    # Raw coefficients equal to what set_preference computes give the same weights bit for bit.
    soup.set_preference([0.3, 0.7], alpha=0.25)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    c, c_sft = per_objective_extrapolation([0.3, 0.7], [1.25, 1.25], beta=0.7)
    soup.set_coefficients([*c, c_sft])
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w, a[name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="coefficients must hold 3 finite"):
        soup.set_coefficients([1.0, 0.0])
    with pytest.raises(ValueError, match="coefficients must hold 3 finite"):
        soup.set_coefficients([1.0, 0.0, float("nan")])


def test_a_registered_method_works_live_and_offline_by_name(tiny, monkeypatch):
    """The registry is the one place a method is added: LiveSoup and the offline merge accept it by name."""
    import numpy as np

    from bonesoup.merge.methods import MERGE_METHODS, MergeMethod

    root, sft, bbs = tiny
    with pytest.raises(ValueError, match="method must be one of 'bone', 'rewarded'.*got 'uniform'"):
        LiveSoup(_load(sft), bbs, method="uniform")
    monkeypatch.setitem(MERGE_METHODS, "uniform", MergeMethod(
        "uniform", "test only: every backbone 1/n", False, lambda n, beta: np.full((n, n), 1.0 / n)))
    model = _load(sft)
    soup = LiveSoup(model, bbs, method="uniform")  # needs_beta=False: no beta asked for
    soup.set_preference([0.9, 0.1])
    assert soup.coefficients([0.9, 0.1]) == pytest.approx([0.5, 0.5])  # no sft row
    out = merge_checkpoints(bbs, root / "offline-uniform", preference=[0.9, 0.1], method="uniform", force=True,
                            progress=False)
    ref = _load(out).state_dict()
    a, b = _load(bbs[0]).state_dict(), _load(bbs[1]).state_dict()
    for name, w in model.state_dict().items():
        assert torch.equal(w, ref[name]), name
        if w.is_floating_point():
            torch.testing.assert_close(w, 0.5 * a[name] + 0.5 * b[name], rtol=0, atol=1e-6)
