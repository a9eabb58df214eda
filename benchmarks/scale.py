"""The pipeline's own costs as the unit count grows, on a real S3 server process (moto) behind a counting proxy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--units 100,1000,10000] [--rows-per-unit 4]
        [--check] [--no-kills] [--scenarios fresh,resume,pass2kill] [--profile DIR] [--json out.json]

A synthetic corpus of short rows (files of 100 row groups of --rows-per-unit rows; one unit per row group)
is scored by a tiny real model (Llama, hidden 32, 1 layer), so that scoring is cheap and the pipeline's own
work shows. Each `gradshield-ray run` is a separate driver process joining one local Ray (as a RayJob
driver would). For each size it reports:
  - wall time by phase (listing+preflight, pass 1, reduce, pass 2; manifest = the rest), from report.json;
  - driver CPU seconds and driver peak RSS (getrusage of the driver process, in report.json);
  - S3 requests by verb, counted by an HTTP proxy in front of moto;
  - objects written, bytes of manifest.json and report.json;
  - resume after SIGKILL at 50% of pass 1: seconds and driver peak RSS of the rerun;
  - rerun after SIGKILL at 90% of pass 2: the share of pass-2 groups split again;
and the growth factor of each figure per 10x units. Every run's outputs are checked: conservation (every
input row in exactly one of kept/removed/errors, ids unique), no empty output file, and the manifest's file
list equal to what the bucket holds. --check exits non-zero when an invariant or the object-count bound
fails (CI runs it at 10^2 and 10^3 units); timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "AKIABENCHSCALE000000", "bench-scale-secret"
BUCKET = "scale"
ROW_GROUPS_PER_FILE = 100
TARGET_FILE_BYTES = 16 << 10  # small, so that pass 2 has many groups at these corpus sizes


# ---------------------------------------------------------------- S3: moto behind a counting proxy


class CountingProxy(ThreadingHTTPServer):
    """HTTP proxy to moto counting requests by verb (GET, PUT, HEAD, DELETE, LIST = GET on a bucket with
    a list query, POST). Bodies are forwarded unchanged (chunked uploads are de-chunked; moto does not
    check signatures)."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.counts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        path, _, query = self.path.partition("?")
        verb = self.command
        if verb == "GET" and path.strip("/").count("/") == 0 and ("list-type" in query or "prefix" in query):
            verb = "LIST"
        with self.server.lock:
            self.server.counts[verb] += 1
        conn = getattr(self, "_up", None) or http.client.HTTPConnection(self.server.upstream, timeout=60)
        self._up = conn
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else
                         resp.getheader("Content-Length", "0"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                        region_name="us-east-1")


def objects(s3, prefix: str) -> dict[str, int]:
    return {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])}


def commit_records(s3, prefix: str) -> int:
    return sum(len(json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())["items"])
               for k in objects(s3, prefix))


# ---------------------------------------------------------------- corpus, model, runs


def build_model(root: Path) -> str:
    from gradshield_ray.miniature.testing import build_tiny_llama, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                             intermediate_size=64, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return str(root / "model")


def upload_corpus(s3, units: int, rows_per_unit: int, prefix: str) -> int:
    """units row groups of rows_per_unit short rows, ROW_GROUPS_PER_FILE per file; returns the row count."""
    n_files = math.ceil(units / ROW_GROUPS_PER_FILE)
    rows = 0
    for f in range(n_files):
        groups = min(ROW_GROUPS_PER_FILE, units - f * ROW_GROUPS_PER_FILE)
        n = groups * rows_per_unit
        t = pa.table({"prompt": [f"Question {f}-{i}: how do I bake bread?" for i in range(n)],
                      "response": [("Sure, here is how." if i % 7 else "I cannot help.") + f" {i}" for i in range(n)]})
        buf = io.BytesIO()
        pq.write_table(t, buf, row_group_size=rows_per_unit)
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/f{f:05d}.parquet", Body=buf.getvalue())
        rows += n
    return rows


def config(proxy_url: str, model: str, inp: str, out: str) -> dict:
    return {"input": f"s3://{BUCKET}/{inp}", "output": f"s3://{BUCKET}/{out}", "model": {"path": model},
            "data": {"messages_column": None, "prompt_column": "prompt", "response_column": "response",
                     "max_tokens": 64},
            "proxy": {"max_probes": 2}, "score": {"verify_rows": 0},
            "threshold": {"policy": "top_fraction", "fraction": 0.1},
            "storage": {"endpoint_url": proxy_url, "access_key_id": KEY, "secret_access_key": SECRET},
            "ray": {"num_actors": 1, "num_gpus_per_actor": 1, "num_cpus_per_actor": 0.5, "render_num_cpus": 0.5,
                    "batch_rows": 256},
            "output_files": {"target_file_bytes": TARGET_FILE_BYTES}}


def driver(cfg: dict, tmp: Path, gcs: str, extra_env: dict | None = None,
           profile: Path | None = None) -> subprocess.Popen:
    """A `gradshield-ray run` driver process; with `profile`, under py-spy (every Python thread of the
    driver, Ray Data's executor thread included, sampled while it holds the GIL; collapsed stacks written
    to that file)."""
    path = tmp / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_ADDRESS": gcs, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    spy = [shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy", "record", "--format", "raw",
           "--threads", "--gil", "--nonblocking", "--rate", "100", "-o", str(profile), "--"] if profile else []
    return subprocess.Popen([*spy, sys.executable, "-m", "gradshield_ray.cli", "run", "--config", str(path)], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / "driver.log", "ab"),
                            start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 3600) -> None:
    if p.wait(timeout) != 0:
        raise RuntimeError(f"driver exited with {p.returncode}; see driver.log")


def kill_when(p: subprocess.Popen, ready, poll_s: float = 0.1) -> None:
    while not ready():
        if p.poll() is not None:
            raise RuntimeError("the driver finished before the kill point")
        time.sleep(poll_s)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    time.sleep(1.0)


def check_outputs(s3, out: str, n_rows: int, man: dict) -> list[str]:
    """Conservation, unique ids, no empty file, manifest == bucket. Returns the problems found."""
    problems = []
    listed = {f["path"].removeprefix(f"s3://{BUCKET}/"): f for s in ("kept", "removed", "errors")
              for f in man["files"][s]}
    held = {k: v for s in ("kept", "removed", "errors") for k, v in objects(s3, f"{out}/{s}/").items()}
    if set(listed) != set(held):
        problems.append(f"manifest lists {len(listed)} files, the bucket holds {len(held)}")
    ids: list[str] = []
    for k in sorted(held):
        t = pq.read_table(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()), columns=["gs_row_id"])
        if t.num_rows == 0:
            problems.append(f"empty output file {k}")
        ids += t["gs_row_id"].to_pylist()
    if len(ids) != n_rows or len(set(ids)) != n_rows:
        problems.append(f"conservation: {len(ids)} rows ({len(set(ids))} unique) out of {n_rows}")
    c = man["counts"]
    if c["kept"] + c["removed"] + c["errors"] != c["input"] or c["input"] != n_rows:
        problems.append(f"counts {c} for {n_rows} input rows")
    return problems


def thread_cpu(pid: int, stop: threading.Event, out: Path) -> None:
    """Poll /proc/<pid>/task/*/stat until `stop`: CPU seconds of each thread of the process tree's driver
    (utime + stime, last value seen), summed by thread name, written as JSON. py-spy sees Python frames only;
    this also counts the C++ threads (Ray's core worker, gRPC) where a driver's CPU may go."""
    ticks = os.sysconf("SC_CLK_TCK")
    seen: dict[str, tuple[str, float]] = {}
    while not stop.wait(0.25):
        for pid_dir in Path("/proc").glob(f"{pid}/task/*"):
            try:
                stat = (pid_dir / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat[stat.rindex(")") + 2:].split()
            seen[pid_dir.name] = (name, (int(f[11]) + int(f[12])) / ticks)
    by = Counter()
    for name, cpu in seen.values():
        by[name] += cpu
    out.write_text(json.dumps(dict(by.most_common()), indent=1))


def _driver_pid(p: subprocess.Popen, profile: Path | None) -> int:
    """The python driver's pid (under py-spy, py-spy's child)."""
    if not profile:
        return p.pid
    for _ in range(100):
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        if kids.exists() and kids.read_text().split():
            return int(kids.read_text().split()[0])
        time.sleep(0.05)
    return p.pid


def measure(s3, proxy: CountingProxy, cfg: dict, tmp: Path, gcs: str, out: str, n_rows: int, units: int,
            profile: Path | None = None) -> dict:
    before = proxy.snapshot()
    t = time.perf_counter()
    p = driver(cfg, tmp, gcs, profile=profile)
    stop = threading.Event()
    if profile:
        poll = threading.Thread(target=thread_cpu, args=(_driver_pid(p, profile), stop,
                                                         profile.with_suffix(".threads.json")), daemon=True)
        poll.start()
    finish(p)
    stop.set()
    if profile:
        poll.join()
    wall = time.perf_counter() - t
    requests = proxy.snapshot() - before
    man = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{out}/manifest.json")["Body"].read())
    written = objects(s3, f"{out}/")
    sc = man["scoring"]
    out_bytes = sum(f["bytes"] for s in ("kept", "removed", "errors") for f in man["files"][s])
    n_commits = len(objects(s3, f"{out}/scored/_commits/")) + len(objects(s3, f"{out}/_pass2/commits/"))
    # objects: one scored file per unit (task), ≤ 3 output files per pass-2 group (groups ≤ 2·bytes/target + 1),
    # the commit batches, and a constant (run.json, threshold, histogram, report, manifest, plan)
    bound = units + 3 * (2 * math.ceil(out_bytes / TARGET_FILE_BYTES) + 1) + n_commits + 8
    return {"units": units, "rows": n_rows, "wall_s": wall, **{f"{k}_s": v for k, v in sc["phases"].items()},
            "manifest_s": max(0.0, sc["seconds"] - sum(sc["phases"].values())),
            "driver_cpu_s": sc["driver"]["cpu_s"], "driver_peak_rss_mib": sc["driver"]["peak_rss_mib"],
            "requests": dict(requests), "requests_total": sum(requests.values()),
            "objects_written": len(written), "object_bound": bound, "commit_objects": n_commits,
            "groups": sc["groups"], "output_bytes": out_bytes,
            "manifest_bytes": written[f"{out}/manifest.json"], "report_bytes": written[f"{out}/report.json"],
            "problems": check_outputs(s3, out, n_rows, man)}


SCENARIOS = ("fresh", "resume", "pass2kill")


def one_size(s3, proxy, model, tmp, gcs, units: int, rpu: int, scenarios: set[str],
             profile_dir: Path | None = None) -> dict:
    inp = f"in-{units}-{rpu}"
    n_rows = upload_corpus(s3, units, rpu, inp)
    purl = f"http://127.0.0.1:{proxy.server_address[1]}"
    prof = profile_dir / f"driver-{units}x{rpu}.txt" if profile_dir else None
    r: dict = {"units": units, "rows": n_rows, "problems": []}
    if "fresh" in scenarios:
        r.update(measure(s3, proxy, config(purl, model, inp, f"fresh-{units}-{rpu}"), tmp, gcs,
                         f"fresh-{units}-{rpu}", n_rows, units, prof))
    if "resume" in scenarios:
        out = f"resume-{units}-{rpu}"
        cfg = config(purl, model, inp, out)
        kill_when(driver(cfg, tmp, gcs), lambda: commit_records(s3, f"{out}/scored/_commits/") >= units // 2, 0.2)
        at_kill = commit_records(s3, f"{out}/scored/_commits/")
        res = measure(s3, proxy, cfg, tmp, gcs, out, n_rows, units)
        r.update(resume_committed_at_kill=at_kill, resume_s=res["wall_s"], resume_peak_rss_mib=res["driver_peak_rss_mib"])
        r["problems"] += res["problems"]
    if "pass2kill" in scenarios:
        out = f"p2kill-{units}-{rpu}"
        cfg = config(purl, model, inp, out)
        p = driver(cfg, tmp, gcs, {"GRADSHIELD_TEST_SLOW_SPLIT_S": "0.2"})

        def late_in_pass2() -> bool:
            plan = objects(s3, f"{out}/_pass2/plan.json")
            if not plan:
                return False
            g = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{out}/_pass2/plan.json")["Body"].read())["groups"]
            return commit_records(s3, f"{out}/_pass2/commits/") >= 0.9 * g

        kill_when(p, late_in_pass2, 0.05)
        res = measure(s3, proxy, cfg, tmp, gcs, out, n_rows, units)
        man = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{out}/manifest.json")["Body"].read())
        r["pass2_redone_share"] = man["scoring"]["groups_split_this_attempt"] / man["scoring"]["groups"]
        r["problems"] += res["problems"]
    return r


FIGURES = ("wall_s", "listing_s", "pass1_s", "reduce_s", "pass2_s", "manifest_s", "driver_cpu_s",
           "driver_peak_rss_mib", "requests_total", "objects_written", "manifest_bytes", "report_bytes",
           "resume_s", "resume_peak_rss_mib", "pass2_redone_share")


def table(results: list[dict]) -> str:
    cols = [r["units"] for r in results]
    lines = ["| figure | " + " | ".join(f"{u:,} units" for u in cols) + " | growth per 10x (last step) |",
             "|---|" + "---|" * (len(cols) + 1)]
    for f in (*FIGURES, "requests_by_verb", "requests_per_unit", "driver_cpu_ms_per_unit"):
        vals = []
        for r in results:
            if f == "requests_by_verb":
                vals.append(" ".join(f"{k}:{v}" for k, v in sorted(r.get("requests", {}).items())))
            elif f == "requests_per_unit":
                vals.append(r["requests_total"] / r["units"] if "requests_total" in r else "")
            elif f == "driver_cpu_ms_per_unit":
                vals.append(1000 * r["driver_cpu_s"] / r["units"] if "driver_cpu_s" in r else "")
            else:
                vals.append(r.get(f, ""))
        growth = ""
        nums = [v for v in vals if isinstance(v, (int, float))]
        if len(nums) >= 2 and nums[-2]:
            step = math.log10(results[-1]["units"] / results[-2]["units"])
            growth = f"{(nums[-1] / nums[-2]) ** (1 / step):.2f}x" if step and nums[-1] > 0 < nums[-2] else ""
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
        lines.append(f"| {f} | " + " | ".join(fmt(v) for v in vals) + f" | {growth} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", default="100,1000,10000")
    ap.add_argument("--rows-per-unit", type=int, default=4)
    ap.add_argument("--check", action="store_true", help="exit 1 when an invariant or the object bound fails")
    ap.add_argument("--no-kills", action="store_true", help="skip the SIGKILL resume scenarios")
    ap.add_argument("--kills-max-units", type=int, default=None,
                    help="run the SIGKILL scenarios only at sizes up to this many units (CI: keeps its time bounded)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="of fresh, resume (SIGKILL at 50%% of pass 1, rerun), pass2kill (SIGKILL at 90%% of pass 2, "
                         "rerun); --no-kills and --kills-max-units drop the last two")
    ap.add_argument("--profile", type=Path, default=None,
                    help="record each fresh driver with py-spy (pip install py-spy) into this folder, "
                         "collapsed stacks; summarize with benchmarks/profile_summary.py")
    a = ap.parse_args()
    if a.profile:
        a.profile.mkdir(parents=True, exist_ok=True)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="gss"))
    moto, url = start_moto()
    proxy = CountingProxy(url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ.update(AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False,
             log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="gsr", dir="/tmp"),
             _node_ip_address="127.0.0.1")
    try:
        s3 = client(url)
        s3.create_bucket(Bucket=BUCKET)
        model = build_model(tmp)
        gcs = ray.get_runtime_context().gcs_address
        results = []
        for units in (int(u) for u in a.units.split(",")):
            t = time.perf_counter()
            kills = not a.no_kills and (a.kills_max_units is None or units <= a.kills_max_units)
            scen = {x for x in a.scenarios.split(",") if x == "fresh" or kills}
            results.append(one_size(s3, proxy, model, tmp, gcs, units, a.rows_per_unit, scen, a.profile))
            print(f"# {units} units done in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        print(f"rows per unit {a.rows_per_unit}; tiny Llama hidden 32, 1 layer; target_file_bytes {TARGET_FILE_BYTES}")
        print(table(results))
        for r0, r1 in zip(results, results[1:]):
            if "driver_cpu_s" not in r0 or "driver_cpu_s" not in r1:
                continue
            d_units = r1["units"] - r0["units"]
            print(f"marginal driver CPU per unit, {r0['units']:,} → {r1['units']:,} units: "
                  f"{1000 * (r1['driver_cpu_s'] - r0['driver_cpu_s']) / d_units:.2f} ms")
        if a.json:
            a.json.write_text(json.dumps(results, indent=2))
        bad = [(r["units"], p) for r in results for p in r["problems"]]
        bad += [(r["units"], f"{r['objects_written']} objects > bound {r['object_bound']}") for r in results
                if r.get("objects_written", 0) > r.get("object_bound", math.inf)]
        for u, p in bad:
            print(f"FAIL at {u} units: {p}")
        return 1 if a.check and bad else 0
    finally:
        ray.shutdown()
        proxy.shutdown()
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
