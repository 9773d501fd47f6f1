"""S3 in one place: settings from the standard AWS environment, one client, object reads and the mirror of a
checkpoint prefix into the local cache (used by the model loader, the ingress and the batch job alike)."""

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import InvalidRequest, ModelSourceError

# Files a processor never needs: the ingress mirrors a checkpoint without them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key/or/prefix -> (bucket, key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and region from the standard AWS environment; credentials stay with each process's default
    chain (env, profile, IRSA, instance role), so none are copied into task arguments."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls) -> "S3Settings":
        env = os.environ
        return cls(endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
                   region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))

    def filesystem(self):
        import pyarrow.fs as pafs

        kwargs = {"region": self.region} if self.region else {}
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs |= {"endpoint_override": url.netloc or url.path, "scheme": url.scheme or "https"}
        return pafs.S3FileSystem(**kwargs)

    def client(self):
        import boto3  # imported here: only s3 users need it

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)


def read_object(client, uri: str, what: str, max_bytes: int | None = None) -> bytes:
    """An object's bytes (at most max_bytes + 1, so callers can tell it is too large); InvalidRequest if absent."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return body.read(max_bytes + 1) if max_bytes is not None else body.read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NoSuchBucket"):
            raise InvalidRequest(f"{what} {uri!r} does not exist") from exc
        raise InvalidRequest(f"{what} {uri!r} could not be read ({code})") from exc
    except BotoCoreError as exc:
        raise InvalidRequest(f"{what} {uri!r} could not be read ({type(exc).__name__})") from exc


def cache_path(uri: str, cache_dir: str | None) -> Path:
    """Where s3://bucket/prefix is mirrored: one place for every stage and the ingress."""
    bucket, prefix = split_s3(uri)
    return Path(cache_dir or Path.home() / ".cache" / "crosstrim") / "s3" / bucket / prefix.rstrip("/")


def mirror_s3(uri: str, cache_dir: str | None, skip_suffixes: tuple[str, ...] = ()) -> Path:
    """Mirror s3://bucket/prefix into the cache (files already there at the same size are skipped)."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/")
    dest = cache_path(uri, cache_dir)
    s3 = S3Settings.from_env().client()
    found = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):].lstrip("/")
                if not rel or rel.endswith("/"):
                    continue
                found += 1
                target = dest / rel
                if rel.endswith(skip_suffixes) or (target.exists() and target.stat().st_size == obj["Size"]):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".part")
                s3.download_file(bucket, obj["Key"], str(tmp))
                tmp.replace(target)
    except Exception as exc:  # botocore raises many kinds; the message is what an operator needs
        raise ModelSourceError(f"could not download {uri}: {exc}") from exc
    if not found:
        raise ModelSourceError(f"no objects under {uri}")
    return dest
