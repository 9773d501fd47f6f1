"""Where a batch job reads and writes: local or s3:// Parquet, input checks, and each row's image bytes."""

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.errors import InvalidRequest
from pipeline.storage import S3Settings, read_object

IMAGE_COLUMNS = ("image", "image_uri")


def resolve_uri(uri: str, s3: S3Settings) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a local path, file:// or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        return s3.filesystem(), uri.removeprefix("s3://").rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def input_columns(fs: pafs.FileSystem, path: str, uri: str) -> tuple[list[str], int]:
    """The columns the job reads (id, prompt, and image and/or image_uri) and the input's row count."""
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise InvalidRequest(f"cannot read Parquet input {uri!r}: {exc}") from exc
    names = dataset.schema.names
    missing = [c for c in ("id", "prompt") if c not in names]
    if missing:
        raise InvalidRequest(f"input {uri!r} lacks column(s) {missing}; it has {names}")
    return ["id", "prompt"] + [c for c in IMAGE_COLUMNS if c in names], dataset.count_rows()


def check_disjoint(input_path: str, output_path: str) -> None:
    """The output prefix is replaced on every run, so it must neither hold nor sit inside the input."""
    a, b = input_path.rstrip("/") + "/", output_path.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise InvalidRequest(f"output {output_path!r} overlaps input {input_path!r}; "
                             "the output is replaced on each run")


class ImageReader:
    """Bytes of an `image_uri`: a local path (file:// optional) or s3://bucket/key through boto3."""

    def __init__(self, s3: S3Settings):
        self.s3 = s3
        self._client = None

    def read(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            return self._read_s3(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise InvalidRequest(f"image_uri {uri!r}: only local paths and s3:// are supported")
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise InvalidRequest(f"image_uri {uri!r} does not exist")
        return path.read_bytes()

    def _read_s3(self, uri: str) -> bytes:
        if self._client is None:
            self._client = self.s3.client()  # boto3 clients are thread-safe; one per actor
        return read_object(self._client, uri, "image_uri")
