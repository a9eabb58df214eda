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


def _secret(s: SecretStr | None, env: str) -> str | None:
    return s.get_secret_value() if s is not None else os.environ.get(env)


def filesystem(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for s3://bucket/key or a local path."""
    if uri.startswith("s3://"):
        endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw: dict[str, Any] = {
            "region": cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
            "connect_timeout": cfg.connect_timeout_s,
            "request_timeout": cfg.request_timeout_s,
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
