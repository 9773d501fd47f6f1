"""`crosstrim batch` on a real local Ray, over local Parquet and a real moto S3 server: bad rows become error
rows, ids and row counts are kept, re-runs replace the output, and greedy outputs equal `crosstrim generate`."""

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from deployments.localrun import init_local_ray
from pipeline import cli
from pipeline.batch.config import BatchConfig, load_config
from pipeline.config import TrimConfig
from pipeline.engine.sampling import SamplingParams
from pipeline.inprocess import Pipeline
from pipeline.model.inputs import decode_image
from pipeline.quality.synthetic import generate_samples, png_bytes
from pipeline.storage import S3Settings

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = ROOT / "configs" / "batch-local.yaml"
GPU_CONFIG = ROOT / "configs" / "batch-gpu.yaml"
MAX_TOKENS = 6
BUCKET = "crosstrim-batch"
OK_IDS = ["img-0", "img-1", "uri-2", "text-3", "img-7"]


# ------------------------------------------------------------------------------------------------ helpers

def make_rows(image_uri: str, missing_uri: str) -> list[dict]:
    """Eight rows: images as bytes and by URI, text-only, and three that must fail (corrupt, missing, too long)."""
    s = generate_samples(4, seed=11)
    rows = [
        ("img-0", s[0].prompt, png_bytes(s[0].image), None),
        ("img-1", s[1].prompt, png_bytes(s[1].image), None),
        ("uri-2", s[2].prompt, None, image_uri),
        ("text-3", "say something about shapes", None, None),
        ("corrupt-4", "what is this?", b"\x89PNG\r\n\x1a\n this is not an image", None),
        ("missing-5", "what is this?", None, missing_uri),
        ("long-6", "shape " * 1500, png_bytes(s[3].image), None),
        ("img-7", "what is in the picture?", png_bytes(s[3].image), None),
    ]
    return [dict(zip(("id", "prompt", "image", "image_uri"), r)) for r in rows]


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], pa.binary()),
        "image_uri": pa.array([r["image_uri"] for r in rows], pa.string()),
    })


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def read_output(path: str, filesystem=None) -> dict[str, dict]:
    rows = pads.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids in the output"
    return by_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, and the standard AWS variables pointing at it (set before Ray starts,
    so the Ray workers inherit the credentials)."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)  # started again if Ray's 30 s pass
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def oracle():
    """The in-process pipeline `crosstrim generate` runs: expected output per row and trim setting."""
    pipe = Pipeline(load_config(str(LOCAL_CONFIG)).model)  # the model the job runs
    cache = {}

    def expected(row: dict, trim: TrimConfig, image_path: Path | None = None):
        key = (row["id"], trim.policy)
        if key not in cache:
            data = image_path.read_bytes() if row["image_uri"] else row["image"]
            images = [] if data is None else [decode_image(data)]
            cache[key] = pipe.generate(row["prompt"], images, SamplingParams(max_tokens=MAX_TOKENS), trim)
        return cache[key]

    return expected


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    image = root / "images" / "uri-2.png"
    image.parent.mkdir()
    rows = make_rows(str(image), str(root / "images" / "missing.png"))
    image.write_bytes(png_bytes(generate_samples(4, seed=11)[2].image))
    (root / "in").mkdir()
    pq.write_table(rows_table(rows), root / "in" / "rows.parquet")
    return root, rows, image


@pytest.fixture(scope="module")
def local_run(local_ray, local_data):
    """The shipped local config, trimmed (its default), over a local Parquet directory."""
    root, rows, image = local_data
    code, stdout = run_cli("batch", "--config", str(LOCAL_CONFIG), "--input", str(root / "in"),
                           "--output", str(root / "out"), "--max-tokens", str(MAX_TOKENS), "--token-ids")
    assert code == 0, stdout
    return root, rows, image, stdout, read_output(str(root / "out"))


def assert_matches(out: dict, want) -> None:
    assert out["error"] is None, out["error"]
    assert out["token_ids"] == want.token_ids
    assert out["text"] == want.text
    assert (out["prompt_tokens"], out["completion_tokens"], out["visual_tokens"], out["kept_tokens"],
            out["finish_reason"]) == (want.prompt_tokens, len(want.token_ids), want.visual_tokens,
                                      want.kept_tokens, want.finish_reason)


def assert_bad_rows(out: dict[str, dict]) -> None:
    assert "could not be decoded" in out["corrupt-4"]["error"]
    assert "does not exist" in out["missing-5"]["error"]
    assert "the limit is 1024" in out["long-6"]["error"]
    for rid in ("corrupt-4", "missing-5", "long-6"):
        assert out[rid]["text"] is None and out[rid]["completion_tokens"] is None


# -------------------------------------------------------------------------------------------------- tests

def test_config_files_validate():
    local, gpu = load_config(str(LOCAL_CONFIG)), load_config(str(GPU_CONFIG))
    assert local.model.device == "cpu" and local.sampling.greedy
    total = sum(p.num_cpus * p.concurrency for p in (local.encoder, local.trimmer, local.decoder))
    assert total <= 1.0, "on 2 cores the pools must leave a CPU for Ray Data's listing and I/O tasks"
    assert gpu.model.device == "cuda" and all(p.num_gpus > 0 for p in (gpu.encoder, gpu.trimmer, gpu.decoder))
    with pytest.raises(ValueError):
        BatchConfig.model_validate({"decoder": {"concurrency": [3, 2]}})
    with pytest.raises(ValueError):
        BatchConfig.model_validate({"encoder": {"batch": 4}})  # typo: unknown keys are refused


def test_bad_input_and_paths_fail_before_any_work(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "rows.parquet")
    assert cli.main(["batch", "--input", str(tmp_path / "rows.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "lacks column(s) ['prompt']" in capsys.readouterr().err
    assert cli.main(["batch", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "overlaps input" in capsys.readouterr().err
    assert cli.main(["batch", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "cannot read Parquet input" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_local_job_keeps_every_row_and_reports(local_run):
    _, rows, _, stdout, out = local_run
    assert sorted(out) == sorted(r["id"] for r in rows)
    assert_bad_rows(out)
    assert out["text-3"]["visual_tokens"] == 0 and out["text-3"]["kept_tokens"] == 0
    assert all(0 < out[i]["kept_tokens"] < out[i]["visual_tokens"] for i in OK_IDS if i != "text-3")
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("crosstrim batch:")]
    assert line.startswith("crosstrim batch: 8 rows, 3 errors, mean kept ratio 0.")
    assert "rows/s" in line and "tokens/s" in line


def test_local_trimmed_equals_generate(local_run, oracle):
    _, rows, image, _, out = local_run
    by_id = {r["id"]: r for r in rows}
    for rid in OK_IDS:
        assert_matches(out[rid], oracle(by_id[rid], TrimConfig(), image))


def test_equals_crosstrim_generate_command(local_run, tmp_path):
    """The literal `crosstrim generate` command line, for one image row, against the batch output row."""
    _, rows, _, _, out = local_run
    row = rows[0]
    path = tmp_path / "img.png"
    path.write_bytes(row["image"])
    code, stdout = run_cli("generate", "--image", str(path), "--prompt", row["prompt"],
                           "--max-tokens", str(MAX_TOKENS), "--json")
    assert code == 0
    assert json.loads(stdout)["token_ids"] == out[row["id"]]["token_ids"]


@pytest.mark.slow  # docs/testing.md: its command
def test_rerun_untrimmed_replaces_output(local_run, oracle):
    """Re-running into the same output leaves exactly one row per input row, all from the new run."""
    root, rows, image, _, _ = local_run
    code, stdout = run_cli("batch", "--config", str(LOCAL_CONFIG), "--input", str(root / "in"),
                           "--output", str(root / "out"), "--max-tokens", str(MAX_TOKENS), "--token-ids",
                           "--no-trim")
    assert code == 0, stdout
    out = read_output(str(root / "out"))
    assert sorted(out) == sorted(r["id"] for r in rows)
    assert_bad_rows(out)
    by_id = {r["id"]: r for r in rows}
    for rid in OK_IDS:
        assert out[rid]["kept_tokens"] == out[rid]["visual_tokens"]
        assert_matches(out[rid], oracle(by_id[rid], TrimConfig(policy="none"), image))


def test_s3_job(local_ray, s3_endpoint, oracle, tmp_path):
    """Input Parquet and images in a real S3-compatible store, output back to it over stale files. Small
    batches and a tiny engine queue make the decoder feed rows as it drains and split the rows over batches."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    image = generate_samples(4, seed=11)[2].image
    s3.put_object(Bucket=BUCKET, Key="images/uri-2.png", Body=png_bytes(image))
    rows = make_rows(f"s3://{BUCKET}/images/uri-2.png", f"s3://{BUCKET}/images/missing.png")
    buf = io.BytesIO()
    pq.write_table(rows_table(rows), buf)
    s3.put_object(Bucket=BUCKET, Key="in/rows.parquet", Body=buf.getvalue())
    stale = io.BytesIO()
    pq.write_table(pa.table({"id": ["stale"], "error": ["from an earlier run"]}), stale)
    s3.put_object(Bucket=BUCKET, Key="out/old-run.parquet", Body=stale.getvalue())

    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    cfg["engine"] |= {"max_waiting": 2, "max_running": 2}
    cfg["encoder"]["batch_size"] = cfg["trimmer"]["batch_size"] = 3
    cfg["decoder"]["batch_size"] = 5
    config = tmp_path / "batch-s3.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, stdout = run_cli("batch", "--config", str(config), "--input", f"s3://{BUCKET}/in/",
                           "--output", f"s3://{BUCKET}/out", "--max-tokens", str(MAX_TOKENS), "--token-ids")
    assert code == 0, stdout
    assert "crosstrim batch: 8 rows, 3 errors" in stdout

    out = read_output(f"{BUCKET}/out", S3Settings.from_env().filesystem())
    assert sorted(out) == sorted(r["id"] for r in rows)  # the stale row is gone
    assert_bad_rows(out)
    image_path = tmp_path / "uri-2.png"
    image_path.write_bytes(png_bytes(image))
    by_id = {r["id"]: r for r in rows}
    for rid in OK_IDS:
        assert_matches(out[rid], oracle(by_id[rid], TrimConfig(), image_path))


def test_stages_in_process_turn_failures_into_error_rows():
    """The stage classes without Ray: refusals at every stage become error rows, and a failed decoder step
    fails only its batch, frees the KV, and leaves the stage usable."""
    from pipeline.batch.stages import DecodeStage, EncodeStage, TrimStage

    cfg = BatchConfig.model_validate({"engine": {"max_model_len": 80}, "sampling": {"max_tokens": 4}})
    png = png_bytes(generate_samples(1, seed=3)[0].image)
    table = rows_table([
        {"id": "ok", "prompt": "what is here?", "image": png, "image_uri": None},
        {"id": "wordy", "prompt": "describe " * 40, "image": png, "image_uri": None},  # over max_model_len
        {"id": "both", "prompt": "what?", "image": png, "image_uri": "/nowhere.png"},
        {"id": "no-prompt", "prompt": None, "image": png, "image_uri": None},
        {"id": None, "prompt": "what?", "image": png, "image_uri": None},
        {"id": "scheme", "prompt": "what?", "image": None, "image_uri": "http://example.com/a.png"},
    ])
    encode, trim, decode = EncodeStage(cfg, S3Settings()), TrimStage(cfg), DecodeStage(cfg)
    out = decode(trim(encode(table))).to_pylist()
    assert [r["id"] for r in out] == ["ok", "wordy", "both", "no-prompt", None, "scheme"]
    assert out[0]["error"] is None and out[0]["completion_tokens"] == 4
    assert "exceeds max_model_len 80" in out[1]["error"]
    assert "both image and image_uri" in out[2]["error"]
    assert "no prompt" in out[3]["error"]
    assert "no id" in out[4]["error"]
    assert "only local paths and s3://" in out[5]["error"]

    states = trim(encode(table.slice(0, 1)))
    real_step = decode.engine.step
    decode.engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    failed = decode(states).to_pylist()
    assert failed[0]["error"] == "decoder failed: RuntimeError: boom"
    assert decode.engine.stats().kv_used_bytes == 0 and not decode.engine.has_work()
    decode.engine.step = real_step
    assert decode(states).to_pylist() == out[:1]


@pytest.mark.slow  # docs/testing.md: its command
def test_decoder_actor_killed_mid_job(local_ray, tmp_path):
    """kill -9 of the decoder actor while it decodes: Ray Data restarts it and re-runs its batch; the job
    completes with every input row exactly once and no error rows."""
    import threading

    import psutil

    n = 48
    pq.write_table(rows_table([{"id": f"t-{i}", "prompt": f"tell me about shape {i}", "image": None,
                                "image_uri": None} for i in range(n)]), tmp_path / "rows.parquet")
    cfg = yaml.safe_load(LOCAL_CONFIG.read_text())
    cfg["sampling"].update(max_tokens=160, ignore_eos=True)  # long enough to kill it mid-batch
    cfg["decoder"]["batch_size"] = 8  # six decoder batches
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = {}

    def job():
        result["code"], result["stdout"] = run_cli("batch", "--config", str(tmp_path / "cfg.yaml"), "--input",
                                                   str(tmp_path / "rows.parquet"), "--output", str(tmp_path / "out"))

    thread = threading.Thread(target=job)
    thread.start()

    def decoder_actor():
        for p in psutil.Process().children(recursive=True):  # this driver's Ray only
            try:
                if "DecodeStage" in " ".join(p.cmdline()) and p.cpu_percent(0.2) > 20:
                    return p
            except psutil.Error:
                continue
        return None

    deadline, victim = time.monotonic() + 240, None
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        victim = decoder_actor()
    assert victim is not None, "the decoder actor was never seen decoding"
    victim.kill()
    thread.join(600)
    assert not thread.is_alive() and result["code"] == 0, result.get("stdout")
    out = read_output(str(tmp_path / "out"))  # asserts no duplicate ids
    assert sorted(out) == sorted(f"t-{i}" for i in range(n))
    assert all(r["error"] is None and r["completion_tokens"] == 160 for r in out.values())
