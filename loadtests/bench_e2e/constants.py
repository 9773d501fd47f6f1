"""What every part of `crosstrim bench e2e` agrees on: the request, the systems compared, the report's markers."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
PROMPT = "Describe this image."
TILES = 4  # every request carries one 4-tile image: 4,100 visual tokens on the bench model
SYSTEMS = {"trimmed": "default", "untrimmed": "off"}  # the locustfile's --trim
HF = "hf_generate"
MARKERS = ("<!-- e2e:start -->", "<!-- e2e:end -->")
TARGETS = {"trimmed_vs_untrimmed": 1.6, "trimmed_vs_hf_generate": 2.0}


def workload():
    """loadtests/workload.py loaded by path, so this process never imports the locustfile (its gevent patching)."""
    spec = importlib.util.spec_from_file_location("crosstrim_workload", ROOT / "loadtests" / "workload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
