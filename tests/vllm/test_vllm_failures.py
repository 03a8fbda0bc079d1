"""Failure paths of the vLLM clients without an engine: cancelled changes, a failure after every rank switched,
adapter slots and directories after failed or cancelled acquisitions.

The fake engines behave as vLLM's: an RPC once sent runs to its end in the
engine core whatever happens to the caller (``asyncio.shield``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading

import pytest
from vllm_helpers import BETA

import bonesoup.vllm.adapters as adapters_mod
from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2_adapters
from bonesoup.vllm.adapters import AsyncAdapterSoup, MixtureCache
from bonesoup.vllm.client import AsyncSoup, _Gate, _Preferences


class FakeSoupEngine:
    """The AsyncLLM calls AsyncSoup makes; ``coefficients`` / ``tag`` are what the workers / outputs hold."""

    def __init__(self, k: int = 3):
        self.coefficients, self.tag = [0.0] * (k - 1) + [1.0], "0"
        self.rpc_started, self.rpc_go = asyncio.Event(), asyncio.Event()
        self.rpc_go.set()
        self.fail_tag = False

    async def pause_generation(self, **kw):
        pass

    async def resume_generation(self):
        pass

    async def reset_prefix_cache(self):
        return True

    async def update_weight_version(self, version: str):
        if self.fail_tag:
            self.fail_tag = False
            raise RuntimeError("engine core unreachable")
        self.tag = version

    async def collective_rpc(self, method, args=()):
        async def core():
            self.rpc_started.set()
            await self.rpc_go.wait()
            self.coefficients = list(args[0])
            return [{"merge_s": 1e-3, "publish_s": 1e-3, "launches": 1, "bytes_moved": 0, "version": args[1],
                     "rank": 0}]

        return await asyncio.shield(asyncio.ensure_future(core()))


def _soup(engine):
    return AsyncSoup(engine, _Preferences(2, "bone", BETA), "sft", ["b0", "b1"])


def test_a_cancelled_change_reopens_the_gate():
    async def run():
        gate, hold = _Gate(), asyncio.Event()

        async def request(wait=None):
            async with gate.request():
                if wait is not None:
                    await wait.wait()
            return True

        held = asyncio.ensure_future(request(hold))
        await asyncio.sleep(0)

        async def change():
            async with gate.change():
                pass

        changing = asyncio.ensure_future(change())
        await asyncio.sleep(0.01)  # waiting for the held request to finish
        changing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await changing
        admitted = await asyncio.wait_for(request(), 2.0)  # not held back by a change that is gone
        hold.set()
        return admitted and await held

    assert asyncio.run(run())


def test_a_cancelled_set_preference_leaves_weights_and_version_agreeing():
    async def run():
        engine = FakeSoupEngine()
        soup = _soup(engine)
        engine.rpc_go.clear()
        task = asyncio.ensure_future(soup.set_preference([0.3, 0.7]))
        await engine.rpc_started.wait()
        task.cancel()
        await asyncio.sleep(0.01)
        engine.rpc_go.set()  # the workers merge anyway
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine, soup

    engine, soup = asyncio.run(run())
    assert engine.coefficients == soup._coefficients == soup.coefficients([0.3, 0.7])
    assert engine.tag == str(soup.version) == "1" and soup.preference == [0.3, 0.7]


def test_a_failure_after_every_rank_switched_puts_the_served_weights_back():
    async def run():
        engine = FakeSoupEngine()
        soup = _soup(engine)
        await soup.set_preference([1.0, 0.0])
        served = list(engine.coefficients)
        engine.fail_tag = True
        with pytest.raises(RuntimeError, match="engine core unreachable"):
            await soup.set_preference([0.3, 0.7])
        return engine, soup, served

    engine, soup, served = asyncio.run(run())
    assert engine.coefficients == served == soup._coefficients
    assert soup.version == 1 and engine.tag == "1" and soup.preference == [1.0, 0.0]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_tiny_qwen2_adapters(tmp_path_factory.mktemp("qwen2-lora-failures"), 2, rank=2)


def test_a_failed_make_evicts_nothing(lora, tmp_path, monkeypatch):
    cache = MixtureCache(lora[1], sft=lora[0], beta=BETA, capacity=1, cache_dir=tmp_path)
    a, _ = cache.acquire([1.0, 0.0])
    cache.release(a)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(adapters_mod, "mixture_adapter", disk_full)
    with pytest.raises(OSError, match="No space"):
        cache.acquire([0.0, 1.0])
    assert cache.cached() == [a] and (a.path / "adapter_config.json").is_file()  # still cached, still on disk


def test_discarding_a_late_eviction_keeps_the_directory_of_its_remade_target(lora, tmp_path):
    cache = MixtureCache(lora[1], sft=lora[0], beta=BETA, capacity=1, cache_dir=tmp_path)
    a, _ = cache.acquire([1.0, 0.0])
    cache.release(a)
    b, evicted = cache.acquire([0.0, 1.0])
    assert evicted == [a]
    cache.release(b)
    a2, evicted = cache.acquire([1.0, 0.0])  # made again before a's directory was discarded: the same directory
    assert evicted == [b] and a2.path == a.path and a2.id != a.id
    cache.discard(a)
    cache.discard(b)
    assert (a2.path / "adapter_config.json").is_file() and not b.path.exists()


class FakeLoraEngine:
    def __init__(self):
        self.removed: list[int] = []

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return True


def test_a_cancelled_acquisition_leaves_no_slot_pinned(lora, tmp_path):
    cache = MixtureCache(lora[1], sft=lora[0], beta=BETA, capacity=1, cache_dir=tmp_path)
    started, go = threading.Event(), threading.Event()
    acquire = cache.acquire

    def slow_acquire(*args, **kwargs):
        started.set()
        go.wait(10)
        return acquire(*args, **kwargs)

    cache.acquire = slow_acquire

    async def run():
        engine = FakeLoraEngine()
        soup = AsyncAdapterSoup(engine, cache)
        go.set()
        async with soup.mixture([1.0, 0.0]) as a:
            pass
        go.clear()
        started.clear()

        async def hold_b():
            async with soup.mixture([0.0, 1.0]):
                await asyncio.sleep(60)

        task = asyncio.ensure_future(hold_b())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()  # while the thread makes b (and evicts a)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        go.set()
        while cache.created < 2:  # the thread finishes on its own
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        b = cache.cached()[0]

        async def third():
            async with soup.mixture([0.5, 0.5]) as c:
                return c

        c = await asyncio.wait_for(third(), 10.0)  # b is not pinned: its slot is reused
        return engine, a, b, c

    engine, a, b, c = asyncio.run(run())
    assert engine.removed == [a.id, b.id]  # the abandoned acquisition's eviction is removed too
    assert cache.cached() == [c] and c.refs == 0 and not a.path.exists() and not b.path.exists()


class HangingBackend:
    """AsyncSoup's interface; every request decodes forever (vLLM gone, say)."""

    engine = type("E", (), {"model_config": type("C", (), {"max_model_len": 64})()})()

    def coefficients(self, preference, alpha=0.0):
        return [*preference, 0.0]

    async def set_preference(self, preference, alpha=0.0):
        return {"version": 1, "preference": list(preference), "alpha": alpha, "coefficients": [*preference, 0.0],
                "seconds": 0.0, "bytes_moved": 0, "launches": 1}

    async def generate(self, prompt, sampling_params, request_id, **kw):
        await asyncio.Event().wait()
        yield None

    async def shutdown(self):
        pass


def test_stopping_the_engine_fails_every_outstanding_request(monkeypatch):
    from bonesoup.serve.protocol import RequestError
    from bonesoup.serve.vllm_engine import VLLMEngine, VLLMSoup

    soup = VLLMSoup(sft="sft", backbones=["b0", "b1"], adapters=False, method="bone", beta=BETA)

    async def fake_open(self):
        self._idle = asyncio.Condition()
        self.soup.backend = HangingBackend()
        self.context_length = 64

    monkeypatch.setattr(VLLMEngine, "_open", fake_open)
    engine = VLLMEngine(soup, type("T", (), {"eos_token_id": 0})())
    engine.start(30)
    engine.submit(engine.preference_job([0.5, 0.5])).result(10)
    running = engine.submit(engine.make_job([[1, 2, 3]], None, max_tokens=4))  # the live target: decodes now
    waiting = engine.submit(engine.make_job([[1, 2]], ((1.0, 0.0), 0.0), max_tokens=4))  # waits for a re-merge
    with pytest.raises(concurrent.futures.TimeoutError):
        running.result(0.2)
    engine.stop(10)
    for fut in (running, waiting):
        with pytest.raises(RequestError) as e:
            fut.result(5)
        assert e.value.status == 503
    assert not engine.alive
    with pytest.raises(RequestError, match="not running"):
        engine.submit(engine.make_job([[1]], None, max_tokens=1))


def _serve_args(*argv):
    import argparse

    from bonesoup.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", "--engine", "vllm", *map(str, argv)])


def test_vllm_serve_takes_the_hf_engines_adapter_flag_and_refuses_its_other_flags(tmp_path):
    from bonesoup.serve.vllm_engine import build_vllm_app

    # --max-tokens-limit 0 would be refused too: the adapters must be checked first, not dropped for the default
    with pytest.raises(FileNotFoundError, match="nope-0"):
        build_vllm_app(_serve_args("--adapters", tmp_path / "nope-0", tmp_path / "nope-1", "--beta", BETA,
                                   "--workdir", tmp_path, "--max-tokens-limit", 0))
    with pytest.raises(ValueError, match="--lora-rank is for --engine hf"):
        build_vllm_app(_serve_args("--lora-rank", 4, "--workdir", tmp_path))
