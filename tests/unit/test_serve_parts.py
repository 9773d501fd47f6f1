"""Serve-layer parts tested without a cluster: the decoder router's ranking, the encoder's feature cache, the
ingress's stage watch."""

import asyncio
from types import SimpleNamespace

import pytest
import torch


def test_router_prefers_most_free_kv():
    from deployments.router import rank_by_free_kv

    def replica(rid, **stats):
        return SimpleNamespace(replica_id=rid, routing_stats=stats)

    base = dict(requests=2, capacity=8, avg_request_kv_bytes=0)
    a = replica("a", kv_free_bytes=500, **{**base, "avg_request_kv_bytes": 100})
    b = replica("b", kv_free_bytes=900, **base)  # b has not seen a request yet
    order = lambda ongoing, *rs: [r.replica_id for r in rank_by_free_kv(list(rs), ongoing)]  # noqa: E731
    assert order({"a": 2, "b": 2}, a, b) == ["b", "a"]
    # Requests sent to b since its report use up its lead (at a's ~100 bytes a request): 900 - 500 < 500.
    assert order({"a": 2, "b": 7}, a, b) == ["a", "b"]
    # A full queue goes last whatever its KV.
    assert order({"a": 2, "b": 8}, b, a) == ["a", "b"]
    # A replica that has not reported yet counts as free as the freest, less what was sent to it since.
    c = replica("c")
    assert order({"a": 2, "b": 9, "c": 3}, a, b, c) == ["c", "a", "b"]  # c: 900 - 3 x 100 > 500
    assert order({"a": 2, "b": 9, "c": 5}, a, b, c) == ["a", "c", "b"]  # c: 900 - 5 x 100 < 500
    # Before any report: fewest requests in flight.
    assert order({"c": 1, "d": 0}, replica("c"), replica("d")) == ["d", "c"]
    # Equal free KV: fewer requests in flight wins.
    assert order({"a": 3, "b": 2}, replica("a", kv_free_bytes=5, **base), replica("b", kv_free_bytes=5, **base)) \
        == ["b", "a"]


def test_router_prefers_the_replica_holding_the_prefix_while_its_kv_allows():
    from deployments.router import rank_by_free_kv
    from pipeline.engine.prefix_cache import PrefixCache

    system, question = list(range(100, 164)), [7, 8, 9]
    cache = PrefixCache(block_size=16, model_id="m")
    cache.register(cache.hashes(system, len(system), None), list(range(4)))  # a holds the system prompt

    def replica(rid, free, digest=None):
        return SimpleNamespace(replica_id=rid, routing_stats=dict(
            requests=1, capacity=8, avg_request_kv_bytes=100, kv_free_bytes=free, prefix=digest))

    order = lambda prompt, *rs: [r.replica_id for r in rank_by_free_kv(list(rs), {}, prompt)]  # noqa: E731
    a, b = replica("a", 300, cache.digest()), replica("b", 900, PrefixCache(16, "m").digest())
    assert order((system + question, None), b, a) == ["a", "b"]  # a holds it and fits the request
    assert order((system + question, "salted"), b, a) == ["b", "a"]  # another salt shares nothing
    assert order(([1] * 67, None), b, a) == ["b", "a"]  # another prefix: free KV decides
    assert order(None, b, a) == ["b", "a"]
    assert order((system + question, None), b, replica("a", 50, cache.digest())) == ["b", "a"]  # a is full


def test_feature_cache_is_bounded_in_bytes():
    from deployments.encoder import FeatureCache

    def item(n):  # n KiB of features + a 4-token mask
        return torch.zeros(n * 256), torch.ones(4, dtype=torch.bool)

    cache = FeatureCache(10 * 1024 + 8)
    for key in "abc":
        cache.put(key, item(4))  # 3 x 4 KiB > 10 KiB: "a" goes
    assert list(cache.entries) == ["b", "c"] and cache.bytes == 2 * (4096 + 4)
    assert cache.get("b") is not None  # "b" is now the most recent: "c" goes next
    cache.put("d", item(4))
    assert list(cache.entries) == ["b", "d"]
    cache.put("huge", item(11))  # bigger than the whole cache: not kept, nothing evicted for it
    assert list(cache.entries) == ["b", "d"] and cache.bytes <= cache.max_bytes
    off = FeatureCache(0)
    off.put("a", item(1))
    assert not off.entries and off.get("a") is None


def test_stage_watch_ends_a_wait_when_its_stage_has_no_replica():
    """The ingress's wait for a first token ends with StageUnavailable once a stage it needs reports no running
    replica (Serve alone would hold the request until one is back); items that arrive are returned."""
    from deployments.availability import StageUnavailable, StageWatch

    class Items:  # a decoder stream whose first item comes after `delay` seconds (never, if None)
        def __init__(self, delay):
            self.delay = delay

        async def __anext__(self):
            await asyncio.sleep(3600 if self.delay is None else self.delay)
            return {"new_text": "x"}

    async def run():
        watch = StageWatch("crosstrim", period_s=0.05)
        watch.task = asyncio.get_running_loop().create_future()  # no poller: the test sets the counts
        watch.running = {"VisionEncoder": 1, "Trimmer": 1, "DecoderPool": 1}
        assert await watch.first(Items(0.01), ("DecoderPool",)) == {"new_text": "x"}
        assert watch.down() == [] and watch.report()["stages"]["DecoderPool"] == "ok"

        async def lose_decoder():
            await asyncio.sleep(0.2)
            watch.running["DecoderPool"] = 0

        loss = asyncio.ensure_future(lose_decoder())
        # The item never comes: only the watch can end the wait (the generous bound turns a hang into a failure,
        # as a TimeoutError, not the StageUnavailable asked for).
        with pytest.raises(StageUnavailable, match="DecoderPool"):
            await asyncio.wait_for(watch.first(Items(None), ("VisionEncoder", "Trimmer", "DecoderPool")), 120)
        await loss
        with pytest.raises(StageUnavailable):
            watch.check(("DecoderPool",))
        watch.check(("VisionEncoder", "Trimmer"))  # a request those stages serve alone is not refused
        assert watch.report()["stages"]["DecoderPool"] == "unavailable"

    asyncio.run(run())


def test_front_door_admission_holds_its_share_of_the_decoder_room():
    """The ingress's admission (deployments/admission.py) without a cluster: places held against the reported queue
    room, split between ingress replicas; a refusal at once (wait 0) or after a bounded wait; a place given back
    wakes a waiter; a stale report counts as no room; no report yet admits (the decoder decides)."""
    import time

    from deployments.admission import DecoderRoom, NoRoom

    async def run():
        room = DecoderRoom("crosstrim", wait_s=0.0, timeout_s=0.05)
        room.task = asyncio.get_running_loop().create_future()  # no poller: the test sets the reports
        room.polled.set()
        now = time.monotonic()
        room.reports = {"d1": (3, now), "d2": (2, now)}
        for _ in range(5):
            await room.admit()
        t0 = time.perf_counter()
        with pytest.raises(NoRoom):
            await room.admit()
        assert time.perf_counter() - t0 < 0.1  # at once: no stage call, no wait
        room.ingresses = 2  # another ingress replica: this one may hold ceil(5 / 2) = 3
        room.release(), room.release()
        assert room.held == 3
        with pytest.raises(NoRoom):
            await room.admit()
        room.reports["d2"] = (2, now - 60)  # silent for a minute: its room is not counted
        assert room.room() == 3 and room.share() == 2
        room.ingresses, room.wait_s = 1, 5.0
        room.reports = {"d1": (3, time.monotonic())}
        waiter = asyncio.ensure_future(room.admit())  # 3 held of 3: waits for a place
        await asyncio.sleep(0.05)
        assert not waiter.done()
        room.release()
        await asyncio.wait_for(waiter, 5)
        assert room.held == 3 and room.counts["refused_at_ingress"] == 2 and room.counts["admitted"] == 6
        room.wait_s = 0.2
        t0 = time.perf_counter()
        with pytest.raises(NoRoom):
            await room.admit()
        assert 0.2 <= time.perf_counter() - t0 < 2
        fresh = DecoderRoom("crosstrim", timeout_s=0.05)
        fresh.task = asyncio.get_running_loop().create_future()
        await fresh.admit()  # no report came: admitted, the decoder being the last line of defense
        room.refused_by_decoder(2)
        report = room.report()
        assert report["refused_at_decoder"] == 1 and report["stage_calls_for_refused"] == 2
        assert report["stage_calls_per_refused"] == pytest.approx(2 / 4)

    asyncio.run(run())
