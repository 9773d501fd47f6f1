#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the gpu-marked tests (CUDA varlen paged attention vs the
# per-sequence path, the engine on CUDA vs CPU, CUDA graphs vs eager over the page pools, layers split over
# cuda:0/cuda:1 vs one GPU when there are 2), `crosstrim bench decoder` on CUDA in bf16 (static and realistic
# workloads) and the decode step vs batch (1, 16, 64, 128) at the 11B text layout in bf16, graphs and eager, with
# its ratio to the HBM bound (scripts/decode_step_gpu.py; HBM_GBPS, default 4800, sets the bandwidth), and batched
# encode + trim at batch 1 vs 8 (pipeline/bench/stages.py). Writes OUT/gpu_check.json (default
# OUT: bench-results/gpu-check) and exits non-zero when a test fails. Usage: scripts/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results/gpu-check}
mkdir -p "$OUT"
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"

set +e
python -m pytest -q -m gpu -rs tests/ --junitxml "$OUT/gpu-tests.xml" | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
crosstrim bench decoder --device cuda --dtype bfloat16 --requests 32 --max-tokens 32 --k-ratio 0.08 \
    --json "$OUT/decoder.json"
crosstrim bench decoder --workload realistic --device cuda --dtype bfloat16 --requests 96 --k-ratio 0.08 \
    --json "$OUT/decoder-realistic.json"
python scripts/decode_step_gpu.py --batches 1,16,64,128 --hbm-gbps "${HBM_GBPS:-4800}" \
    --json "$OUT/decode-step-11b.json"
python -m pipeline.bench.stages --device cuda --dtype bfloat16 --batches 1 8 --json "$OUT/stages.json"

python - "$OUT" "$tests_rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, rc = Path(sys.argv[1]), int(sys.argv[2])
suite = ET.parse(out / "gpu-tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
summary = {
    "tests": {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}, "pytest_exit": rc,
    "bench_decoder": json.loads((out / "decoder.json").read_text()),
    "bench_decoder_realistic": json.loads((out / "decoder-realistic.json").read_text()),
    "decode_step_11b_layout": json.loads((out / "decode-step-11b.json").read_text()),
    "batched_encode_trim": json.loads((out / "stages.json").read_text()),
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(f"wrote {out / 'gpu_check.json'}: {summary['tests']}")
sys.exit(rc)
PY
