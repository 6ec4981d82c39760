"""Measure the ingest's CPU per camera: N cameras of 720p H.264 at 25 fps, published at 5 fps.

    deploy/venv python tests/measure_ingest.py --cameras 1,8 --seconds 20

Each camera is ffmpeg serving a 720p H.264 MPEG-TS over HTTP (copied, not re-encoded, so the servers
cost little); only the ingest process's own CPU time (/proc/PID/stat) is counted. Not a test: it
prints figures for the README's sizing. Short, since the machine it runs on may be shared.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
FFMPEG = ["ffmpeg", "-v", "error"]
ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-b:v", "2M", "-g", "50"]  # a typical 720p camera
SERVE = ["-c", "copy", "-f", "mpegts", "-listen", "1"]
CLIP = ROOT.parent / "shared" / "assets" / "videos" / "carving_ice_android.mp4"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cameras", default="1,8")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    src = (
        ["-stream_loop", "2", "-i", str(CLIP)] if CLIP.is_file() else ["-f", "lavfi", "-i", "testsrc=rate=25"]
    )
    ts = tmp / "720p.ts"
    subprocess.run(
        [*FFMPEG, "-y", *src, "-t", "20", "-an", "-vf", "scale=1280:720,fps=25", *ENCODE, str(ts)],
        check=True,
    )
    client = redis.Redis.from_url(args.redis_url)
    for n in [int(x) for x in args.cameras.split(",")]:
        ports = [18600 + i for i in range(n)]
        servers = [
            subprocess.Popen(
                [*FFMPEG, "-re", "-stream_loop", "-1", "-i", str(ts), *SERVE, f"http://127.0.0.1:{p}/cam.ts"]
            )
            for p in ports
        ]
        config = tmp / "cameras.yaml"
        cams = [{"id": f"m{i}", "url": f"http://127.0.0.1:{p}/cam.ts"} for i, p in enumerate(ports)]
        config.write_text(yaml.safe_dump({"cameras": cams}))
        env = {**os.environ, "REDIS_URL": args.redis_url, "MOVINET_FRAMES_KEY": "measure:frames:{{{camera}}}"}
        env["MOVINET_CONTROL_STREAM"] = "measure:cameras"
        ingest = subprocess.Popen(
            [sys.executable, "-m", "worker", "ingest", "--config", str(config), "--metrics-port", "0"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(6)  # connect and warm up
            keys = [f"measure:frames:{{m{i}}}" for i in range(n)]
            frames0 = sum(client.xlen(k) for k in keys)
            cpu0, t0 = cpu_seconds(ingest.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu1, t1 = cpu_seconds(ingest.pid), time.monotonic()
            frames = sum(client.xlen(k) for k in keys) - frames0
            cores = (cpu1 - cpu0) / (t1 - t0)
            fps = frames / (t1 - t0) / n
            # Behind real time (a loaded machine), each camera decodes fps/5 of its frames: scale up.
            full = cores / n * 5 / max(fps, 0.01)
            rss = next(
                x
                for x in Path(f"/proc/{ingest.pid}/status").read_text().splitlines()
                if x.startswith("VmRSS")
            )
            print(
                f"{n} cameras: {cores:.3f} cores used, {fps:.2f} frames/s per camera published; "
                f"{full * 100:.1f}% of a core per camera at 5 fps; {rss.split(':')[1].strip()} resident"
            )
        finally:
            ingest.send_signal(signal.SIGTERM)
            ingest.wait(20)
            for s in servers:
                s.kill()
                s.wait()
            for key in client.scan_iter(match="measure:*"):
                client.delete(key)


if __name__ == "__main__":
    main()
