"""The prefix cache's page addresses: a sha256 chain over (parent page's hash, the page's token ids) rooted in (model,
cache salt), deterministic across processes, so the trimmer's cache, the decoder's and the decoder pool's router
name a page alike."""

import hashlib
import json

import numpy as np


def namespace(model_id: str, salt: str | None) -> bytes:
    """The chain's root: requests of different models or different cache salts never share a page."""
    return hashlib.sha256(json.dumps([model_id, salt]).encode()).digest()


def page_hashes(token_ids: list[int], block_size: int, root: bytes, rows: int) -> list[bytes]:
    """Hashes of the full pages among the first `rows` tokens, each chained on its parent's."""
    out, parent = [], root
    tokens = np.asarray(token_ids[: rows - rows % block_size], dtype=np.int64)
    for p in range(len(tokens) // block_size):
        parent = hashlib.sha256(parent + tokens[p * block_size : (p + 1) * block_size].tobytes()).digest()
        out.append(parent)
    return out


def route_key(page_hash: bytes) -> int:
    """A page hash's first 8 bytes: what replicas report to the router (a false match only misroutes)."""
    return int.from_bytes(page_hash[:8], "little")
