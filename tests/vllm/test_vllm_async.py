"""AsyncSoup on vLLM's AsyncLLM, tensor-parallel 2 on CPU: re-merges while requests are in flight.

One engine for the module (two worker processes, one per rank, driven from one
event loop). Every output must be entirely old or entirely new weights, and
tagged with the version it used.
"""

from __future__ import annotations

import asyncio

import pytest
from vllm_helpers import BETA

from bonesoup.vllm import AsyncSoup

LONG = 40  # tokens per in-flight request: a re-merge in the middle would show as a divergence


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def eng(tiny, loop):
    eng = loop.run_until_complete(AsyncSoup.create(tiny[0], tiny[1], beta=BETA, dtype="float32",
                                                   tensor_parallel_size=2, max_model_len=512, max_num_seqs=8))
    yield eng
    loop.run_until_complete(eng.shutdown())


async def _collect(eng, ids, request_id, sp, started: asyncio.Event | None = None):
    versions, last = set(), None
    async for out in eng.generate({"prompt_token_ids": list(ids)}, sp, request_id):
        versions.add(out.weights_version)
        last = out
        if started is not None:
            started.set()
    assert last.finished
    return list(last.outputs[0].token_ids), versions, last.outputs[0].weight_versions


def _sp(max_tokens):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_tensor_parallel_2_remerge_equals_offline_merge(eng, loop, tiny, prompts, reference):
    async def run():
        info = await eng.set_preference([0.3, 0.7], alpha=0.2)
        assert info["ranks"] == 2 and info["version"] == eng.version == 1
        ranks = await eng.info()
        assert sorted(r["rank"] for r in ranks) == [0, 1]
        assert all(r["version"] == 1 and r["coefficients"] == info["coefficients"] for r in ranks)
        return await asyncio.gather(*(_collect(eng, p, f"tp-{i}", _sp(16)) for i, p in enumerate(prompts)))

    results = loop.run_until_complete(run())
    assert [r[0] for r in results] == reference(tiny, [0.3, 0.7], 0.2, prompts=prompts)
    assert all(r[1] == {1} for r in results)


def test_requests_in_flight_across_a_remerge_are_entirely_old_or_entirely_new(eng, loop, tiny, prompts, reference):
    old, new = [1.0, 0.0], [0.0, 1.0]

    async def run():
        await eng.set_preference(old)
        v_old = eng.version
        starts = [asyncio.Event() for _ in prompts[:3]]
        early = [asyncio.create_task(_collect(eng, p, f"early-{v_old}-{i}", _sp(LONG), s))
                 for i, (p, s) in enumerate(zip(prompts[:3], starts))]
        await asyncio.gather(*(s.wait() for s in starts))  # every early request is decoding
        change = asyncio.create_task(eng.set_preference(new))
        for _ in range(5):
            await asyncio.sleep(0)  # the change has begun: later requests wait for the new weights
        waited_for = eng._gate._inflight  # early requests the change is waiting for (must be some)
        late = [asyncio.create_task(_collect(eng, p, f"late-{v_old}-{i}", _sp(LONG)))
                for i, p in enumerate(prompts[:3])]
        early_r, info, late_r = await asyncio.gather(asyncio.gather(*early), change, asyncio.gather(*late))
        return v_old, early_r, info, late_r, waited_for

    v_old, early_r, info, late_r, waited_for = loop.run_until_complete(run())
    assert info["version"] == v_old + 1
    assert waited_for >= 1, "the early requests finished before the re-merge began: nothing was in flight"
    ref_old = reference(tiny, old, prompts=prompts[:3], max_tokens=LONG)
    ref_new = reference(tiny, new, prompts=prompts[:3], max_tokens=LONG)
    assert all(a != b for a, b in zip(ref_old, ref_new))
    assert [r[0] for r in early_r] == ref_old
    assert [r[0] for r in late_r] == ref_new
    for r, v in [(r, v_old) for r in early_r] + [(r, v_old + 1) for r in late_r]:
        assert r[1] == {v}  # our tag, on every streamed output
        assert [(s.version, s.start, s.end) for s in r[2]] == [(str(v), 0, LONG)]  # vLLM's, on the last


def test_failures_leave_the_engine_serving(eng, loop, tiny, prompts, reference):
    async def run():
        await eng.set_preference([0.5, 0.5])
        version = eng.version
        with pytest.raises(ValueError, match="sum to 1"):
            await eng.set_preference([0.5, 0.6])
        assert not await eng.engine.is_paused()
        # raw coefficients are checked in the workers: both ranks refuse, the engine resumes
        with pytest.raises(ValueError, match="rank 0: coefficients must hold 3.*rank 1: coefficients must hold 3"):
            await eng.set_coefficients([1.0])
        assert not await eng.engine.is_paused()
        assert eng.version == version
        assert all(r["version"] == version for r in await eng.info())
        return version, await _collect(eng, prompts[0], "after-failure", _sp(16))

    version, (tokens, versions, _) = loop.run_until_complete(run())
    assert versions == {version}
    assert tokens == reference(tiny, [0.5, 0.5], prompts=prompts[:1])[0]
