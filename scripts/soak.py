#!/usr/bin/env python3
"""Soak run: many inputs, some broken, through `audiocap run` on a local S3 server
(moto) while the run is killed with SIGKILL several times and the storage goes away
once; then the dataset is read back and checked.

What it reports (JSON on stdout, and --json FILE):
  inputs: generated, of which valid / broken;
  rows: total, captions, error rows by error_kind, rows with warnings;
  duplicates: (uri, segment_index) pairs written more than once (must be 0);
  lost: valid inputs with no row at all (must be 0);
  failed_valid: valid inputs whose rows are errors (should be 0);
  runs: each run's exit code, wall seconds and peak RSS (VmHWM), and the kills/outage.

Needs the release binary (`cargo build --release`), python3 with moto[server],
boto3 and pyarrow (the README's test command installs them) and ../shared/fixtures
(the tiny model is exported from it). No timing is asserted: it is a measurement.

Usage: scripts/soak.py [--inputs 10000] [--broken 0.1] [--kills 3]
                       [--outage-seconds 5] [--binary target/release/audiocap]
                       [--work DIR] [--json FILE] [--seed 7]
"""

import argparse
import asyncio
import io
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav(samples, rate=16_000, channels=1, bits=16, fmt=1) -> bytes:
    width = bits // 8
    if fmt == 3:
        data = b"".join(struct.pack("<f", s) for s in samples)
    elif bits == 8:
        data = bytes(int(128 + 127 * max(-1, min(1, s))) for s in samples)
    else:
        data = b"".join(struct.pack("<h", int(32767 * max(-1, min(1, s)))) for s in samples)
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, fmt, channels, rate, rate * channels * width, channels * width, bits)
    return header + b"data" + struct.pack("<I", len(data)) + data


def tone(rng, seconds, rate, channels):
    f = rng.uniform(100, 4000)
    n = int(seconds * rate)
    return [0.3 * math.sin(2 * math.pi * f * (i // channels) / rate) + rng.uniform(-0.05, 0.05) for i in range(n * channels)]


def make_inputs(rng, count, broken_share):
    """(key, bytes, valid, kind) for every input: valid clips of several shapes,
    and broken or odd ones of the kinds a real archive has."""
    out = []
    broken = int(count * broken_share)
    # Valid clips of several shapes; the inputs share a pool of them (their keys, not
    # their bytes, make them inputs), so making 10,000 takes seconds.
    pool = []
    for _ in range(64):
        rate = rng.choice([16_000, 16_000, 22_050, 44_100])
        channels = rng.choice([1, 1, 2])
        seconds = rng.uniform(0.3, 1.5)
        pool.append(wav(tone(rng, seconds, rate, channels), rate=rate, channels=channels))
    kinds = ["empty", "text", "header_cut", "too_short", "nan", "absurd_rate", "truncated_data", "zero_channels"]
    for i in range(count):
        if i < broken:
            kind = kinds[i % len(kinds)]
            if kind == "empty":
                data = b""
            elif kind == "text":
                data = b"this is not audio\n" * 10
            elif kind == "header_cut":
                data = wav(tone(rng, 0.5, 16_000, 1))[:30]
            elif kind == "too_short":
                data = wav(tone(rng, 0.03, 16_000, 1))
            elif kind == "nan":
                s = tone(rng, 0.5, 16_000, 1)
                s[100] = float("nan")
                data = wav(s, fmt=3, bits=32)
            elif kind == "absurd_rate":
                data = wav(tone(rng, 0.2, 16_000, 1), rate=0)
            elif kind == "truncated_data":
                full = wav(tone(rng, 1.0, 16_000, 1))
                data = full[: len(full) * 6 // 10]
            else:
                data = wav(tone(rng, 0.2, 16_000, 1), channels=0)
            # Truncated data is still captioned (with a warning): a valid input.
            out.append((f"in/broken/{i:06}-{kind}.wav", data, kind == "truncated_data", kind))
        else:
            out.append((f"in/ok/{i:06}.wav", rng.choice(pool), True, "ok"))
    rng.shuffle(out)
    return out


class Outage:
    """A TCP proxy in front of moto that can refuse connections for a while."""

    def __init__(self, target_port):
        self.target = target_port
        self.port = free_port()
        self.down_until = 0.0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self.loop.run_forever()

    async def _client(self, reader, writer):
        if time.time() < self.down_until:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return

        async def pipe(a, b):
            try:
                while data := await a.read(65536):
                    if time.time() < self.down_until:
                        break
                    b.write(data)
                    await b.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                b.transport.abort() if time.time() < self.down_until else b.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def go_down(self, seconds):
        self.down_until = time.time() + seconds


def peak_rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def last_line(log):
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[-1]) if lines else ""


def run_once(binary, pipeline, env, kill_after=None, outage=None, outage_seconds=0):
    started = time.time()
    # The run's output goes to files: a pipe nobody reads would fill and stop the run.
    log = pipeline.parent / f"run-{started:.0f}-{os.getpid()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "run", str(pipeline)], env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = 0
    killed = outaged = False
    while proc.poll() is None:
        peak = max(peak, peak_rss_kib(proc.pid))
        elapsed = time.time() - started
        if kill_after is not None and elapsed >= kill_after:
            proc.send_signal(signal.SIGKILL)
            killed = True
        if outage is not None and not outaged and elapsed >= 10.0:
            outage.go_down(outage_seconds)
            outaged = True
        time.sleep(0.05)
    proc.wait()
    return {
        "exit": proc.returncode,
        "wall_s": round(time.time() - started, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "killed": killed,
        "outage_s": outage_seconds if outaged else 0,
        # The run's last words (its summary, or the error it stopped on).
        "last_line": last_line(log),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--broken", type=float, default=0.10)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--outage-seconds", type=float, default=5.0)
    ap.add_argument("--binary", default=str(ROOT / "target/release/audiocap"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    import boto3
    import pyarrow.parquet as pq

    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="audiocap-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    subprocess.run(
        [args.binary, "export", "--beats", FIXTURES / "beats-tiny/beats.pt", "--llm", FIXTURES / "e2e-tiny/llm",
         "--projector", FIXTURES / "e2e-tiny/projector.safetensors", "--adapter", FIXTURES / "e2e-tiny/adapters/a0",
         "--name", "soak-tiny", "--overwrite", "--out", model],
        check=True, capture_output=True)

    moto_port = free_port()
    moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", moto_port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", **{
            "aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"})
        s3.create_bucket(Bucket="soak")
        inputs = make_inputs(rng, args.inputs, args.broken)
        for key, data, _, _ in inputs:
            s3.put_object(Bucket="soak", Key=key, Body=data)

        proxy = Outage(moto_port)
        pipeline = work / "soak.toml"
        pipeline.write_text(f"""
[model]
path = "{model}"
[input]
sources = ["s3://soak/in/"]
[storage]
endpoint = "http://127.0.0.1:{proxy.port}"
allow_http = true
[batching]
batch_size = 16
[output]
uri = "s3://soak/out/"
commit_interval_seconds = 2
[run]
max_failed_fraction = 1.0
transient_retry_seconds = 60
[logging]
progress = "off"
""")
        env = dict(os.environ, **creds)
        runs = []
        # Kills at growing times, so each run gets somewhat further.
        for k in range(args.kills):
            runs.append(run_once(args.binary, pipeline, env, kill_after=8.0 + 6.0 * k))
        runs.append(run_once(args.binary, pipeline, env, outage=proxy, outage_seconds=args.outage_seconds))
        # Until the dataset is complete (a run that stopped on the outage exits 1).
        for _ in range(5):
            if runs[-1]["exit"] in (0, 3):
                break
            runs.append(run_once(args.binary, pipeline, env))

        rows = []
        listing = s3.list_objects_v2(Bucket="soak", Prefix="out/")
        keys = [o["Key"] for o in listing.get("Contents", [])]
        while listing.get("IsTruncated"):
            listing = s3.list_objects_v2(Bucket="soak", Prefix="out/", ContinuationToken=listing["NextContinuationToken"])
            keys += [o["Key"] for o in listing.get("Contents", [])]
        parts = [k for k in keys if k.endswith(".parquet") and "/_" not in k and "/." not in k]
        for key in parts:
            table = pq.read_table(io.BytesIO(s3.get_object(Bucket="soak", Key=key)["Body"].read()))
            cols = ["uri", "segment_index", "caption", "error_kind", "warnings"]
            cols = [c for c in cols if c in table.column_names]
            rows.extend(table.select(cols).to_pylist())
    finally:
        moto.terminate()

    pairs = Counter((r["uri"], r["segment_index"]) for r in rows)
    by_uri = {}
    for r in rows:
        by_uri.setdefault(r["uri"].rsplit("/in/", 1)[-1], []).append(r)
    valid = [k for k, _, ok, _ in inputs if ok]
    report = {
        "inputs": {"generated": len(inputs), "valid": len(valid), "broken": len(inputs) - len(valid)},
        "rows": {
            "total": len(rows),
            "captions": sum(1 for r in rows if r.get("caption") is not None),
            "errors_by_kind": dict(Counter(r.get("error_kind") for r in rows if r.get("error_kind"))),
            "with_warnings": sum(1 for r in rows if r.get("warnings")),
        },
        "parts": len(parts),
        "duplicates": sum(n - 1 for n in pairs.values() if n > 1),
        "lost": sum(1 for k in valid if k.removeprefix("in/") not in by_uri),
        "failed_valid": sum(1 for k in valid if all(r.get("caption") is None for r in by_uri.get(k.removeprefix("in/"), [{}]))),
        "broken_without_row": sum(1 for k, _, ok, _ in inputs if not ok and k.removeprefix("in/") not in by_uri),
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report["duplicates"] == 0 and report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
