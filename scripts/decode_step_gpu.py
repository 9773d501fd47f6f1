"""Decode step vs batch at Llama-3.2-11B-Vision's text layout (40 layers, 8 cross, 4096 wide, 32/8 heads; the
layers' widths; random weights, a 1-layer vision tower, the bundled tokenizer's 385-token vocabulary, so the real
lm_head's 1 GB and a 128k-wide sampler are not in the step) in bf16 on CUDA, with CUDA graphs and without, against the HBM
bound (weights + the K/V a step reads, over the bandwidth). scripts/gpu_check.sh runs it; JSON out.

Run: python scripts/decode_step_gpu.py --json OUT.json [--batches 1,16,64,128] [--hbm-gbps 4800]
Smoke test of the script itself on CPU: --device cpu --dtype float32 --hidden 256 --heads 4 --kv-heads 2
--intermediate 512 --layers 4 --cross 1,3 --batches 1,2 --max-tokens 6 --kv-gib 1 (no graphs on CPU)."""

import argparse
import json
import statistics
import time

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

from pipeline.config import EngineConfig, ModelConfig, TrimConfig
from pipeline.engine.llm_engine import LLMEngine
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.loaded import LoadedModel, prepare_for_inference
from pipeline.model.sources import ASSETS
from pipeline.quality.synthetic import noise_image

VISION = dict(hidden_size=64, attention_heads=2, intermediate_size=128, num_hidden_layers=1, num_global_layers=1,
              intermediate_layers_indices=[0], vision_output_dim=128, image_size=560, patch_size=14, max_num_tiles=4)


def build(args) -> LoadedModel:
    tiny = MllamaProcessor.from_pretrained(ASSETS / "tiny-mllama")
    tok = tiny.tokenizer
    cross = [int(x) for x in args.cross.split(",")]
    text = dict(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                intermediate_size=args.intermediate, num_hidden_layers=args.layers, cross_attention_layers=cross,
                max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                vocab_size=tok.convert_tokens_to_ids("<|image|>"), bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>")])
    config = MllamaConfig(vision_config=VISION, text_config=text, image_token_index=text["vocab_size"])
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place on the device, in the target dtype (the 11B text: ~20 GB)
    with torch.device(args.device):
        model = MllamaForConditionalGeneration(config).eval().requires_grad_(False)
    torch.set_default_dtype(default)
    for name, p in model.named_parameters():  # gates open so the image is attended (HF's init closes them)
        if name.endswith("_gate"):
            p.data.fill_(1.0)
    model = prepare_for_inference(model)
    size = VISION["image_size"]
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": size, "width": size},
                                                                       max_image_tiles=4),
                                tokenizer=tok, chat_template=tiny.chat_template)
    cfg = ModelConfig(source="preset:bench", device=args.device, dtype=args.dtype)
    return LoadedModel(model=model, path=None, device=torch.device(args.device), dtype=dtype, cfg=cfg,
                       preset_processor=processor)


def step_ms(loaded, request, b: int, args, graphs: bool) -> tuple[float, float]:
    """Median decode-step ms with b sequences running, and their mean context length over those steps."""
    engine = LLMEngine(loaded, EngineConfig(kv_budget_bytes=args.kv_gib * 2**30, max_running=max(b, 1),
                                            max_model_len=args.max_len, cuda_graphs=graphs))
    seqs = [engine.add_request(request, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)) for _ in range(b)]
    steps, lengths = [], []
    while engine.has_work():
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        if engine.stats().last_batch_size == b:
            steps.append(ms)
            lengths.append(statistics.mean(s.num_tokens for s in seqs))  # all b decoded this step
    return statistics.median(steps[2:] or steps), statistics.mean(lengths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--cross", default="3,8,13,18,23,28,33,38")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--k-ratio", type=float, default=0.08)
    ap.add_argument("--kv-gib", type=int, default=24)
    ap.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM bandwidth, GB/s (H100 SXM 3350, H200 4800)")
    ap.add_argument("--json")
    args = ap.parse_args()
    loaded = build(args)
    pipe = Pipeline(loaded, engine=EngineConfig(kv_budget_bytes=2**20))
    prepared = pipe.prepare("Describe the picture in detail, please.", [noise_image(560, 560, 0)])
    request = pipe.trim(prepared, TrimConfig(k_ratio=args.k_ratio))
    # what a step streams: every layer's weights and the lm_head (the embedding is B rows, left out)
    read = [*loaded.text.layers.parameters(), *loaded.text.norm.parameters(), *loaded.model.lm_head.parameters()]
    weight_bytes = sum(p.numel() * p.element_size() for p in read)
    tc, item = loaded.text_config, torch.empty(0, dtype=loaded.dtype).element_size()
    token = 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * item  # one layer's K+V
    n_cross = len(loaded.cross_layers)
    n_self = tc.num_hidden_layers - n_cross
    kept = request.image.num_kept
    rows = []
    modes = [True, False] if loaded.device.type == "cuda" else [False]
    for b in [int(x) for x in args.batches.split(",")]:
        row = {"batch": b}
        for graphs in modes:
            ms, mean_len = step_ms(loaded, request, b, args, graphs)
            kv_bytes = b * (n_self * mean_len + n_cross * kept) * token
            bound_ms = (weight_bytes + kv_bytes) / (args.hbm_gbps * 1e9) * 1e3
            key = "graphs" if graphs else "eager"
            row.update({f"step_ms_{key}": round(ms, 3), "hbm_bound_ms": round(bound_ms, 3),
                        f"step_over_bound_{key}": round(ms / bound_ms, 2), "kv_bytes_read": kv_bytes})
        rows.append(row)
        print(json.dumps(row), flush=True)
    first = rows[0]
    report = {"layout": {"layers": tc.num_hidden_layers, "cross": n_cross, "hidden": tc.hidden_size,
                         "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads, "dtype": args.dtype},
              "weight_bytes": weight_bytes, "kept_tokens": kept, "hbm_gbps": args.hbm_gbps, "rows": rows,
              "batch_over_batch1": {r["batch"]: round(r[f"step_ms_{'graphs' if modes[0] else 'eager'}"] /
                                                      first[f"step_ms_{'graphs' if modes[0] else 'eager'}"], 2)
                                    for r in rows}}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
