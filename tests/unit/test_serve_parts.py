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
        places = [await room.admit() for _ in range(5)]
        t0 = time.perf_counter()
        with pytest.raises(NoRoom):
            await room.admit()
        assert time.perf_counter() - t0 < 0.1  # at once: no stage call, no wait
        room.ingresses = 2  # another ingress replica: this one may hold ceil(5 / 2) = 3
        places[0].release(), places[1].release(), places[1].release()  # again: nothing (idempotent)
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
        places[2].release()
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


def test_a_place_goes_back_once_a_report_taken_after_its_hand_over_arrives(monkeypatch):
    """A request's place is held until the decoder's engine has it (handed over) AND a poll that started after that
    has answered: the poll answering meanwhile was taken before, so it did not count the request yet. A place never
    handed over stays held (the request is in no report); one handed over long ago goes back even if polls fail.
    (Held until the first output instead, a request admitted to `running` and still prefilling was counted twice.)"""

    import deployments.admission as admission
    from deployments.admission import STALE_S, DecoderRoom

    gates: list[asyncio.Event] = []

    async def replica_stats(app, deployment, timeout_s):
        gates.append(gate := asyncio.Event())
        await gate.wait()  # the test says when this poll's reports arrive
        return {"d1": {"queue_room": 4}}

    monkeypatch.setattr(admission, "replica_stats", replica_stats)
    monkeypatch.setattr(admission, "replica_actor_names", lambda app, deployment: ["ingress-1"])

    async def answer(n: int):
        """Let poll n answer, and wait until poll n + 1 has started."""
        while len(gates) <= n:
            await asyncio.sleep(0.001)
        gates[n].set()
        while len(gates) <= n + 1:
            await asyncio.sleep(0.001)

    async def run():
        room = DecoderRoom("crosstrim", period_s=0.0, timeout_s=5.0)
        room.ensure_started()
        await answer(0)
        held, kept = await room.admit(), await room.admit()
        assert room.held == 2 and room.share() == 4
        held.handed_over()  # the decoder said Queued while poll 1 was already on its way
        held.handed_over()  # again: the first time counts
        await answer(1)
        assert held in room.places and room.held == 2  # poll 1 was taken before the hand-over
        await answer(2)
        assert held.released and room.places == {kept}  # poll 2 started after it: its report counts the request
        kept.release(), kept.release()
        assert room.held == 0
        late = await room.admit()
        late.handed_over()
        late.handed_at -= STALE_S + 1  # handed over long ago, no poll answered since (the controller restarting)
        await room.admit()
        assert late.released and room.held == 1
        room.task.cancel()

    asyncio.run(run())


def test_the_front_door_refuses_before_the_body_is_read():
    """GuardMiddleware takes the request's place before reading the body: with no room, the 503 (OpenAI's error
    shape, Retry-After) comes although the body never arrives; a 401 stays a 401; /tokenize takes no place; an
    admitted request finds its place in the scope's state and gives it back when it ends, fails or its client
    leaves."""
    import json
    import time

    from deployments.admission import DecoderRoom
    from deployments.limits import Guard, GuardMiddleware

    async def run():
        room = DecoderRoom("crosstrim", timeout_s=0.05)
        room.task = asyncio.get_running_loop().create_future()  # no poller: the test sets the reports
        room.polled.set()
        room.reports = {"d1": (0, time.monotonic())}
        seen = []

        async def app(scope, receive, send):
            seen.append(scope["state"].get("place"))
            if scope["path"] == "/v1/completions":
                assert room.held == 1
                raise RuntimeError("the handler failed")
            if scope["path"] == "/v1/responses":
                raise asyncio.CancelledError  # the client went away
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def never():  # a body that never comes
            await asyncio.Event().wait()

        async def call(guard, path, headers=()):
            sent = []

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers),
                     "client": ("10.0.0.1", 1)}
            await asyncio.wait_for(GuardMiddleware(app, lambda: guard)(scope, never, send), 1.0)
            status = sent[0]["status"]
            return status, dict(sent[0]["headers"]), json.loads(sent[1]["body"]) if status != 200 else None

        guard = Guard(retry_after_s=3, admission=room)
        status, headers, body = await call(guard, "/v1/chat/completions")
        assert status == 503 and headers[b"retry-after"] == b"3" and body["error"]["code"] == 503
        assert "no room" in body["error"]["message"] and seen == [] and room.counts["refused_at_ingress"] == 1
        keyed = Guard(keys=("sk-1",), admission=room)
        assert (await call(keyed, "/v1/chat/completions"))[0] == 401
        assert (await call(guard, "/tokenize"))[0] == 200 and seen == [None]
        room.reports = {"d1": (5, time.monotonic())}
        assert (await call(guard, "/v1/chat/completions"))[0] == 200
        with pytest.raises(RuntimeError):
            await call(guard, "/v1/completions")
        with pytest.raises(asyncio.CancelledError):
            await call(guard, "/v1/responses")
            assert len(seen) == 4 and all(p.released for p in seen[1:]) and room.held == 0

    asyncio.run(run())


def test_the_ingress_hands_the_place_over_at_queued():
    """Ingress._head reads the decoder's stream up to the first output or error: the place is handed over at Queued
    (the decoder's engine has the request), not kept until the first token; a request refused before it is not."""
    from deployments.admission import DecoderRoom
    from deployments.ingress import Ingress
    from deployments.stream import Queued, StageError, TrimSummary
    from pipeline.types import RequestOutput

    summary = TrimSummary(10, 5, 0.5, 1, 2, "kv", 3, 1, 0.1)
    first = RequestOutput.__new__(RequestOutput)

    async def stream(*items):
        for item in items:
            yield item

    async def run():
        room = DecoderRoom("crosstrim")
        room.task = asyncio.get_running_loop().create_future()
        watch = SimpleNamespace(first=lambda items, stages, grace_s: items.__anext__())
        ingress = SimpleNamespace(watch=watch, cfg=SimpleNamespace(stage_wait_s=1.0))
        head = Ingress.func_or_class._head
        got, places = [], []
        for items in ([summary, Queued(), first], [Queued(), first], [summary, StageError(503, "full")]):
            places.append(place := await room.admit())
            got.append(await head(ingress, stream(*items), (), place))
        assert got == [(summary, first), (None, first), (summary, StageError(503, "full"))]
        assert [p.handed_at is not None for p in places] == [True, True, False]

    asyncio.run(run())


def test_trimmer_router_prefers_the_replica_holding_the_prefix_within_a_batch_of_the_least_busy():
    from deployments.trimmer_router import SLACK, rank_by_prefix
    from pipeline.model.trimmer_cache import TrimmerPrefixCache

    system, question = list(range(100, 164)), [7, 8, 9]
    cache = TrimmerPrefixCache(2**20, block_size=16, model_id="m")
    cache.put(cache.hashes(system, len(system), None), torch.zeros(1, 2, 1, len(system), 4))  # a holds it
    assert len(cache.digest()["pages"]) == 4

    def replica(rid, digest=None):
        return SimpleNamespace(replica_id=rid, routing_stats={"prefix": digest} if digest else {})

    a, b = replica("a", cache.digest()), replica("b", TrimmerPrefixCache(2**20, 16, "m").digest())
    order = lambda prompt, ongoing, *rs: [r.replica_id for r in rank_by_prefix(list(rs), ongoing, prompt)]  # noqa: E731
    assert order((system + question, None), {"a": 3, "b": 0}, b, a) == ["a", "b"]  # a holds it, busier
    assert order((system + question, None), {"a": SLACK + 1, "b": 0}, b, a) == ["b", "a"]  # too much busier
    assert order((system + question, "salted"), {"a": 1, "b": 0}, b, a) == ["b", "a"]  # another salt: least busy
    assert order(([1] * 67, None), {"a": 0, "b": 2}, b, a) == ["a", "b"]  # another prefix: least busy
    assert order(None, {"a": 2, "b": 0}, replica("a"), b) == ["b", "a"]  # not a trim call (no report yet)
