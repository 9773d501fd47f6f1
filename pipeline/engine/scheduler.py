"""Admission, preemption and the step's token budget over KV pages: running sequences get a page when their last
one fills, preempting (swapping out) the most recently admitted one when none is free; preempted sequences resume
before new ones; a waiting sequence is admitted, in arrival order, once its prompt and its kept visual tokens fit and
the bounded swap space could take any preemption it may cause (swap.SwapSpace). A request of n completions is admitted
as n from the start (n running slots, n worst cases), though its siblings fork only after its prompt's last chunk.
Each step's rows are bounded by
`step_token_budget`: decoding sequences take one row each first, prompts being prefilled fill the rest in chunks,
the earliest admitted first."""

from collections import deque
from dataclasses import dataclass

from pipeline.config import EngineConfig
from pipeline.engine.kv_cache import KVCache
from pipeline.engine.sequence import Sequence, Status
from pipeline.engine.swap import SwapSpace
from pipeline.errors import InvalidRequest, Overloaded


@dataclass
class PrefillChunk:
    """Prompt rows [start, end) of a sequence to prefill this step; the rows before `start` are in its pages."""

    seq: Sequence
    start: int
    end: int  # end == prompt_len: the prompt's last chunk, whose last row gives the first token's logits


@dataclass
class Room:
    """What admission looks at (live in admit_next, simulated in its dry run count_admissible)."""

    free: int  # free pages
    slots: int  # running slots taken (Sequence.completions_held summed over the running)
    committed: int  # worst-case pages of every admitted sequence not finished
    largest: int  # the largest of those worst cases


@dataclass
class StepPlan:
    prefill: list[PrefillChunk]
    decode: list[Sequence]  # each fed its last token


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCache):
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()  # preempted, first to resume first
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.preemptions = 0
        self.sheds = self.shed_tokens = 0
        self.watermark_pages = int(cfg.kv_watermark * kv.blocks.num_pages)
        self.swap = SwapSpace(cfg.swap_budget_bytes, kv.blocks.page_bytes, kv.blocks.num_pages)

    def check(self, seq: Sequence) -> None:
        """Refuse at once what could never run: a sequence alone always fits, so no admitted one ever fails."""
        if seq.max_self_tokens > self.cfg.max_model_len:
            raise InvalidRequest(
                f"prompt ({seq.prompt_len} tokens) + max_tokens ({seq.params.max_tokens}) exceeds "
                f"max_model_len {self.cfg.max_model_len}"
            )
        if seq.params.n > self.cfg.max_running:
            raise InvalidRequest(f"n={seq.params.n} exceeds the decoder's max_running {self.cfg.max_running}")
        need = self.kv.bytes_needed(seq.max_self_tokens, seq.cross_tokens)  # each of n alone fits too
        if need > self.kv.capacity_bytes:
            raise InvalidRequest(f"request needs {need} bytes of KV; the whole budget is {self.kv.capacity_bytes}")
        worst, n = self._worst_pages(seq), seq.params.n
        if n * worst > self.swap.limit(worst):  # an idle engine would not admit it: it would wait forever
            raise InvalidRequest(
                f"n={n} completions need {n} x {worst} KV pages at max_tokens; the decoder holds at most "
                f"{self.swap.limit(worst)} (its KV pool and swap space): lower n or max_tokens"
            )

    def has_room(self, pending: int = 0) -> bool:
        """The queue's bound: another sequence may wait, with `pending` more already on their way."""
        return self.queue_room(pending) > 0

    def queue_room(self, pending: int = 0) -> int:
        """How many more requests the engine would hold, with `pending` more already on their way: the queue's
        max_waiting places, plus the free running slots while nothing waits (nothing blocks admission then, so the
        next ones run rather than queue); negative: over, after max_waiting was lowered."""
        free_running = 0 if self.waiting else max(0, self.cfg.max_running - self.running_slots())
        return self.cfg.max_waiting + free_running - len(self.waiting) - pending

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        if not self.has_room():
            raise Overloaded(f"{len(self.waiting)} requests already waiting; try again later")
        self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        """This step's work: every decoding sequence by one token, then prefill chunks within the token budget."""
        decode = []
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.prefilling:
                continue  # preempted just now for an earlier-admitted sequence, or still prefilling (pages held)
            while not self.kv.grow(seq.pages, seq.num_tokens):  # room for the token fed this step
                if self._shed():  # elastic: free running sequences' least important cross pages before preempting
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                decode.append(seq)
        decode += [s for s in self.resume_swapped() if not s.prefilling]
        # Admission is not gated by the budget: an admitted prompt holds its pages (and leaves the bounded waiting
        # queue) at once, and is prefilled as the budget allows. Gating it made a burst of 48 requests overflow a
        # 32-deep queue that had held them all before chunking.
        while self.admit_next() is not None:
            pass
        # Decode rows never wait; with none of the budget left, the earliest prompt still gets a row a step.
        budget = max(self.cfg.step_token_budget - len(decode), 1)
        chunks = []
        for seq in self.running:  # prompts mid-prefill (a resumed one too), the earliest admitted first
            if budget and seq.prefilling:
                chunks.append(self._chunk(seq, budget))
                budget -= chunks[-1].end - chunks[-1].start
        return StepPlan(chunks, decode)

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> PrefillChunk:
        """The next rows of its prompt within the budget; a chunk runs from the first layer or resumes after the
        first cross-attention layer (Sequence.runs_as_text), never both."""
        end = min(seq.prompt_len, seq.prefilled + budget)
        if seq.prefilled < seq.resume_start:
            end = min(end, seq.resume_start)
        return PrefillChunk(seq, seq.prefilled, end)

    def resume_swapped(self) -> list[Sequence]:
        """Preempted sequences back into fresh pages, in the swapped queue's order, while they fit."""
        resumed = []
        while self.swapped and self.running_slots() + self.swapped[0].completions_held <= self.cfg.max_running:
            seq = self.swapped[0]
            pages = self.swap.swap_in(self.kv, seq.swapped, seq.num_tokens)
            if pages is None:
                break
            self.swapped.popleft()
            seq.pages, seq.swapped, seq.status = pages, None, Status.RUNNING
            self.running.append(seq)
            resumed.append(seq)
        return resumed

    def running_slots(self) -> int:
        """Running slots taken: a request of n completions takes n from its admission (its siblings fork later)."""
        return sum(s.completions_held for s in self.running)

    def admit_next(self) -> Sequence | None:
        """The first waiting sequence, running with pages for its prompt, if it fits (and none is preempted); its
        prefill starts after the cached pages its prompt begins with (prefix_cache.py)."""
        if not self.waiting:
            return None
        seq = self.waiting[0]
        cached = self.kv.prefix_hit(seq.page_hashes, seq.prompt_len)
        if self.swapped or self.running_slots() + seq.params.n > self.cfg.max_running:
            return None  # what shedding cannot help
        while not self._fits(seq, self._room(), cached):
            if not self._shed():  # elastic: shed running sequences to their floor rather than queue
                return None  # no skipping ahead: a large request is not starved by small ones
        self.waiting.popleft()
        seq.pages = self.kv.allocate(self._first_tokens(seq), seq.cross_tokens, self._watermark(), cached)
        assert seq.pages is not None, "_fits checked the same pages and watermark"
        self.swap.commit(self._worst_pages(seq), seq.params.n)  # all n worst cases: its siblings fork later
        seq.status = Status.RUNNING
        seq.prefilled = seq.cached_tokens = len(cached) * self.kv.block_size
        if self.kv.prefix is not None:
            self.kv.prefix.count(seq.prompt_len, seq.cached_tokens)
        self.running.append(seq)
        return seq

    def count_admissible(self) -> int:
        """Dry run of admit_next: how many waiting sequences the next admission would take, with nothing allocated
        (a cached page that an earlier one takes counts once)."""
        room, count, taken = self._room(), 0, set()
        for seq in self.waiting:
            cached = self.kv.prefix_hit(seq.page_hashes, seq.prompt_len)
            if not self._fits(seq, room, cached, taken):
                break
            worst = self._worst_pages(seq)
            room = Room(room.free - self._pages_taken(seq, cached, taken), room.slots + seq.params.n,
                        room.committed + seq.params.n * worst, max(room.largest, worst))
            taken.update(cached)
            count += 1
        return count

    def _room(self) -> Room:
        return Room(self.kv.blocks.free_pages, self.running_slots(), self.swap.committed, self.swap.largest)

    def _pages_taken(self, seq: Sequence, cached: list[int], counted: set[int] = frozenset()) -> int:
        """Free pages the sequence's admission takes: its prompt's (or, reserved, its worst case's) and its kept
        tokens' pages, less the cached ones it shares (one no one holds, and not in `counted`, takes a free page)."""
        return self.kv.admission_pages(self._first_tokens(seq), seq.cross_tokens, cached, counted)

    def _fits(self, seq: Sequence, room: Room, cached: list[int] = (), counted: set[int] = frozenset()) -> bool:
        """The one admission rule (admit_next and count_admissible): nothing preempted waits to resume; the n
        completions fit max_running; the pages it takes fit the free pool above the watermark (none for an idle
        engine); the n worst cases fit what the swap space allows (swap.SwapSpace)."""
        worst, n = self._worst_pages(seq), seq.params.n
        watermark = self.watermark_pages if room.slots else 0
        return (not self.swapped and room.slots + n <= self.cfg.max_running
                and self._pages_taken(seq, cached, counted) + watermark <= room.free
                and room.committed + n * worst <= self.swap.limit(max(room.largest, worst)))

    def fork(self, seq: Sequence, child: Sequence) -> None:
        """A sibling sharing `seq`'s pages joins the running batch (its slot and worst case were taken with `seq`'s
        admission; the caller appends it to seq.siblings, which hands them over)."""
        child.pages, child.status = self.kv.fork(seq.pages), Status.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free the sequence's KV at once, wherever it is."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.kv.release(seq.pages)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status == Status.SWAPPED:
            self.swapped.remove(seq)
            self.swap.drop(seq.swapped)
            seq.swapped = None
        if seq.status in (Status.RUNNING, Status.SWAPPED):  # with any siblings not forked yet
            self.swap.release(self._worst_pages(seq), seq.completions_held)
        seq.pages = None
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _first_tokens(self, seq: Sequence) -> int:
        """Self positions allocated at admission: the prompt, or the worst case in `reserved` mode."""
        return seq.max_self_tokens if self.cfg.kv_allocation == "reserved" else seq.prompt_len

    def _worst_pages(self, seq: Sequence) -> int:
        """Pages the sequence holds at its max_tokens (the swap space's admission rule counts these)."""
        return self.kv.pages_needed(seq.max_self_tokens, seq.cross_tokens)

    def _watermark(self) -> int:
        return self.watermark_pages if self.running else 0  # an idle engine admits whatever fits alone (as _fits)

    def _shed(self) -> bool:
        """Shed the running sequence with the most cross pages above its floor (ties: the latest admitted) down to its
        floor, in one go; False when no page can be freed that way (docs/elastic.md). Its worst case shrinks: the
        swap space's commitment too."""
        pages = [self.kv.pages_needed(0, s.cross_tokens) - self.kv.pages_needed(0, s.cross_tokens - s.sheddable_tokens)
                 for s in self.running]
        best = max(range(len(pages)), key=lambda i: (pages[i], i), default=None)
        if best is None or pages[best] == 0:
            return False
        seq = self.running[best]
        keep, worst = seq.cross_tokens - seq.sheddable_tokens, self._worst_pages(seq)
        self.kv.shed_cross(seq.pages, keep)
        self.shed_tokens += seq.cross_tokens - keep
        seq.shed_to(keep)
        self.swap.release(worst)  # n == 1 (siblings share cross pages: never shed)
        self.swap.commit(self._worst_pages(seq))
        self.sheds += 1
        return True

    def _preempt(self, seq: Sequence) -> None:
        # The copy first: if it raised (a full swap space: the admission rule makes it impossible), the sequence
        # would still be running with its pages, never half-moved (removed from running yet RUNNING).
        seq.swapped = self.swap.swap_out(self.kv, seq.pages)
        self.running.remove(seq)
        seq.pages, seq.status = None, Status.SWAPPED
        self.swapped.appendleft(seq)
        self.preemptions += 1
