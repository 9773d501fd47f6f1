"""CUDA graphs for the decode step (as nano-vllm's model runner does): the forward is captured once per bucketed
batch size over static metadata buffers; a step copies its batch into the buffers, pads up to the bucket with copies
of its first row (they compute and write exactly row 0's K/V, so the padding changes nothing) and replays. Captured
with the varlen backend only (its reads are bounded by the static `max_len` / `max_cross_tokens`, no host read);
a batch mixing text-only and image rows, with a partial cross mask, or beyond the bounds runs eagerly."""

import torch

from pipeline.engine.step_batch import CrossRows, DecodeBatch, decode_batch


def image_tokens(loaded) -> int:
    """Visual tokens of one image at most (every tile): the static cross width; more (several images) runs eagerly."""
    vc = loaded.model.config.vision_config
    return vc.max_num_tiles * ((vc.image_size // vc.patch_size) ** 2 + 1)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (max_batch itself last)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class CudaGraph:
    """One captured forward: replay() reruns it on whatever the static buffers hold; `output` is its result."""

    def __init__(self, fn, pool):
        fn()  # warm up: kernels chosen and workspaces allocated before capture
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def pool(self):
        return self.graph.pool()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class DecodeGraphs:
    """The runner's decode forward captured per (bucket, with image), over one set of static buffers sized for
    max_batch rows, max_len positions and max_cross_tokens kept tokens. `graph` builds a captured forward from a
    callable (CudaGraph; tests pass a CPU stand-in with the same contract)."""

    def __init__(self, runner, max_batch: int, max_len: int, max_cross_tokens: int, graph=CudaGraph):
        self.runner, self.max_batch, self.max_len = runner, max_batch, max_len
        kv, dev = runner.kv, runner.device
        self.max_cross_tokens = -(-max_cross_tokens // kv.cross_block_size) * kv.cross_block_size
        self.buckets = buckets(max_batch)
        i32 = dict(dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(max_batch, **i32)
        self.block_table = torch.zeros(max_batch, -(-max_len // kv.block_size), **i32)
        self.cross_lens = torch.ones(max_batch, **i32)
        self.cross_table = torch.zeros(max_batch, self.max_cross_tokens // kv.cross_block_size, **i32)
        self.graphs = {}
        pool = None
        for with_image in (False, True):
            for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory pool
                static = self._static(b, with_image)
                step = runner.attn.prepare(static, max_k=max_len)
                self.graphs[b, with_image] = g = graph(lambda s=static, st=step: runner.forward_decode(s, st), pool)
                pool = g.pool()

    def _static(self, b: int, with_image: bool) -> DecodeBatch:
        """A batch over the first b rows of the static buffers, its bounds the static widths."""
        cross = None
        if with_image:
            mask = torch.ones(b, self.max_cross_tokens, dtype=torch.bool, device=self.tokens.device)
            cross = CrossRows(torch.arange(b, device=self.tokens.device), True, [], [], self.max_cross_tokens,
                              self.cross_table[:b], self.cross_lens[:b], mask, [])
        return DecodeBatch(self.tokens[:b], self.positions[:b], self.slots[:b], self.context_lens[:b],
                           self.block_table[:b], [], [], self.max_len, cross)

    def fits(self, seqs) -> bool:
        """Whether a graph can run this batch (host facts only)."""
        images = sum(s.image is not None for s in seqs)
        return (len(seqs) <= self.max_batch and images in (0, len(seqs)) and all(s.cross_sees_all for s in seqs)
                and max(s.num_tokens for s in seqs) <= self.max_len
                and max(s.cross_tokens for s in seqs) <= self.max_cross_tokens)

    def run(self, seqs) -> torch.Tensor:
        """Logits (B, V) of one decode step, replayed from the smallest bucket holding the batch."""
        n = len(seqs)
        bucket = next(b for b in self.buckets if b >= n)
        batch = decode_batch(seqs, self.tokens.device)
        pad = torch.zeros(bucket, dtype=torch.long, device=self.tokens.device)
        pad[:n] = torch.arange(n, device=pad.device)  # padding rows repeat row 0
        self.tokens[:bucket] = batch.tokens[pad]
        self.positions[:bucket] = batch.positions[pad]
        self.slots[:bucket] = batch.slots[pad]
        self.context_lens[:bucket] = batch.context_lens[pad]
        self.block_table[:bucket].zero_()
        self.block_table[:bucket, : batch.block_table.shape[1]] = batch.block_table[pad]
        with_image = batch.cross is not None
        if with_image:
            self.cross_lens[:bucket] = batch.cross.cross_lens[pad]
            self.cross_table[:bucket].zero_()
            self.cross_table[:bucket, : batch.cross.block_table.shape[1]] = batch.cross.block_table[pad]
        logits = self.graphs[bucket, with_image].replay()[:n]
        for table, length in zip(batch.tables, batch.lengths):
            table.self_written = length
        return logits
