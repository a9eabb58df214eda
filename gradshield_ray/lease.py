"""One run per output prefix: a lease object (output/_lease.json) created with a conditional write, so a
second run into the same prefix fails fast instead of interleaving its commits with the first one's.

The lease is created with `If-None-Match: *` (S3 refuses the PUT when the object exists; locally O_EXCL),
renewed by the holder every lease_s / 3, and deleted when the run ends. A crashed run's lease is taken over
once it has expired (lease_s after its last renewal), or at once when its holder ran on this host and its
process is gone (a rerun on the same machine after a kill need not wait). Limit: taking over an expired
lease is a delete followed by a conditional create, so two runs that both find it expired at the same
instant can both delete it; only one create wins.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from gradshield_ray import storage
from gradshield_ray.errors import RunError

log = logging.getLogger("gradshield_ray")
LEASE = "_lease.json"


class LeaseHeld(RunError):
    """Another run holds the output prefix."""


class _S3:
    """Conditional create / read / delete of one object through botocore (pyarrow cannot send If-None-Match)."""

    def __init__(self, storage_json: str, bucket: str, key: str):
        self.client = storage.s3_client(storage_json)
        self.bucket, self.key = bucket, key

    def create(self, body: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or \
                    e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise

    def put(self, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body)

    def read(self) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return json.loads(self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"].read())
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _Local:
    def __init__(self, path: str):
        self.path = path

    def create(self, body: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def put(self, body: bytes) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, self.path)

    def read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _gone(holder: dict) -> bool:
    """The holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


class Lease:
    """The output prefix's lease, held for the life of a run (a context manager)."""

    def __init__(self, output: str, storage_json: str, lease_s: float):
        _, root = storage.filesystem(output, storage.StorageConfig())
        if output.startswith("s3://"):
            bucket, _, prefix = root.partition("/")
            self.obj: Any = _S3(storage_json, bucket, storage.join(prefix, LEASE) if prefix else LEASE)
        else:
            self.obj = _Local(storage.join(root, LEASE))
        self.output, self.lease_s = output, lease_s
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.me, "expires": time.time() + self.lease_s}).encode()

    def acquire(self) -> None:
        for _ in range(2):
            if self.obj.create(self._body()):
                self.thread = threading.Thread(target=self._renew, daemon=True, name="gradshield-lease")
                self.thread.start()
                return
            holder = self.obj.read()
            if holder is None:
                continue  # released between our create and read
            left = float(holder.get("expires", 0)) - time.time()
            if left > 0 and not _gone(holder):
                raise LeaseHeld(
                    f"output {self.output!r} is in use by another run (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}; its lease expires in {left:.0f}s unless renewed): two runs cannot "
                    "share an output prefix. Wait for it to finish, or use another output prefix.")
            log.warning("taking over the lease of a run that is gone (host %s, pid %s, %s)", holder.get("host"),
                        holder.get("pid"), "expired" if left <= 0 else "process gone")
            self.obj.delete()
        raise LeaseHeld(f"output {self.output!r}: another run took the lease at the same time")

    def _renew(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                holder = self.obj.read()
                if holder is None or holder.get("owner") != self.me["owner"]:
                    log.error("the lease on %s was taken by another run", self.output)
                    return
                self.obj.put(self._body())
            except Exception:  # a failed renewal is retried at the next period
                log.warning("lease renewal failed", exc_info=True)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
            holder = self.obj.read()
            if holder is not None and holder.get("owner") == self.me["owner"]:
                self.obj.delete()

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
