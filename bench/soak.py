"""Soak: a steady request rate against /mutate and /validate for minutes, watching errors and memory.

    python -m bench.soak --minutes 10 --rate 200      # the README's figure
    python -m bench.soak --minutes 0.2 --rate 50      # smoke run

The server is started here with the 10,000-NetworkPolicy state the throughput benchmark uses. Requests
alternate between the two webhooks at a fixed rate (an open loop: the schedule does not wait for slow
answers), and the server's RSS is sampled every few seconds. The result says how many requests failed and how
RSS moved between the first minute (after warm-up) and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import yaml

from bench.run import RESULTS, Server, _rss_mb, boutique_deployment, boutique_pod, write_state
from tests.conftest import free_port, review
from webhook import certs


async def drive(url: str, ca: Path, bodies: list[tuple[str, bytes]], rate: float, seconds: float,
                pid: int, samples: list[tuple[float, float]]) -> dict[str, int]:
    counts = {"sent": 0, "ok": 0, "failed": 0}
    ctx = ssl.create_default_context(cafile=str(ca))
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=10, limits=limits) as client:

        async def one(path: str, body: bytes) -> None:
            try:
                r = await client.post(path, content=body)
                ok = r.status_code == 200 and r.json()["response"]["allowed"] is True
            except httpx.HTTPError:
                ok = False
            counts["ok" if ok else "failed"] += 1

        start = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        next_sample = start
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate)
            while counts["sent"] < due:
                path, body = bodies[counts["sent"] % len(bodies)]
                task = asyncio.create_task(one(path, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                counts["sent"] += 1
            if time.monotonic() >= next_sample:
                samples.append((round(elapsed, 1), _rss_mb(pid)))
                next_sample += 5
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="meshguard-soak-"))
    cert_dir = work / "certs"
    certs.generate_serving(cert_dir, "meshguard", "meshguard", dev=True)
    state = work / "state"
    state.mkdir()
    write_state(state / "cluster.yaml", namespaces=1000, policies=10000)
    port, health = free_port(), free_port()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": port, "health_host": "127.0.0.1",
                                                 "health_port": health}, "tls": {"cert_dir": str(cert_dir)}}))
    server = Server("meshguard", [sys.executable, "-m", "webhook", "serve", "--dev", "--config", str(config),
                                  "--state", str(state)], port, health, work / "meshguard.log")
    bodies = [("/mutate", orjson.dumps(review(boutique_pod(), namespace="ns-0042"))),
              ("/validate", orjson.dumps(review(boutique_deployment(), namespace="ns-0042")))]
    samples: list[tuple[float, float]] = []
    try:
        server.wait(cert_dir / certs.CA_CERT)
        counts = asyncio.run(drive(f"https://127.0.0.1:{port}", cert_dir / certs.CA_CERT, bodies, args.rate,
                                   args.minutes * 60, server.process.pid, samples))
    finally:
        server.stop()
    warm = next((rss for t, rss in samples if t >= 60), samples[len(samples) // 2][1] if samples else 0.0)
    end = samples[-1][1] if samples else 0.0
    result = {"minutes": args.minutes, "rate": args.rate, **counts, "rss_mb_after_warmup": warm,
              "rss_mb_end": end, "rss_mb_max": max((r for _, r in samples), default=0.0), "samples": samples}
    print(f"sent {counts['sent']}, ok {counts['ok']}, failed {counts['failed']}; RSS after warm-up {warm:.1f} MB, "
          f"at the end {end:.1f} MB, max {result['rss_mb_max']:.1f} MB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
