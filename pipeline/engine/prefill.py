"""Batched, chunked prefill: prompt rows of several sequences (a chunk of each, continuing where its last chunk
stopped) in one forward over the engine's KV pages; the next-token logits of the prompts a chunk ends.

A sequence with an image resumes after the first cross-attention layer from its ResumeState (hidden rows, the
earlier layers' self K/V, the kept tokens' cross K/V or features); a text-only prompt runs from layer 0 and skips
cross layers, and so do an image prompt's blind rows that its resume state does not carry (the trimmer took them
from its prefix cache and the decoder's cache lacks them: they see no image, so they compute what a text-only
prompt's rows do). The two start at different layers, so a step runs in two phases: the text rows alone through
layers 0 .. first_cross (the image rows have nothing to compute there, their K/V is copied from the resume
state), then every row together from first_cross + 1 on. Rows are laid out text chunks first, so the image
rows a cross layer reads are one slice. Projections and MLPs run on all rows at once; attention runs per chunk
(SDPA over the sequence's own pages): on CPU one block-diagonal SDPA over every chunk's keys measured 3.3x
slower at 4 prompts of 128 rows and 8x at 8 chunks of 32 over histories to 2,000 (it computes and masks T x sum(K)
scores; `python -m pipeline.bench.prefill`)."""

from dataclasses import dataclass
from functools import partial

import torch

from pipeline.engine.kv_cache import KVCache
from pipeline.engine.prompt_logprobs import score_rows
from pipeline.engine.scheduler import PrefillChunk
from pipeline.engine.sequence import Sequence
from pipeline.model.layers import attend, cross_finish, cross_q, project_cross_kv, self_finish, self_qkv
from pipeline.model.loaded import LoadedModel
from pipeline.model.placement import moved
from pipeline.types import CrossKV, map_tensors


@dataclass
class RowBatch:
    """One phase's rows, prepared once and read by every layer: chunk c owns rows spans[c] of the flat batch."""

    chunks: list[PrefillChunk]
    spans: list[tuple[int, int]]  # [a, b) of each chunk in the flat rows
    positions: torch.Tensor  # (T,) each row's position in its prompt
    slots: torch.Tensor  # (T,) each row's self-attention token slot
    causal: list[torch.Tensor]  # per chunk (rows, end) bool: row at position p sees keys 0..p of its pages

    @staticmethod
    def spans_of(chunks: list[PrefillChunk]) -> list[tuple[int, int]]:
        spans, a = [], 0
        for c in chunks:
            spans.append((a, a + c.end - c.start))
            a += c.end - c.start
        return spans

    @classmethod
    def of(cls, chunks: list[PrefillChunk], device) -> "RowBatch":
        spans = cls.spans_of(chunks)
        pos = [torch.arange(c.start, c.end, device=device) for c in chunks]
        causal = [p[:, None] >= torch.arange(c.end, device=device)[None] for p, c in zip(pos, chunks)]
        slots = [c.seq.pages.self_slots(c.start, c.end).to(device) for c in chunks]
        return cls(chunks, spans, torch.cat(pos), torch.cat(slots), causal)


class CrossRows:
    """The image chunks' rows in a cross-attention layer: which kept tokens each row sees; the rows before the
    first image token (the blind prefix) see none and get no cross-attention output (Meta's reference)."""

    def __init__(self, chunks: list[PrefillChunk], device):
        self.chunks = chunks
        self.spans = RowBatch.spans_of(chunks)  # [a, b) of each chunk among the image rows
        self.blind = []  # per chunk: how many of its rows are in the blind prefix
        self.visible = []  # per chunk (seeing rows, kept) bool: the row sees the token's image
        sees = []
        for c in chunks:
            image = c.seq.image
            nb = min(max(image.prefix_len - c.start, 0), c.end - c.start)
            self.blind.append(nb)
            self.visible.append(image.row_visibility[c.start + nb : c.end][:, image.kept_image])
            sees.append(torch.arange(c.start, c.end, device=device) >= image.prefix_len)
        self.sees = torch.cat(sees)  # (rows,) the row sees an image: both branches run for it

    def attend(self, layer, kv: KVCache, kv_layer: int, q: torch.Tensor) -> torch.Tensor:
        """q (1, H, rows, hd) of the image rows -> out (1, H, rows, hd), one chunk at a time; blind rows' out is
        left unset (cross_finish never reads it)."""
        out = torch.empty_like(q)
        scale = layer.cross_attn.scaling
        for c, (a, b), nb, visible in zip(self.chunks, self.spans, self.blind, self.visible):
            if a + nb < b:
                keys, values = kv.cross_kv(c.seq.pages, kv_layer)
                mask = visible.to(q.device)[None, None]
                out[:, :, a + nb : b] = attend(q[:, :, a + nb : b], keys[None], values[None], scale, mask=mask)
        return out


class Prefiller:
    """Runs a step's prefill chunks over the text decoder's layers, on the devices the layers are placed on."""

    def __init__(self, loaded: LoadedModel, kv: KVCache):
        self.loaded, self.kv = loaded, kv
        self.text = loaded.text
        self.lm_head = loaded.model.lm_head
        self.cross = set(loaded.cross_layers)
        self.first = loaded.first_cross
        self.device = loaded.device
        self.layer_devices = [loaded.devices[p] for p in loaded.placement]
        self.last = loaded.devices[-1]

    @torch.inference_mode()
    def run(self, chunks: list[PrefillChunk]) -> tuple[list[Sequence], torch.Tensor]:
        """Fill every chunk's K/V; (the sequences whose prompt a chunk ended, their next-token logits (k, V)).
        A sequence's progress (`prefilled`) moves only once the whole forward succeeded."""
        for c in chunks:
            self._on_device(c.seq)
        text = [c for c in chunks if c.seq.runs_as_text(c.end)]
        image = [c for c in chunks if not c.seq.runs_as_text(c.end)]
        layers = len(self.text.layers)
        parts = []  # (1, rows, hidden) each, in row order: text chunks first
        if text:  # phase 1: the text rows alone through layers 0 .. first_cross (the cross layer skipped)
            ids = torch.tensor([t for c in text for t in c.seq.prompt_token_ids[c.start : c.end]], device=self.device)
            parts.append(self._layers(self.text.embed_tokens(ids)[None], RowBatch.of(text, self.device), 0,
                                      self.first + 1, None, 0))
        for c in image:
            self._write_resumed(c)
            off = c.seq.resume_start
            parts.append(c.seq.resume.hidden[c.start - off : c.end - off][None])
        ordered = text + image
        rows = RowBatch.of(ordered, self.device)
        dev = self.layer_devices[min(self.first + 1, layers - 1)]
        h = torch.cat([p.to(dev, self.loaded.dtype) for p in parts], dim=1)
        cross = CrossRows(image, self.device) if image else None
        # phase 2: every row, from the layer after the first cross-attention layer
        h = self._layers(h, rows, self.first + 1, layers, cross, rows.spans[len(text) - 1][1] if text else 0)
        self._score_prompt(ordered, rows, h)
        for c in ordered:
            c.seq.pages.self_written = c.seq.prefilled = c.end
            self.kv.register(c.seq.pages, c.seq.page_hashes, c.end)  # its full cacheable pages, now written
        done = [i for i, c in enumerate(ordered) if c.end == c.seq.prompt_len]
        last = torch.tensor([rows.spans[i][1] - 1 for i in done], dtype=torch.long, device=h.device)
        logits = self._head(h[0, last]).float().to(self.device)
        seqs = [ordered[i].seq for i in done]
        for s in seqs:
            s.resume = None  # the prefill is over: the sequence keeps only its image state
        return seqs, logits

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(h.to(self.last)))

    def _score_prompt(self, chunks: list[PrefillChunk], rows: RowBatch, h: torch.Tensor) -> None:
        """The prompt's log-probabilities of the chunks whose sequence asks (SamplingParams.prompt_logprobs): row p
        scores prompt token p + 1 (the prompt's last row scores the first output token, sampled as usual). Entry i
        of seq.prompt_logprobs is written by the chunk holding row i, so a chunk run twice rewrites its own."""
        for c, (a, _) in zip(chunks, rows.spans):
            k, end = c.seq.params.prompt_logprobs, min(c.end, c.seq.prompt_len - 1)
            if k is None or end <= c.start:
                continue
            # Every earlier row was scored by an earlier chunk: a row whose K/V came from elsewhere (a prefix cache)
            # has no hidden state here, so a request asking for prompt_logprobs must prefill all its rows.
            assert len(c.seq.prompt_logprobs) >= c.start, "prompt rows skipped: prompt_logprobs needs every row"
            targets = torch.tensor(c.seq.prompt_token_ids[c.start + 1 : end + 1])
            c.seq.prompt_logprobs[c.start : end] = score_rows(self._head, h[0, a : a + end - c.start], targets, k)

    def _on_device(self, seq: Sequence) -> None:
        """A sequence's image and resume state on the first device (they may arrive elsewhere)."""
        if seq.image is not None and seq.image.kept_image.device != torch.device(self.device):
            to = partial(torch.Tensor.to, device=self.device)
            seq.image, seq.resume = map_tensors(seq.image, to), map_tensors(seq.resume, to)

    def _write_resumed(self, c: PrefillChunk) -> None:
        """An image chunk's K/V from its resume state (which starts at prompt row resume_start): the earlier layers'
        self K/V of its rows, and, with its first resumed chunk (which starts after the rows the prefix cache gave
        it, or the blind rows run as text), every cross layer's K/V of the kept tokens."""
        cache, resume, table = self.kv, c.seq.resume, c.seq.pages
        slots, a, b = table.self_slots(c.start, c.end), c.start - c.seq.resume_start, c.end - c.seq.resume_start
        for i in range(self.first):  # (layers, 2, KVH, S, hd) -> each layer's pages (rows, 2, KVH, hd)
            view = cache.self_layer(cache.kv_layer[i])
            view[slots.to(view.device)] = resume.self_kv[i][:, :, a:b].permute(2, 0, 1, 3).to(view.device, view.dtype)
        if c.start == max(c.seq.cached_tokens, c.seq.resume_start):
            if isinstance(resume.cross, CrossKV):
                kv = resume.cross.kv
            else:  # the kept tokens' features: project every cross-attention layer's K/V here
                kv = project_cross_kv(self.text, self.loaded.cross_layers, resume.cross.features)
            cache.write_cross(table, kv)

    def _layers(self, h: torch.Tensor, rows: RowBatch, begin: int, end: int, cross: CrossRows | None,
                text_rows: int) -> torch.Tensor:
        """h (1, T, hidden) through layers [begin, end); in a cross layer the image rows (from `text_rows` on)
        attend to their images, text-only rows pass unchanged (HF skips the layer for them)."""
        cos, sin = self.text.rotary_emb(h, rows.positions[None])
        on = {}  # device -> (cos, sin, slots, *causal) there
        for idx in range(begin, end):
            layer, dev = self.text.layers[idx], self.layer_devices[idx]
            h = h.to(dev)
            kv_layer = self.kv.kv_layer[idx]
            if idx in self.cross:
                if cross is not None:
                    x = h[:, text_rows:]
                    out = cross.attend(layer, self.kv, kv_layer, cross_q(layer, x))
                    h = torch.cat([h[:, :text_rows], cross_finish(layer, x, out, cross.sees.to(dev)[None])], dim=1)
                continue
            cos_d, sin_d, slots, *causal = moved((cos, sin, rows.slots, *rows.causal), dev, on)
            q, k, v = self_qkv(layer, h, cos_d, sin_d)  # q (1, H, T, hd), k and v (1, KVH, T, hd)
            view = self.kv.self_layer(kv_layer)
            view[slots, 0] = k[0].transpose(0, 1)
            view[slots, 1] = v[0].transpose(0, 1)
            out = torch.empty_like(q)
            for c, (a, b), mask in zip(rows.chunks, rows.spans, causal):
                keys, values = self.kv.self_kv(c.seq.pages, kv_layer, c.end)  # the earlier chunks' K/V too
                out[:, :, a:b] = attend(q[:, :, a:b], keys[None], values[None], layer.self_attn.scaling, mask=mask)
            h = self_finish(layer, h, out)
        return h
