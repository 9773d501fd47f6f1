"""The Serve app on a real-layout checkpoint ($CROSSTRIM_REAL_CKPT, scripts/build_real_layout.py): 1- and 4-tile
requests over HTTP, trimmed and not, and every replica's own peak memory (without Ray's shared object store)
within 1.15 x its loaded bytes + 1 GiB (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_serve_app_on_real_layout(tmp_path):
    ckpt = os.environ.get("CROSSTRIM_REAL_CKPT")
    if not ckpt:
        pytest.skip("CROSSTRIM_REAL_CKPT not set: build one with scripts/build_real_layout.py OUT and point it there")
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_real_layout.py"), ckpt, "--json", str(out)],
                          capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(proc.stdout)
    result = json.loads(out.read_text())
    assert [(r["image"], r["visual_tokens"]) for r in result["requests"]] == [
        ("1tile", 1601), ("4tile", 6404), ("1tile", 1601), ("4tile", 6404)]
    assert [r["kept_tokens"] for r in result["requests"]] == [801, 3202, 1601, 6404]  # target 0.5, then untrimmed
    assert all(r["tokens"] == 8 for r in result["requests"])
    for name, rep in result["replicas"].items():
        if name != "ingress":
            assert rep["own_peak_bytes"] <= rep["limit_bytes"], (name, rep)
    assert proc.returncode == 0, proc.stderr[-2000:]
