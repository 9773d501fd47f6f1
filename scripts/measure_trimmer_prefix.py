"""What a cached prefix costs the trimmer at Llama-3.2-11B-Vision's widths: recomputing its rows through the layers
before the first cross-attention layer (3 of 40), against receiving their K/V from a cache (the bytes, and the time a
pickle round trip of them takes here). HF's own MllamaSelfAttentionDecoderLayer with random weights, fp32 on CPU.

    python scripts/measure_trimmer_prefix.py --rows 1000 --json bench-results/trimmer-prefix.json
"""

import argparse
import json
import pickle
import time
from pathlib import Path

import torch
from transformers import MllamaTextConfig
from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding, MllamaSelfAttentionDecoderLayer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1000, help="cached prefix rows (a shared system prompt)")
    p.add_argument("--layers", type=int, default=3, help="self-attention layers before the first cross layer")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MllamaTextConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           num_hidden_layers=40, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    layers = [MllamaSelfAttentionDecoderLayer(cfg, i).eval() for i in range(args.layers)]
    rope = MllamaRotaryEmbedding(cfg)
    h = torch.randn(1, args.rows, cfg.hidden_size)  # (1, rows, hidden)
    pos = torch.arange(args.rows)[None]
    cos_sin = rope(h, pos)
    causal = torch.full((args.rows, args.rows), float("-inf")).triu(1)[None, None]  # (1, 1, rows, rows)
    with torch.inference_mode():
        layers[0](h[:, :8], attention_mask=causal[..., :8, :8], position_embeddings=rope(h[:, :8], pos[:, :8]))  # warm
        t0 = time.perf_counter()
        x = h
        for layer in layers:
            out = layer(x, attention_mask=causal, position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        recompute_s = time.perf_counter() - t0
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = torch.randn(args.layers, 2, cfg.num_key_value_heads, args.rows, head_dim)  # what a cache would hand over
    t0 = time.perf_counter()
    got = pickle.loads(pickle.dumps(kv, protocol=5))
    ship_s = time.perf_counter() - t0
    assert got.shape == kv.shape
    flops = 2 * sum(p.numel() for p in layers[0].parameters()) * args.rows * args.layers
    out = {"rows": args.rows, "layers": args.layers, "threads": torch.get_num_threads(),
           "recompute_s": round(recompute_s, 3), "recompute_gflops_per_s": round(flops / recompute_s / 1e9, 1),
           "cached_kv_bytes": kv.numel() * kv.element_size(), "pickle_round_trip_s": round(ship_s, 4),
           "recompute_over_ship": round(recompute_s / ship_s, 1)}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
