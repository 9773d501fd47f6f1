"""StepWork: what one engine step computed (prompt rows, decoded rows, the kept visual tokens their cross-attention
read), the input of a step-cost model (pipeline/bench/step_cost.py)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class StepWork:
    prefill_rows: int = 0  # prompt rows run through the model (prefix-cached rows are not)
    decode_rows: int = 0  # sequences fed their last token
    # Kept visual tokens x prompt rows of the step's chunks: prefill's cross-attention work (every row attends every
    # kept token of its sequence, as computed; rows before the image too)
    prefill_cross: int = 0
    decode_cross: int = 0  # kept visual tokens of the decoded sequences: read once each a step

    @classmethod
    def of(cls, plan) -> "StepWork":
        """From a scheduler's StepPlan (prefill chunks and the decode batch)."""
        return cls(prefill_rows=sum(c.end - c.start for c in plan.prefill), decode_rows=len(plan.decode),
                   prefill_cross=sum((c.end - c.start) * c.seq.cross_tokens for c in plan.prefill),
                   decode_cross=sum(s.cross_tokens for s in plan.decode))
