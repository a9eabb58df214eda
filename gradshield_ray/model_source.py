"""Where θ₀ comes from: a local directory, an s3:// prefix, or a Hugging Face Hub id, each resolved to a local
directory that transformers can load.

s3:// checkpoints are downloaded once per node into a local cache (model.cache_dir, else
$GRADSHIELD_RAY_MODEL_CACHE, else ~/.cache/gradshield_ray/models), under a file lock: every actor on the
node waits for the first one and then shares its copy. Each file is downloaded to `<name>.part` and renamed
when its size (and, for single-part uploads, its MD5 ETag) matches the listing; a download that was
interrupted keeps the files it verified (.verified.json) and resumes the one it was on from the bytes it
has (HTTP range, If-Match on the ETag so a changed object is never spliced). A `.complete.json` written last records the listing
(key, size, ETag); a later resolve that finds the same listing reuses the copy without a download, and a
changed object is downloaded again. Hub ids go through huggingface_hub.snapshot_download, which respects
HF_HUB_OFFLINE (then only the local Hub cache is used).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from gradshield_ray.storage import StorageConfig, redact

log = logging.getLogger("gradshield_ray")
COMPLETE = ".complete.json"  # the listing of a complete copy, written last
VERIFIED = ".verified.json"  # files downloaded and verified so far (an interrupted download resumes from it)
DOWNLOAD_LOG = ".downloads.log"  # "pid name bytes" per file downloaded (tests count downloads per node with it)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
CHUNK = 8 << 20


class ModelSourceError(RuntimeError):
    """model.path cannot be resolved to a local checkpoint; the message names the cause."""


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("GRADSHIELD_RAY_MODEL_CACHE")
                or Path.home() / ".cache" / "gradshield_ray" / "models")


def is_hub_id(path: str) -> bool:
    """'org/name' (or 'name') that is not an existing local path, s3:// URI or absolute/relative path."""
    if path.startswith(("s3://", "/", ".", "~")) or "://" in path or os.path.exists(path):
        return False
    parts = path.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def _s3_client(storage: StorageConfig):
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - boto3 ships with the [ray] extra
        raise ModelSourceError("an s3:// model.path needs boto3 (pip install 'gradshield_ray[ray]')") from e

    def secret(s, env):
        return s.get_secret_value() if s is not None else os.environ.get(env)

    return boto3.client(
        "s3",
        endpoint_url=storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"),
        region_name=storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        aws_access_key_id=secret(storage.access_key_id, "AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=secret(storage.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
        aws_session_token=secret(storage.session_token, "AWS_SESSION_TOKEN"),
        config=Config(retries={"max_attempts": storage.max_attempts, "mode": "standard"},
                      connect_timeout=storage.connect_timeout_s, read_timeout=storage.request_timeout_s),
    )


def s3_listing(uri: str, storage: StorageConfig) -> dict[str, dict[str, Any]]:
    """{relative name: {key, size, etag}} of every object under an s3:// prefix."""
    bucket, _, prefix = uri[5:].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = _s3_client(storage)
    out: dict[str, dict[str, Any]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    out[rel] = {"key": o["Key"], "size": int(o["Size"]), "etag": o["ETag"].strip('"')}
    except Exception as e:  # botocore ClientError / EndpointConnectionError / NoCredentialsError
        raise ModelSourceError(redact(f"cannot list model.path {uri!r}: {type(e).__name__}: {e}", storage)) from None
    if not out:
        raise ModelSourceError(f"model.path {uri!r} holds no objects (is the prefix right?)")
    return out


def _download(client, bucket: str, obj: dict[str, Any], dest: Path) -> int:
    """Download one object to dest via dest.part, resuming from the bytes already there; verify size and
    (single-part uploads) MD5 == ETag. Returns the bytes transferred now."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > obj["size"]:
        part.unlink()
        have = 0
    got = 0
    if have < obj["size"]:
        resp = client.get_object(Bucket=bucket, Key=obj["key"], IfMatch=f'"{obj["etag"]}"',
                                 **({"Range": f"bytes={have}-"} if have else {}))
        with part.open("ab") as f:
            for chunk in resp["Body"].iter_chunks(CHUNK):
                f.write(chunk)
                got += len(chunk)
    size = part.stat().st_size
    if size != obj["size"]:
        raise ModelSourceError(f"{obj['key']}: downloaded {size} bytes, the object has {obj['size']}")
    if "-" not in obj["etag"]:  # a multipart ETag is not the MD5 of the content; size is checked above
        md5 = hashlib.md5()
        with part.open("rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                md5.update(chunk)
        if md5.hexdigest() != obj["etag"]:
            part.unlink()
            raise ModelSourceError(f"{obj['key']}: MD5 {md5.hexdigest()} does not match ETag {obj['etag']}; "
                                   "removed, a rerun downloads it again")
    part.replace(dest)
    return got


def fetch_s3(uri: str, storage: StorageConfig, cache_dir: str | None = None, weights: bool = True) -> Path:
    """The local copy of an s3:// checkpoint on this node, downloaded once under a file lock.
    weights=False fetches only the small files (config, tokenizer, adapter config): the driver's checks."""
    from filelock import FileLock

    listing = s3_listing(uri, storage)
    if not weights:
        listing = {k: v for k, v in listing.items() if not k.endswith(WEIGHT_SUFFIXES)}
    name = hashlib.sha256(f"{uri.rstrip('/')}|{weights}".encode()).hexdigest()[:16]
    local = cache_root(cache_dir) / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{name}"
    local.mkdir(parents=True, exist_ok=True)
    bucket = uri[5:].split("/", 1)[0]
    want = {k: {"size": v["size"], "etag": v["etag"]} for k, v in listing.items()}
    with FileLock(str(local) + ".lock"):
        marker, state = local / COMPLETE, local / VERIFIED
        if marker.exists() and json.loads(marker.read_text()) == want and all((local / k).is_file() for k in want):
            return local
        marker.unlink(missing_ok=True)
        verified = json.loads(state.read_text()) if state.exists() else {}  # files whole since their listing
        client, t0, total = _s3_client(storage), time.perf_counter(), 0
        for rel, obj in sorted(listing.items()):
            dest = local / rel
            if verified.get(rel) == want[rel] and dest.is_file() and dest.stat().st_size == obj["size"]:
                continue  # verified by an earlier (complete or interrupted) download and unchanged since
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                got = _download(client, bucket, obj, dest)
            except ModelSourceError:
                raise
            except Exception as e:
                raise ModelSourceError(redact(f"cannot download {uri}/{rel}: {type(e).__name__}: {e}",
                                              storage)) from None
            with (local / DOWNLOAD_LOG).open("a") as f:
                f.write(f"{os.getpid()} {rel} {got}\n")
            total += got
            verified[rel] = want[rel]
            state.write_text(json.dumps(verified, sort_keys=True))
        marker.write_text(json.dumps(want, sort_keys=True))  # last: the copy is complete
        log.info("model %s: %d bytes downloaded to %s in %.1fs", uri, total, local, time.perf_counter() - t0)
    return local


def fetch_hub(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    """A Hub model id through the Hub cache; with HF_HUB_OFFLINE=1 only the cache is used."""
    from huggingface_hub import snapshot_download

    patterns = None if weights else ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hub cache" if offline
               else "the Hub cannot be reached or has no such model")
        raise ModelSourceError(f"model.path {repo_id!r} is not a local directory, and as a Hub model id {why} "
                               f"({type(e).__name__}: {e})") from None


def resolve(path: str, storage: StorageConfig | None = None, cache_dir: str | None = None,
            revision: str | None = None, weights: bool = True) -> Path:
    """A local directory for model.path (or an adapter's base): local as is, s3:// fetched, Hub id fetched."""
    if not path:
        raise ModelSourceError("model.path is not set")
    if path.startswith("s3://"):
        return fetch_s3(path, storage or StorageConfig(), cache_dir, weights)
    if os.path.isdir(path):
        return Path(path)
    if is_hub_id(path):
        return fetch_hub(path, revision, weights)
    raise ModelSourceError(f"model.path {path!r} does not exist or is not a directory (give a local checkpoint "
                           "directory, an s3:// prefix, or a Hub model id)")


def adapter_base(adapter_dir: Path, base_path: str | None) -> str:
    """The base model of a PEFT adapter directory: model.base_path if set, else the adapter's own record."""
    if base_path:
        return base_path
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelSourceError(f"adapter {adapter_dir} does not name its base model; set model.base_path")
    return base


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _dir_fingerprint(root: Path) -> str:
    """sha256 over config files and each weight file's name, size and first MiB: cheap on 16 GB
    checkpoints, and it changes whenever the checkpoint does in practice."""
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if f.name in ("config.json", "adapter_config.json") or f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def _one_fingerprint(path: str, storage: StorageConfig | None, revision: str | None) -> tuple[str, Path]:
    """(fingerprint, small-files directory) of one checkpoint or adapter location. An s3:// prefix is
    fingerprinted from its listing (names, sizes, ETags), so the driver needs no weights."""
    if path.startswith("s3://"):
        listing = s3_listing(path, storage or StorageConfig())
        h = hashlib.sha256(json.dumps({k: [v["size"], v["etag"]] for k, v in sorted(listing.items())}).encode())
        return h.hexdigest(), resolve(path, storage, None, revision, weights=False)
    local = resolve(path, storage, None, revision, weights=True)
    return _dir_fingerprint(local), local


def fingerprint(path: str, storage: StorageConfig | None = None, revision: str | None = None,
                base_path: str | None = None) -> str:
    """The identity of θ₀ as configured (an adapter's includes its base's); recorded in reports and compared
    by resumable runs."""
    fp, local = _one_fingerprint(path, storage, revision)
    if is_adapter(local):
        base_fp, _ = _one_fingerprint(adapter_base(local, base_path), storage, None)
        fp = hashlib.sha256((fp + base_fp).encode()).hexdigest()
    return fp[:16]
