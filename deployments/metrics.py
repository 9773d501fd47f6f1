"""/metrics on the API port: Ray's Prometheus export of every alive node (the ingress's, the decoders' and the other
stages' series, under the names Ray's metrics port serves), merged into one exposition."""

import asyncio

import httpx
import ray


def metrics_urls() -> list[str]:
    """Each alive node's metrics agent (Ray's `metrics_export_port`)."""
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def merge(expositions: list[str]) -> str:
    """Prometheus text of several nodes as one: each family's HELP and TYPE once, then every node's samples."""
    families: dict[str, dict] = {}
    for text in expositions:
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(" ", 3)[2]
                entry = families.setdefault(family, {"meta": {}, "samples": []})
                entry["meta"].setdefault(line[:6], line)
            elif line and not line.startswith("#"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                key = family if family and name.startswith(family) else name
                families.setdefault(key, {"meta": {}, "samples": []})["samples"].append(line)
    out = []
    for entry in families.values():
        out += list(entry["meta"].values()) + entry["samples"]
    return "\n".join(out) + "\n"


async def scrape(timeout_s: float) -> str:
    """Every node's metrics, merged; a node that does not answer in time is left out (its series return with it)."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        async def one(url: str) -> str:
            try:
                r = await client.get(url)
                return r.text if r.status_code == 200 else ""
            except httpx.HTTPError:
                return ""

        urls = await asyncio.to_thread(metrics_urls)
        return merge(list(await asyncio.gather(*(one(u) for u in urls))))
