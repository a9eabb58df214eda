"""A real S3-compatible server process (moto_server) on 127.0.0.1, visible to Ray worker processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

FAKE_KEY = "AKIATESTGRADSHIELD00"
FAKE_SECRET = "gs-test-secret-Zq9XvB3kP1mN7wLr"  # distinctive: tests grep outputs for it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server():
    """Start moto_server, yield its endpoint URL, stop it."""
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=FAKE_KEY, aws_secret_access_key=FAKE_SECRET,
                        region_name="us-east-1")


def upload_dir(client, local_dir, bucket: str, prefix: str) -> None:
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local_dir).as_posix()}")


@contextmanager
def s3_bucket(name: str):
    """A moto_server process holding one empty bucket: yields (endpoint URL, boto3 client)."""
    with moto_server() as url:
        client = s3_client(url)
        client.create_bucket(Bucket=name)
        yield url, client
