"""The decode step over its per-step metadata: every attention backend (the CPU padded call, the per-sequence
loop, the CUDA varlen backend on the CPU reference kernel) gives the same attention and the same tokens, a decode
step reads the device back at most once (the sampler's read), never per layer, and the CUDA-graph path (bucketing,
padding, static buffers; through a CPU stand-in of a captured graph) gives the eager forward's logits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import EngineConfig, TrimConfig
from pipeline.engine.attention import CpuAttention, VarlenPagedAttention
from pipeline.engine.cuda_graphs import DecodeGraphs, buckets, image_tokens
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.model_runner import ModelRunner
from pipeline.engine.sampling import SamplingParams
from pipeline.engine.scheduler import Scheduler
from pipeline.engine.step_batch import build_decode_batch, decode_batch
from pipeline.engine.varlen_ref import varlen_reference
from pipeline.model.layers import attend_chunks, attend_one
from tests.helpers import PROMPTS

HEADS, KVH, HD = 8, 2, 16


def _fragmented_tables(kv: KVCache, lengths, kept):
    """Tables whose later pages are not after their first ones: a page held by another right after each table's
    last page (freed after) makes its growth land elsewhere."""
    tables = [kv.allocate(n, c) for n, c in zip(lengths, kept)]
    blockers = [kv.blocks.allocate(1, after=t.self_pages[-1]) for t in tables]
    grown = []
    for t, n in zip(tables, lengths):
        assert kv.grow(t, n + 9)
        grown.append(n + 9)
    for b in blockers:
        kv.blocks.free(b)
    return tables, grown


@pytest.mark.parametrize("layout", ["run", "page"])
def test_backends_equal_the_per_sequence_path(layout):
    """Ragged lengths, GQA, pages out of order, a text-only row and a row with a partial cross mask."""
    torch.manual_seed(0)
    kv = KVCache(2**21, 6, [1, 4], KVH, HD, torch.float32, "cpu", block_size=4, cross_layout=layout)
    kv.arenas[0].data.normal_()
    lengths, kept = [1, 6, 23, 3, 40], [5, 0, 17, 9, 30]
    tables, lengths = _fragmented_tables(kv, lengths, kept)
    assert any(t.self_base is None for t in tables), "some table is fragmented"
    masks = [None, None, torch.rand(kept[2]) > 0.5, None, None]
    batch = build_decode_batch([1] * len(tables), lengths, tables, masks, "cpu")
    assert batch.cross.partial == [1]  # the third table is the second row with an image
    loop, padded = CpuAttention(kv, padded_elems=0), CpuAttention(kv, padded_elems=10**9)
    backends = [padded] + ([VarlenPagedAttention(kv, kernel=varlen_reference)] if layout == "page" else [])
    q = torch.randn(len(tables), HEADS, 1, HD)
    qc = q[batch.cross.rows]
    steps = {b: b.prepare(batch) for b in [loop, *backends]}
    assert steps[loop].self_index is None and steps[padded].self_index is not None
    for kv_layer in range(kv.num_self):
        want = loop.self_attn(q, steps[loop], kv_layer, HD**-0.5)
        for b in backends:
            torch.testing.assert_close(b.self_attn(q, steps[b], kv_layer, HD**-0.5), want, atol=1e-5, rtol=0)
    for kv_layer in range(kv.num_cross):
        want = loop.cross_attn(qc, steps[loop], kv_layer, HD**-0.5)
        for b in backends:
            torch.testing.assert_close(b.cross_attn(qc, steps[b], kv_layer, HD**-0.5), want, atol=1e-5, rtol=0)
    # the loop itself against a dense attention over each sequence's K/V
    for i, (t, n) in enumerate(zip(tables, lengths)):
        k, v = kv.self_kv(t, 0, n)
        dense = torch.nn.functional.scaled_dot_product_attention(q[i : i + 1], k[None], v[None], scale=HD**-0.5,
                                                                 enable_gqa=True)
        torch.testing.assert_close(loop.self_attn(q, steps[loop], 0, HD**-0.5)[i], dense[0], atol=1e-5, rtol=0)


def test_gathered_cross_kv_is_kept_while_the_rows_stay_the_same():
    """The padded path gathers a cross layer's K/V once while the rows with an image are the same allocations in
    the same order; a change of rows (or order) gathers afresh, and the kept gather equals a fresh one."""
    torch.manual_seed(2)
    kv = KVCache(2**21, 6, [1, 4], KVH, HD, torch.float32, "cpu", block_size=4)
    kv.arenas[0].data.normal_()
    tables = [kv.allocate(n, c) for n, c in [(3, 5), (6, 9), (2, 4)]]
    keeping, fresh = CpuAttention(kv, padded_elems=10**9), CpuAttention(kv, padded_elems=10**9, gathered_cross_bytes=0)
    q = torch.randn(3, HEADS, 1, HD)

    def step(order):
        batch = build_decode_batch([1] * 3, [3, 6, 2], [tables[i] for i in order], [None] * 3, "cpu")
        a, b = keeping.prepare(batch), fresh.prepare(batch)
        for kv_layer in range(kv.num_cross):
            torch.testing.assert_close(keeping.cross_attn(q, a, kv_layer, HD**-0.5),
                                       fresh.cross_attn(q, b, kv_layer, HD**-0.5), atol=0, rtol=0)
        assert not b.gathered_cross
        return a.gathered_cross

    first = step([0, 1, 2])
    kept = dict(first)
    assert step([0, 1, 2]) is first and all(first[k] is kept[k] for k in kept) and len(kept) == kv.num_cross
    assert step([2, 1, 0]) is not first
    kv.release(tables[0])
    tables[0] = kv.allocate(3, 5)  # a new allocation, possibly the same pages: gathered afresh
    assert tables[0].allocation not in (t.allocation for t in tables[1:])
    assert step([2, 1, 0]) is not first


def test_attention_over_page_runs_equals_attention_over_their_concatenation():
    """The loop reads fragmented cross pages run by run (no copy): the same as one attention over the joined K/V."""
    torch.manual_seed(1)
    q = torch.randn(HEADS, HD)
    runs = [(torch.randn(KVH, n, HD), torch.randn(KVH, n, HD)) for n in (8, 3, 16)]
    keys, values = (torch.cat([r[i] for r in runs], dim=1) for i in (0, 1))
    mask = torch.rand(27) > 0.3
    for m in (None, mask):
        torch.testing.assert_close(attend_chunks(q, runs, HD**-0.5, mask=m), attend_one(q, keys, values, HD**-0.5,
                                                                                       mask=m), atol=1e-6, rtol=0)


def test_new_tokens_land_in_their_slots():
    kv = KVCache(2**20, 3, [1], KVH, HD, torch.float32, "cpu", block_size=4)
    tables, lengths = _fragmented_tables(kv, [2, 7], [0, 3])
    batch = build_decode_batch([5, 6], lengths, tables, [None, None], "cpu")
    assert batch.slots.tolist() == [t.self_slot(n - 1) for t, n in zip(tables, lengths)]
    k, v = torch.randn(2, KVH, 1, HD), torch.randn(2, KVH, 1, HD)
    CpuAttention(kv).write_self(1, k, v, batch)
    for i, (t, n) in enumerate(zip(tables, lengths)):
        keys, values = kv.self_kv(t, 1, n)
        assert torch.equal(keys[:, -1], k[i, :, 0]) and torch.equal(values[:, -1], v[i, :, 0])


@pytest.fixture(scope="module")
def sources(tiny_pipeline, imgs):
    pipe = tiny_pipeline
    specs = [(PROMPTS[0], ["1tile"], TrimConfig(policy="none")), (PROMPTS[1], ["4tile"], TrimConfig(k_ratio=0.1)),
             (PROMPTS[1], ["1tile", "4tile"], TrimConfig(policy="mass", mass=0.4)),
             (PROMPTS[3] + " and then tell me a story", [], None)]
    return [pipe.trim(pipe.prepare(p, [imgs[n] for n in names]), cfg) for p, names, cfg in specs]


def engine_with(loaded, cfg: EngineConfig, layout: str, attn) -> LLMEngine:
    """An engine whose KV uses `layout` and whose runner uses the backend `attn(kv)` (the CUDA backend's logic on
    CPU: page layout + the reference kernel)."""
    engine = LLMEngine(loaded, cfg)
    tc = loaded.text_config
    engine.kv = KVCache(cfg.kv_budget_bytes, tc.num_hidden_layers, loaded.cross_layers, tc.num_key_value_heads,
                        tc.hidden_size // tc.num_attention_heads, loaded.dtype, loaded.device, cfg.block_size, layout)
    engine.scheduler = Scheduler(cfg, engine.kv)
    engine.runner = ModelRunner(loaded, engine.kv)
    engine.runner.attn = attn(engine.kv)
    return engine


def test_every_backend_gives_the_same_tokens(tiny_pipeline, sources):
    """Greedy tokens of a batch (text-only row, a row with two images and a partial mask) through the padded
    call, the loop and the varlen backend on the reference kernel, with preemption in a small pool."""
    loaded = tiny_pipeline.loaded
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    want = [LLMEngine(loaded).generate([s], params)[0].output_ids for s in sources]
    probe = LLMEngine(loaded, EngineConfig(kv_budget_bytes=2**20, block_size=4))
    need = max(probe.kv_bytes_for(s, params) for s in sources)
    small = EngineConfig(kv_budget_bytes=int(need * 2.0), block_size=4, kv_watermark=0.0)
    preemptions = 0
    for layout, attn in (("run", lambda kv: CpuAttention(kv, padded_elems=0)),
                         ("run", lambda kv: CpuAttention(kv, padded_elems=10**9)),
                         ("page", lambda kv: CpuAttention(kv, padded_elems=10**9)),
                         ("page", lambda kv: VarlenPagedAttention(kv, kernel=varlen_reference))):
        for cfg in (EngineConfig(block_size=4), small):
            engine = engine_with(loaded, cfg, layout, attn)
            got = [s.output_ids for s in engine.generate(sources * 2, params)]
            assert got == want * 2, (layout, cfg.kv_budget_bytes)
            assert engine.stats().kv_used_bytes == 0
            preemptions += engine.stats().preemptions
    assert preemptions > 0


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host: scalar reads and copies to the CPU from another device."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "item"):
            self.reads.append(name)
        elif name in ("_to_copy", "copy_") and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device") or (args[0].device if name == "copy_" else None)
            source = args[1].device if name == "copy_" else args[0].device
            if target is not None and torch.device(target).type == "cpu" and source.type != "cpu":
                self.reads.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("padded_elems", [0, 10**9])
def test_a_decode_step_reads_the_device_once(tiny_pipeline, sources, monkeypatch, padded_elems):
    """A decode step of 8 sequences (5 self and 3 cross layers): at most one host read (the sampler's), none in
    the model's forward. Host reads the dispatcher does not see (.tolist(), .numpy()) are counted too."""
    engine = LLMEngine(tiny_pipeline.loaded, EngineConfig(block_size=4))
    engine.runner.attn = CpuAttention(engine.kv, padded_elems=padded_elems)
    for s in sources * 2:
        engine.add_request(s, SamplingParams(max_tokens=10, ignore_eos=True, temperature=0.8, seed=3))
    while engine.scheduler.waiting:
        engine.step()
    listed = []
    for name in ("tolist", "numpy"):  # .cpu() of a device tensor is a _to_copy above
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real, _n=name, **k: listed.append(_n) or _r(t, *a, **k))
    forward = engine.runner.forward_decode
    in_forward = []

    def counted_forward(batch, step):
        before = len(mode.reads) + len(listed)
        out = forward(batch, step)
        in_forward.append(len(mode.reads) + len(listed) - before)
        return out

    monkeypatch.setattr(engine.runner, "forward_decode", counted_forward)
    per_step = []
    with HostReads() as mode:
        for _ in range(4):
            before = len(mode.reads) + len(listed)
            assert len(engine.step()) == 8
            per_step.append(len(mode.reads) + len(listed) - before)
    assert in_forward == [0, 0, 0, 0], in_forward
    assert all(n <= 1 for n in per_step), (per_step, mode.reads, listed)


def test_the_host_read_counter_counts():
    """The counter above is not blind: a forward that tests a mask with bool() is caught."""
    with HostReads() as mode:
        mask = torch.ones(3, dtype=torch.bool)
        bool(mask.all())
        torch.tensor([1.0]).item()
    assert len(mode.reads) == 2


class ReplayGraph:
    """The captured-forward contract of cuda_graphs.CudaGraph on CPU: built from the forward over the static
    buffers; replay() reruns it on what the buffers hold now, into the output tensor of the capture."""

    def __init__(self, fn, pool):
        self.fn, self.output, self.replays = fn, fn(), 0

    def pool(self):
        return None

    def replay(self) -> torch.Tensor:
        self.replays += 1
        self.output.copy_(self.fn())
        return self.output


def test_buckets():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40] and buckets(6) == [1, 2, 4, 6]


def test_graph_replay_equals_eager_with_padding(tiny_pipeline, sources):
    """Batches of 3 (replayed at bucket 4, one padding row) with images and text-only: the graph path's logits are
    the eager forward's, and its tokens those of each request alone; a mixed batch runs eagerly."""
    loaded = tiny_pipeline.loaded
    cfg = EngineConfig(block_size=4, max_running=8, max_model_len=256)
    engine = engine_with(loaded, cfg, "page", lambda kv: VarlenPagedAttention(kv, kernel=varlen_reference))
    with torch.inference_mode():
        graphs = DecodeGraphs(engine.runner, 8, 256, image_tokens(loaded), graph=ReplayGraph)
    engine.runner.graphs = graphs
    assert sorted(graphs.graphs) == sorted((b, i) for b in (1, 2, 4, 8) for i in (False, True))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    image_rows, text_rows = [sources[0], sources[1], sources[0]], [sources[3]] * 3
    for rows, with_image in ((image_rows, True), (text_rows, False)):
        want = [LLMEngine(loaded).generate([s], params)[0].output_ids for s in rows]
        assert [s.output_ids for s in engine.generate(rows, params)] == want
        assert graphs.graphs[4, with_image].replays == 9  # every decode step of the batch of 3
    compared, decode = [], engine.runner.decode

    def eager_and_replayed(seqs):  # the eager forward first, then the graph: both write the same K/V
        with torch.inference_mode():
            batch = decode_batch(seqs, "cpu")
            eager = engine.runner.forward_decode(batch, engine.runner.attn.prepare(batch))
        replayed = decode(seqs)
        compared.append((eager, replayed.clone()))
        return replayed

    engine.runner.decode = eager_and_replayed
    engine.generate(image_rows, params)
    engine.runner.decode = decode
    assert len(compared) == 9
    for eager, replayed in compared:
        assert replayed.shape == eager.shape == (3, loaded.model.lm_head.out_features)
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=0)
    before = graphs.graphs[4, True].replays
    assert [s.output_ids for s in engine.generate([sources[0], sources[3], sources[2]], params)] == \
        [LLMEngine(loaded).generate([s], params)[0].output_ids for s in (sources[0], sources[3], sources[2])]
    assert graphs.graphs[4, True].replays == before  # mixed and partial-mask batches ran eagerly
