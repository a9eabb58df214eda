"""Object storage and local paths behind one pyarrow FileSystem (the I/O edge of the Ray pipeline).

Endpoint, region and credentials come from config or the standard AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL).
Secrets are pydantic SecretStr: they print and dump as '**********', never in clear.
"""
from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for an S3-compatible server
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    max_attempts: int = Field(8, gt=0)  # S3 retries for transient errors (AWS standard strategy)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0


class StorageError(OSError):
    """A path or bucket cannot be reached; the message names it (and never a credential)."""


_CREDENTIAL_HINT = ("check the credentials (storage.access_key_id / storage.secret_access_key, or AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY) and the bucket policy")


def _secret(s: SecretStr | None, env: str) -> str | None:
    return s.get_secret_value() if s is not None else os.environ.get(env)


def redact(text: str, cfg: StorageConfig) -> str:
    """`text` with every credential value we know of (config and AWS environment) replaced by '***'.
    Defence in depth: error texts from the S3 client are not supposed to carry secrets."""
    for s, env in ((cfg.secret_access_key, "AWS_SECRET_ACCESS_KEY"), (cfg.session_token, "AWS_SESSION_TOKEN"),
                   (cfg.access_key_id, "AWS_ACCESS_KEY_ID")):
        value = _secret(s, env)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def describe_error(e: Exception, uri: str, what: str, cfg: StorageConfig) -> StorageError:
    """A storage failure as one line that names the cause (credentials, bucket, endpoint), redacted."""
    msg = str(e)
    denied = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
              "InvalidAccessKeyId", "SignatureDoesNotMatch", "HTTP response code: 403")
    if any(k in msg for k in denied):
        cause = f"access denied: {_CREDENTIAL_HINT}"
    elif "NO_SUCH_BUCKET" in msg or "NoSuchBucket" in msg:
        cause = f"bucket {bucket_of(uri)!r} does not exist"
    elif "NETWORK_CONNECTION" in msg or "curlCode" in msg:
        cause = f"cannot reach the storage endpoint ({cfg.endpoint_url or 'the AWS default'})"
    else:
        cause = type(e).__name__
    return StorageError(redact(f"cannot {what} {uri!r}: {cause} ({msg})", cfg))


def bucket_of(uri: str) -> str:
    """The bucket of an s3:// URI ('' for a local path)."""
    return uri[5:].split("/", 1)[0] if uri.startswith("s3://") else ""


def check_bucket(fs: pafs.FileSystem, uri: str) -> None:
    """Raise StorageError unless the bucket of an s3:// URI exists (a missing bucket otherwise reads as an
    empty prefix)."""
    b = bucket_of(uri)
    if b and fs.get_file_info(b).type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {b!r} of {uri!r} does not exist (or these credentials cannot see it)")


def resolved_json(cfg: StorageConfig) -> str:
    """Storage settings for workers, with credentials resolved on the driver (config first, then the
    driver's AWS environment), so workers on other nodes need no credentials of their own. This travels
    as a task argument only; it is never logged or written."""
    d = cfg.model_dump()
    for k, v in d.items():
        if hasattr(v, "get_secret_value"):
            d[k] = v.get_secret_value()
    for key, env in (("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                     ("session_token", "AWS_SESSION_TOKEN"), ("region", "AWS_REGION")):
        if d.get(key) is None and os.environ.get(env):
            d[key] = os.environ[env]
    if d.get("endpoint_url") is None:
        d["endpoint_url"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return json.dumps(d)


def filesystem(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for s3://bucket/key or a local path."""
    if uri.startswith("s3://"):
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw: dict[str, Any] = {
            "region": cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
            "connect_timeout": cfg.connect_timeout_s,
            "request_timeout": cfg.request_timeout_s,
            # a small write becomes one PutObject on close instead of Create/Upload/CompleteMultipartUpload:
            # a PUT is idempotent, so a retry after a lost response is safe (a retried Complete is not)
            "allow_delayed_open": True,
        }
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        key, secret = _secret(cfg.access_key_id, "AWS_ACCESS_KEY_ID"), _secret(cfg.secret_access_key,
                                                                               "AWS_SECRET_ACCESS_KEY")
        if key and secret:
            kw.update(access_key=key, secret_key=secret,
                      session_token=_secret(cfg.session_token, "AWS_SESSION_TOKEN"))
        return pafs.S3FileSystem(**kw), uri[5:].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r} (use s3:// or a local path)")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, root: str, suffix: str = "") -> list[str]:
    """Files under root (recursive, sorted); [] when root is missing."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(suffix))


def list_infos(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """FileInfo (path, size) of every file under root, from one recursive listing; [] when root is missing."""
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return [i for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]


def s3_client(storage_json: str):
    """A botocore S3 client with the resolved settings (resolved_json): for what pyarrow's filesystem
    cannot do, batched deletes and conditional creates."""
    import botocore.session
    from botocore.config import Config

    d = json.loads(storage_json)
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=d.get("endpoint_url"), region_name=d.get("region") or "us-east-1",
        aws_access_key_id=d.get("access_key_id"), aws_secret_access_key=d.get("secret_access_key"),
        aws_session_token=d.get("session_token"),
        config=Config(retries={"max_attempts": d.get("max_attempts", 3), "mode": "standard"},
                      connect_timeout=d.get("connect_timeout_s", 5), read_timeout=d.get("request_timeout_s", 60)))


def delete_files(fs: pafs.FileSystem, paths: list[str], storage_json: str) -> None:
    """Delete files: on S3 in DeleteObjects batches of 1000 keys (one request each, and no directory
    marker objects, which pyarrow's delete_file leaves behind); locally one unlink each."""
    if not paths:
        return
    if isinstance(fs, pafs.LocalFileSystem):
        for p in paths:
            fs.delete_file(p)
        return
    client = s3_client(storage_json)
    by_bucket: dict[str, list[str]] = {}
    for p in paths:
        b, _, k = p.partition("/")
        by_bucket.setdefault(b, []).append(k)
    for b, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            r = client.delete_objects(Bucket=b, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                        "Quiet": True})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise StorageError(f"cannot delete s3://{b}/{e.get('Key')}: {e.get('Code')} ({len(r['Errors'])} "
                                   "failed)")


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """One PUT on S3 (atomic: the object exists whole or not at all); tmp + rename locally."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(fs: pafs.FileSystem, path: str, obj: dict[str, Any]) -> None:
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True).encode())


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir_contents(path, missing_dir_ok=True)
        try:
            fs.delete_dir(path)
        except OSError:
            pass
