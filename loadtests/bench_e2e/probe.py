"""The deployed app under measurement: decoder counters, replica CPU time, warm-up and one locust point."""

import time
from pathlib import Path

import httpx
import psutil

from loadtests.bench_e2e.constants import PROMPT, TILES
from loadtests.bench_e2e.locust_runs import (
    _point_line,
    history_counts,
    locust_summary,
    start_locust,
    stop_process_group,
    window_rates,
)


class Bench:
    """One deployed app and the measurements around its locust runs."""

    def __init__(self, url: str, app: str, args, workdir: Path):
        self.url, self.app, self.args, self.workdir = url, app, args, workdir
        self.http = httpx.Client(base_url=url, timeout=60)
        self.replicas = replica_processes(app)

    def stats(self) -> dict:
        r = self.http.get("/stats")
        r.raise_for_status()
        return r.json()["decoder"]

    def snapshot(self, locust_pid: int | None = None) -> dict:
        """Decoder counters, CPU seconds of every replica, of locust, of everything this bench started (Ray
        included), and of the whole machine (the difference is other people's work)."""
        cpu = {name: _cpu_seconds(p) for name, p in self.replicas.items()}
        if locust_pid is not None:
            cpu["locust"] = _cpu_seconds(psutil.Process(locust_pid), children=True)
        return {"time": time.time(), "decoder": self.stats(), "cpu": cpu,
                "ours": _cpu_seconds(psutil.Process(), children=True), "machine_busy": machine_busy()}

    def wait_idle(self, timeout_s: float = 90) -> None:
        """Until the last point's requests are gone: locust's stopped users disconnect and the engine aborts them,
        but an encoder or trimmer forward already under way runs to its end."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0 and self._stages_cpu_over(0.5) < 0.1:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the app still has work {timeout_s}s after locust stopped: {self.stats()}")

    def _stages_cpu_over(self, seconds: float) -> float:
        """Cores the replicas used over the next `seconds`."""
        before = sum(_cpu_seconds(p) for p in self.replicas.values())
        time.sleep(seconds)
        return (sum(_cpu_seconds(p) for p in self.replicas.values()) - before) / seconds

    def warm_up(self, w) -> None:
        """First calls pay lazy initialisation in every replica; keep that out of the first point."""
        png = w.image_set(448, 1)[TILES][0]
        for trim in ("default", "off", "default"):
            body = w.chat_body(None, PROMPT, w.data_url(png), 4, w.trim_field(trim, None), ignore_eos=True)
            body["stream"] = False
            body.pop("stream_options")
            r = self.http.post("/v1/chat/completions", json=body, timeout=300)
            r.raise_for_status()

    def point(self, system: str, users: int) -> dict:
        """One locust run at `users`; rates over [warmup_s, point_s - 1] of it, latencies from locust."""
        args = self.args
        self.wait_idle()
        decoder = serve_handle("DecoderPool", self.app)
        decoder.reset_peaks.remote().result()
        prefix = self.workdir / f"{system}_u{users}"
        proc = start_locust(self.url, prefix, system, users, args)
        t0 = time.monotonic()
        try:
            time.sleep(max(0.0, t0 + args.warmup_s - time.monotonic()))
            a = self.snapshot(proc.pid)
            time.sleep(max(0.0, t0 + args.point_s - 1 - time.monotonic()))
            b = self.snapshot(proc.pid)
            proc.wait(timeout=args.point_s + 60)
        finally:
            stop_process_group(proc)
        point = {"system": system, "users": users, "locust_exit_code": proc.returncode,
                 **window_rates(a, b, history_counts(prefix, "chat/completions")),
                 **locust_summary(prefix), "peak_running": self.stats()["peak_running"]}
        print(_point_line(point), flush=True)
        return point


def replica_processes(app: str) -> dict:
    """deployment name -> psutil.Process of its replica, among this driver's descendants (our Ray only)."""
    found = {}
    tag = f"ServeReplica:{app}:"
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if tag in title:  # the title is "ray::ServeReplica:APP:DEPLOYMENT[.method]"
            found[title.split(tag, 1)[1].split(".")[0].split()[0]] = p
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def _cpu_seconds(p: psutil.Process, children: bool = False) -> float:
    total = 0.0
    for q in [p, *(p.children(recursive=True) if children else [])]:
        try:
            t = q.cpu_times()
        except psutil.Error:  # a child that just exited
            continue
        total += t.user + t.system
    return total


def serve_handle(deployment: str, app: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app)
