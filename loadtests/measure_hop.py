"""`python -m loadtests.measure_hop`: bytes and time of the trimmer -> decoder hop (trimmed or not, ship kv or
features) and p50 TTFT of the Serve app on a local Ray against the same stages in one process."""

import argparse
import base64
import json
import statistics
import time

import httpx

from deployments import localrun
from pipeline.quality.synthetic import noise_image, png_bytes

PROMPT = "What is in the image?"


def test_image(seed: int, width: int = 128, height: int = 128) -> bytes:
    """A distinct PNG per request, so the encoder's feature cache never answers (the in-process path has none)."""
    return png_bytes(noise_image(width, height, seed))


def stream_once(client: httpx.Client, png: bytes, trim, max_tokens: int) -> tuple[float, dict]:
    """(seconds to the first SSE chunk, the response's `trim`); the ingress answers once the first token exists."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": PROMPT}]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if trim is not None:
        body["trim"] = trim
    t0 = time.perf_counter()
    ttft, trim_info = None, None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ttft = ttft or time.perf_counter() - t0
            trim_info = json.loads(line[6:]).get("trim") or trim_info
    return ttft, trim_info


def measure_app(config_path: str, ship: str, n: int, seed0: int) -> dict:
    config = localrun.load_config(config_path)
    config["applications"][0]["args"]["ship"] = ship
    url = localrun.deploy(config)
    out = {}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(5):  # warm-up: first calls pay lazy initialisation in every replica
                stream_once(client, test_image(seed0 - 1 - i), None, 4)
            runs = {"trimmed": [], "untrimmed": []}
            for i in range(n):  # interleaved, so drift in machine load hits both alike
                for k, (name, trim) in enumerate((("trimmed", None), ("untrimmed", {"enabled": False}))):
                    runs[name].append(stream_once(client, test_image(seed0 + 2 * i + k), trim, 4))
            for name, rs in runs.items():
                infos = [info for _, info in rs]
                out[name] = {"ttft_p50_ms": 1e3 * statistics.median(t for t, _ in rs),
                             **{k: statistics.median(i[k] for i in infos) for k in (
                                 "hop_ms", "shipped_bytes", "shipped_cross_bytes", "cross_kv_bytes",
                                 "visual_tokens", "kept_tokens")}}
    finally:
        from ray import serve

        serve.shutdown()
    return out


def measure_in_process(config_path: str, n: int, seed0: int) -> dict:
    """TTFT of the same stages in one process: decode the PNG, preprocess, encode, trim, prefill one token."""
    import torch

    from pipeline.config import ModelConfig, TrimConfig
    from pipeline.engine.sampling import SamplingParams
    from pipeline.inprocess import Pipeline
    from pipeline.model.inputs import decode_image

    torch.set_num_threads(1)  # as in the replicas, whose fractional CPUs give them one thread each
    args = localrun.load_config(config_path)["applications"][0]["args"]
    pipe = Pipeline(ModelConfig(**args["model"]), TrimConfig(**args["trim"]))
    engine = pipe.engine
    trims = {"trimmed": None, "untrimmed": TrimConfig(policy="none")}
    times = {name: [] for name in trims}
    for i in range(-5, n):  # the first five warm up
        for k, (name, trim) in enumerate(trims.items()):
            png = test_image(seed0 + 2 * i + k)
            t0 = time.perf_counter()
            source = pipe.trim(pipe.prepare(PROMPT, [decode_image(png)]), trim)
            engine.add_request(source, SamplingParams(max_tokens=1))
            engine.step()
            if i >= 0:
                times[name].append(time.perf_counter() - t0)
    return {name: {"ttft_p50_ms": 1e3 * statistics.median(t)} for name, t in times.items()}


LLAMA_11B = dict(hidden=4096, kv_heads=8, head_dim=128, layers=40, cross_layers=8, first_cross=3, visual=6404)


def synthetic_request(kept: int, prompt: int, prefix: int, dtype, ship: str, m: dict = LLAMA_11B):
    """A DecodeRequest with a model's shapes (default Llama-3.2-11B-Vision: one 4-tile image of 6404 visual
    tokens), `kept` of the image's tokens kept, shipping their K/V or their features."""
    import torch

    from pipeline.types import (
        CrossKV,
        DecodeRequest,
        ImageState,
        KeptFeatures,
        ResumeState,
    )

    kv = (2, m["kv_heads"])
    image = ImageState(
        kept_image=torch.zeros(kept, dtype=torch.long), kept_index=torch.arange(kept),
        row_visibility=torch.ones(prompt, 1, dtype=torch.bool), visual_tokens=[m["visual"]], kept_tokens=[kept],
        kv_bytes_per_visual_token=m["cross_layers"] * 2 * m["kv_heads"] * m["head_dim"] * dtype.itemsize,
        tokens_per_image=m["visual"], prefix_len=prefix,
    )
    cross = (CrossKV(torch.randn(m["cross_layers"], *kv, kept, m["head_dim"]).to(dtype)) if ship == "kv"
             else KeptFeatures(torch.randn(kept, m["hidden"]).to(dtype)))
    resume = ResumeState(
        hidden=torch.randn(prompt, m["hidden"]).to(dtype),
        self_kv=torch.randn(m["first_cross"], *kv, prompt, m["head_dim"]).to(dtype),
        cross=cross,
    )
    return DecodeRequest(list(range(prompt)), image, resume)


class HopSender:
    """The trimmer's side of a measured hop: one synthetic hand-off of a model's shapes, stamped as it leaves."""

    def __init__(self, kept: int, prompt: int, prefix: int, dtype: str, ship: str, m: dict = LLAMA_11B):
        import torch

        from deployments.handoff import Handoff

        self.handoff = Handoff.of(synthetic_request(kept, prompt, prefix, getattr(torch, dtype), ship, m))

    def send(self):
        self.handoff.sent_at = time.time()
        return self.handoff


class HopReceiver:
    """The decoder's side: how long the hand-off took to arrive, and its bytes."""

    def receive(self, handoff) -> tuple[float, int]:
        return 1e3 * (time.time() - handoff.sent_at), handoff.nbytes


def hops(sender, receiver, n: int) -> list[tuple[float, int]]:
    """n hops of (ms, bytes), one request at a time as a decoder receives them, after 3 warm-ups."""
    import ray

    return [ray.get(receiver.receive.remote(sender.send.remote())) for _ in range(n + 3)][3:]


def measure_hop_synthetic(n: int, kept: int = 1000, prompt: int = 64, prefix: int = 5) -> dict:
    """Replica-to-replica hop of an 11B-sized handoff between two Ray actors, ship kv vs features, with and
    without zero-copy tensor serialization (the sender's env decides)."""
    import ray

    out = {}
    receiver = ray.remote(num_cpus=0)(HopReceiver).remote()
    for zero_copy in ("1", "0"):
        for ship in ("kv", "features"):
            env = {"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": zero_copy}}
            sender = ray.remote(num_cpus=0)(HopSender).options(runtime_env=env).remote(
                kept, prompt, prefix, "bfloat16", ship)
            times = hops(sender, receiver, n)
            out[f"{ship}, zero-copy {'on' if zero_copy == '1' else 'off'}"] = {
                "hop_ms": statistics.median(h for h, _ in times), "shipped_bytes": times[0][1]}
            ray.kill(sender)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.measure_hop", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    seed0 = 1000
    results = {"in_process": measure_in_process(args.config, args.requests, seed0)}
    localrun.start_ray()
    try:
        for ship in ("kv", "features"):
            results[f"serve_{ship}"] = measure_app(args.config, ship, args.requests, seed0)
        results["hop_11b_synthetic"] = measure_hop_synthetic(args.requests)
    finally:
        localrun.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'path':<16}{'trim':<11}{'TTFT p50 ms':>12}{'hop p50 ms':>12}{'shipped B':>11}{'cross B':>10}"
          f"{'kept/visual':>13}")
    for path, by_trim in results.items():
        if path == "hop_11b_synthetic":
            continue
        for trim, r in by_trim.items():
            kept = f"{r['kept_tokens']:.0f}/{r['visual_tokens']:.0f}" if "kept_tokens" in r else ""
            hop = f"{r['hop_ms']:.2f}" if "hop_ms" in r else "-"
            shipped = f"{r['shipped_bytes']:.0f}" if "shipped_bytes" in r else "-"
            cross = f"{r['shipped_cross_bytes']:.0f}" if "shipped_cross_bytes" in r else "-"
            print(f"{path:<16}{trim:<11}{r['ttft_p50_ms']:>12.1f}{hop:>12}{shipped:>11}{cross:>10}{kept:>13}")
    print("\n11B-sized handoff between two actors (1000 of 6404 visual tokens kept, 64-token prompt, bf16):")
    for name, r in results["hop_11b_synthetic"].items():
        print(f"  {name:<24}{r['shipped_bytes'] / 2**20:>8.1f} MiB{r['hop_ms']:>9.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
