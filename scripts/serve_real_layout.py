"""The Serve app (configs/local.yaml) on a real-layout checkpoint (scripts/build_real_layout.py): each replica's
resident memory, load_stats and CPU seconds per request, over HTTP with 1- and 4-tile images, trimmed (target 0.5)
and untrimmed; checks each replica's own peak memory <= 1.15 x loaded bytes + 1 GiB. Prints and writes JSON.

A replica's own memory is its resident set without Ray's object store (VmRSS - RssShmem, sampled every 50 ms): a
stage's results go into the node's shared object store, whose pages stay mapped (and counted in VmRSS/VmHWM) in
every process that wrote or read them; that pool is sized once per node (`object_store_memory`), not per replica.
VmHWM, which counts it, is reported beside it.
Also writes the rows Parquet for `crosstrim batch` (--rows F).

Run: python scripts/serve_real_layout.py CKPT [--dtype bfloat16] [--requests 4] [--json serve-real.json]
"""

import argparse
import io
import json
import math
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TILES = {"1tile": (560, 560), "4tile": (1120, 1120)}
TARGET = {"policy": "target", "target_fraction": 0.5}
CASES = [("1tile", TARGET), ("4tile", TARGET), ("1tile", {"enabled": False}), ("4tile", {"enabled": False})]


def png(name: str) -> bytes:
    from pipeline.quality.synthetic import noise_image

    buf = io.BytesIO()
    noise_image(*TILES[name], 2).save(buf, format="PNG")
    return buf.getvalue()


def kv_budget(ckpt: str, dtype: str, visual_tokens: int = 6404, text_tokens: int = 2048, requests: int = 2) -> int:
    """KV bytes for `requests` 4-tile requests from the checkpoint's config: every layer holds K and V of
    kv_heads x head_dim per token (cross layers over the visual tokens, self layers over the text)."""
    t = json.loads((Path(ckpt) / "config.json").read_text())["text_config"]
    per_token = 2 * t["num_key_value_heads"] * (t["hidden_size"] // t["num_attention_heads"]) * (
        2 if dtype == "bfloat16" else 4)
    cross = len(t["cross_attention_layers"])
    per_request = per_token * (cross * visual_tokens + (t["num_hidden_layers"] - cross) * text_tokens)
    return math.ceil(requests * per_request / 2**20) * 2**20


def write_rows(path: Path) -> None:
    """~4 rows (1- and 4-tile images) as `crosstrim batch` reads them: id, prompt, image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["1tile", "4tile", "1tile", "4tile"]
    pq.write_table(pa.table({"id": [f"r{i}-{n}" for i, n in enumerate(names)],
                             "prompt": ["Describe this image."] * len(names),
                             "image": pa.array([png(n) for n in names], pa.binary())}), path)


def rss(p) -> dict:
    """VmRSS, VmHWM and RssShmem (bytes) of a process."""
    out = {}
    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:", "RssShmem:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


class OwnMemorySampler(threading.Thread):
    """Peak of VmRSS - RssShmem per process, polled every `period_s` until stopped."""

    def __init__(self, procs: dict, period_s: float = 0.05):
        super().__init__(daemon=True)
        self.procs, self.period_s, self.done = procs, period_s, threading.Event()
        self.peak = {name: 0 for name in procs}

    def run(self) -> None:
        while not self.done.is_set():
            for name, p in self.procs.items():
                m = rss(p)
                self.peak[name] = max(self.peak[name], m["VmRSS"] - m["RssShmem"])
            self.done.wait(self.period_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--requests", type=int, default=4, help="first N of: 1/4-tile target 0.5, 1/4-tile untrimmed")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", type=Path, default=Path("serve-real.json"))
    p.add_argument("--rows", type=Path, help="also write the batch input Parquet here and exit")
    args = p.parse_args(argv)
    if args.rows:
        write_rows(args.rows)
        return 0

    import httpx
    from ray import serve

    from deployments import localrun
    from loadtests.bench_e2e.probe import _cpu_seconds, replica_processes
    from loadtests.workload import chat_body, data_url

    config = localrun.load_config(ROOT / "configs/local.yaml")
    app = config["applications"][0]
    budget = kv_budget(args.ckpt, args.dtype)
    app["args"]["model"] |= {"source": args.ckpt, "dtype": args.dtype}
    app["args"]["engine"] |= {"kv_budget_bytes": budget, "max_running": 2, "max_waiting": 4}
    app["args"]["served_model_name"] = "real-layout"
    localrun.start_ray(num_cpus=2)
    result = {"ckpt": args.ckpt, "dtype": args.dtype, "kv_budget_bytes": budget, "requests": [], "replicas": {}}
    try:
        t0 = time.perf_counter()
        url = localrun.deploy(config, timeout_s=600)
        result["deploy_s"] = round(time.perf_counter() - t0, 1)
        procs = replica_processes("crosstrim")
        stages = {"VisionEncoder": "encoder", "Trimmer": "trimmer", "DecoderPool": "decoder"}
        handles = {name: serve.get_deployment_handle(name, "crosstrim") for name in stages}
        loads = {name: h.load_stats.remote().result() for name, h in handles.items()}
        print(f"deployed in {result['deploy_s']} s; KV budget {budget / 2**20:.0f} MiB", flush=True)
        http = httpx.Client(base_url=url, timeout=900)
        sampler = OwnMemorySampler({n: procs[n] for n in stages})
        sampler.start()
        images = {n: data_url(png(n)) for n in TILES}
        for name, trim in CASES[:args.requests]:
            body = chat_body(None, "Describe this image.", images[name], args.max_tokens, trim, ignore_eos=True)
            body["stream"] = False
            body.pop("stream_options")
            cpu0 = {n: _cpu_seconds(procs[n]) for n in stages}
            t1 = time.perf_counter()
            r = http.post("/v1/chat/completions", json=body)
            wall = time.perf_counter() - t1
            r.raise_for_status()
            cpu = {stages[n]: round(_cpu_seconds(procs[n]) - cpu0[n], 2) for n in stages}
            tr = r.json()["trim"]
            row = {"image": name, "trim": trim, "wall_s": round(wall, 2), "cpu_s": cpu,
                   "tokens": r.json()["usage"]["completion_tokens"],
                   **{k: tr[k] for k in ("visual_tokens", "kept_tokens", "cross_kv_bytes", "hop_ms")}}
            result["requests"].append(row)
            print(json.dumps(row), flush=True)
        sampler.done.set()
        sampler.join()
        ok = True
        for name, stage in stages.items():
            mem, ls = rss(procs[name]), loads[name]
            limit = 1.15 * ls["loaded_bytes"] + 2**30
            own = max(sampler.peak[name], ls["peak_rss_bytes"])  # the load's peak came before any shared page
            rep = {**ls, "vm_rss_bytes": mem["VmRSS"], "vm_hwm_bytes": mem["VmHWM"],
                   "rss_shmem_bytes": mem["RssShmem"], "own_peak_bytes": own, "limit_bytes": int(limit),
                   "within_limit": own <= limit}
            ok &= rep["within_limit"]
            result["replicas"][stage] = rep
            print(f"{name:13} loaded {ls['loaded_bytes'] / 2**30:5.2f} GiB in {ls['load_s']:5.1f} s; "
                  f"own peak {own / 2**30:5.2f} GiB (limit {limit / 2**30:5.2f}) "
                  f"{'ok' if rep['within_limit'] else 'OVER'}"
                  f"; VmHWM {mem['VmHWM'] / 2**30:5.2f} GiB, of it object store now {mem['RssShmem'] / 2**30:4.2f}",
                  flush=True)
        ingress = replica_processes("crosstrim").get("Ingress")
        if ingress is not None:
            result["replicas"]["ingress"] = rss(ingress)
        result["within_limit"] = ok
    finally:
        args.json.write_text(json.dumps(result, indent=1))
        localrun.stop()
    return 0 if result.get("within_limit") else 1


if __name__ == "__main__":
    sys.exit(main())
