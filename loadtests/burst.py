"""A burst: N streaming image requests sent at once to the Serve app (configs/local.yaml by default, started on a
fresh local Ray unless --url is given). What front-door admission must show (issue 28): every refusal fast (503 +
Retry-After before any stage call), no encoder or trimmer call spent on a refused request, every admitted stream
complete, no 5xx but those refusals, nothing cut, and no KV held afterwards.

    python -m loadtests.burst --requests 300 --out burst.json

Each request has its own picture (no encoder-cache hits), so the encoder's and trimmer's call counts (/stats'
stage_batches) grow by exactly the requests that reached them."""

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import httpx

from loadtests.workload import chat_body, data_url, make_image

ROOT = Path(__file__).resolve().parents[1]


async def one(c: httpx.AsyncClient, body: dict, t0: float) -> dict:
    """One streaming request: its status, when the status came, and how the stream ended."""
    out = {"status": None, "status_s": None, "end_s": None, "kind": "failed", "tokens": 0, "finish": None,
           "retry_after": None, "detail": ""}
    try:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            out["status"], out["status_s"] = r.status_code, time.perf_counter() - t0
            out["retry_after"] = r.headers.get("retry-after")
            if r.status_code != 200:
                out["detail"] = (await r.aread()).decode()[:200]
                return out
            done, error = False, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    item = json.loads(line[6:])
                    error |= "error" in item
                    for ch in item.get("choices", []):
                        out["tokens"] += bool(ch.get("delta", {}).get("content"))
                        out["finish"] = ch.get("finish_reason") or out["finish"]
            out["kind"] = "ok" if done and not error and out["finish"] in ("length", "stop") else "cut"
    except httpx.HTTPError as exc:
        out["kind"], out["detail"] = ("cut" if out["status"] == 200 else "failed"), type(exc).__name__
    finally:
        out["end_s"] = time.perf_counter() - t0
    return out


def stage_calls(stats: dict) -> dict:
    return {stage: sum(r["calls"] for r in replicas) for stage, replicas in stats["stage_batches"].items()}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


async def burst(url: str, n: int, max_tokens: int) -> dict:
    bodies = [chat_body(None, "Describe this image.", data_url(make_image(50_000 + i, 2, 1)), max_tokens,
                        ignore_eos=True) for i in range(n)]
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=600), limits=limits) as c:
        before = (await c.get("/stats")).json()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(c, b, t0) for b in bodies))
        wall = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while True:  # the decoder frees a finished stream's KV a step after its last token
            after = (await c.get("/stats")).json()
            if after["decoder"].get("kv_used_bytes", 0) == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] in (429, 503)]
    calls = {k: v - stage_calls(before)[k] for k, v in stage_calls(after).items()}
    adm0, adm1 = before.get("admission", {}), after.get("admission", {})
    delta = {k: adm1[k] - adm0.get(k, 0) for k in ("admitted", "refused_at_ingress", "refused_at_decoder",
                                                    "stage_calls_for_refused") if k in adm1}
    return {
        "requests": n, "max_tokens": max_tokens, "wall_s": round(wall, 2),
        "admitted": len(ok), "complete": sum(r["kind"] == "ok" for r in ok), "cut": sum(r["kind"] == "cut" for r in ok),
        "refused": len(refused), "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "5xx_other_than_503": sum(1 for r in results if r["status"] and r["status"] >= 500 and r["status"] != 503),
        "no_response": sum(r["status"] is None for r in results),
        "refusal_s": {"p50": pct([r["status_s"] for r in refused], 0.5),
                      "p99": pct([r["status_s"] for r in refused], 0.99),
                      "max": pct([r["status_s"] for r in refused], 1.0)},
        "admitted_first_byte_s": {"p50": pct([r["status_s"] for r in ok], 0.5),
                                  "p99": pct([r["status_s"] for r in ok], 0.99)},
        "admitted_end_s": {"p50": pct([r["end_s"] for r in ok], 0.5), "p99": pct([r["end_s"] for r in ok], 0.99)},
        "stage_calls": calls,  # encoder and trimmer calls the burst caused
        "stage_calls_for_refused": {k: v - len(ok) for k, v in calls.items()},  # beyond one each per admitted
        "admission": delta,  # the ingress's own counts (/stats "admission")
        "kv_used_bytes_after": after["decoder"].get("kv_used_bytes"),
        "statuses": {str(s): sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results},
                                                                                     key=str)},
        "examples": {"refused": refused[0]["detail"] if refused else None,
                     "failed": next((r["detail"] for r in results if r["kind"] == "failed" and r not in refused),
                                    None)},
    }


def ray_actor_error() -> type:
    from ray.exceptions import RayActorError

    return RayActorError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    p.add_argument("--url", help="an app already running (else the config is deployed on a fresh local Ray)")
    p.add_argument("--out", default="burst.json")
    args = p.parse_args(argv)
    started = None
    if args.url is None:
        from deployments import localrun

        localrun.start_ray(num_cpus=2)
    try:
        if args.url is None:
            t = time.perf_counter()
            config = localrun.load_config(args.config)
            try:
                url = localrun.deploy(config, timeout_s=900)
            except ray_actor_error():  # Serve killed a proxy slow to report ready (a loaded machine): once more
                url = localrun.deploy(config, timeout_s=900)
            started = round(time.perf_counter() - t, 1)
        else:
            url = args.url
        with httpx.Client(base_url=url, timeout=60) as c:  # one request first: every stage warm, reports in
            body = chat_body(None, "Describe this image.", data_url(make_image(1, 2, 1)), 2)
            body["stream"] = False
            assert c.post("/v1/chat/completions", json=body).status_code == 200
        result = asyncio.run(burst(url, args.requests, args.max_tokens))
    finally:
        if args.url is None:
            localrun.stop()
    result.update(config=args.config if args.url is None else None, deploy_s=started, machine={
        "cpus": __import__("os").cpu_count(), "load_avg_1m": round(__import__("os").getloadavg()[0], 1),
        "python": platform.python_version()})
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    checks = {"refusals p99 <= 1 s": (result["refusal_s"]["p99"] or 0) <= 1.0,
              "0 stage calls for refused": all(v == 0 for v in result["stage_calls_for_refused"].values()),
              "every admitted stream complete": result["complete"] == result["admitted"],
              "0 5xx (but 503 refusals)": result["5xx_other_than_503"] == 0, "0 cut": result["cut"] == 0,
              "KV 0 afterwards": result["kv_used_bytes_after"] == 0}
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
