"""Soak: a steady request rate against /mutate and /validate for minutes, watching errors and memory.

    python -m bench.soak --minutes 10 --rate 200      # the README's figure
    python -m bench.soak --minutes 0.1 --rate 50      # smoke run

The server is started here with the 10,000-NetworkPolicy state the throughput benchmark uses. wrk holds the
rate: each of its connections sends a request, waits for the answer, then waits out the rest of its slot
(``rate / connections`` requests per second per connection), alternating between the two webhooks. A Python
client cannot be the driver here: httpx spends a few milliseconds of CPU per request, falls behind at 200
requests/s and then measures its own backlog instead of the server. Every answer is checked (HTTP 200 and
``"allowed":true``), the achieved rate is reported next to the asked one, and the server's RSS is sampled every
5 seconds. The result says how many requests failed and how RSS moved between the first minute (after
warm-up) and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

from bench.run import RESULTS, Server, _rss_mb, boutique_deployment, boutique_pod, write_state
from tests.conftest import free_port, review
from webhook import certs

CONNECTIONS = 8

# Alternates the two webhooks, paces each connection, and counts answers that are not HTTP 200 with
# "allowed":true. Per-thread counters are read back in done() through the thread objects setup() kept.
LUA = """
local bodies = {}
for i, name in ipairs({"mutate", "validate"}) do
  local f = assert(io.open(os.getenv("SOAK_DIR") .. "/" .. name .. ".json", "rb"))
  bodies[i] = wrk.format("POST", "/" .. name, {["Content-Type"] = "application/json"}, f:read("*a"))
  f:close()
end
local slot_ms = tonumber(os.getenv("SOAK_SLOT_MS"))
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; ok = 0; failed = 0 end
function request()
  sent = sent + 1
  return bodies[sent % 2 + 1]
end
function delay() return slot_ms end
function response(status, headers, body)
  if status == 200 and string.find(body, '"allowed":true', 1, true) then ok = ok + 1 else failed = failed + 1 end
end
function done(summary, latency, requests)
  local s, o, f = 0, 0, 0
  for _, t in ipairs(threads) do s = s + t:get("sent"); o = o + t:get("ok"); f = f + t:get("failed") end
  local e = summary.errors
  io.write(string.format('RESULT {"sent": %d, "ok": %d, "failed": %d, "socket_errors": %d, ' ..
    '"duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n', s, o, f,
    e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def soak(url: str, work: Path, rate: float, seconds: float, pid: int,
         samples: list[tuple[float, float]]) -> dict[str, float]:
    """Run wrk for ``seconds`` at ``rate`` requests/s, sampling ``pid``'s RSS every 5 s; wrk's figures."""
    lua = work / "soak.lua"
    lua.write_text(LUA)
    # wrk's delay() is the pause after an answer; the answer itself takes well under a millisecond.
    env = {**os.environ, "SOAK_DIR": str(work), "SOAK_SLOT_MS": str(round(CONNECTIONS * 1000 / rate))}
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(lua), url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    start = time.monotonic()
    while proc.poll() is None:
        samples.append((round(time.monotonic() - start, 1), _rss_mb(pid)))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    out = proc.stdout.read() if proc.stdout else ""
    match = re.search(r"^RESULT (.*)$", out, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed:\n{out}")
    result: dict[str, float] = json.loads(match.group(1))
    return result


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
    (work / "mutate.json").write_bytes(orjson.dumps(review(boutique_pod(), namespace="ns-0042")))
    (work / "validate.json").write_bytes(orjson.dumps(review(boutique_deployment(), namespace="ns-0042")))
    port, health = free_port(), free_port()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": port, "health_host": "127.0.0.1",
                                                 "health_port": health}, "tls": {"cert_dir": str(cert_dir)}}))
    server = Server("meshguard", [sys.executable, "-m", "webhook", "serve", "--dev", "--config", str(config),
                                  "--state", str(state)], port, health, work / "meshguard.log")
    samples: list[tuple[float, float]] = []
    try:
        server.wait(cert_dir / certs.CA_CERT)
        figures = soak(f"https://127.0.0.1:{port}", work, args.rate, args.minutes * 60, server.process.pid, samples)
    finally:
        server.stop()
    achieved = figures["sent"] / (figures["duration_us"] / 1e6)
    failed = int(figures["failed"] + figures["socket_errors"])
    warm = next((rss for t, rss in samples if t >= 60), samples[len(samples) // 2][1] if samples else 0.0)
    end = samples[-1][1] if samples else 0.0
    result = {"minutes": args.minutes, "rate_asked": args.rate, "rate_achieved": round(achieved, 1),
              "sent": figures["sent"], "ok": figures["ok"], "failed": failed,
              "p50_ms": figures["p50_us"] / 1000, "p99_ms": figures["p99_us"] / 1000,
              "max_ms": figures["max_us"] / 1000, "rss_mb_after_warmup": warm, "rss_mb_end": end,
              "rss_mb_max": max((r for _, r in samples), default=0.0), "samples": samples}
    print(f"sent {figures['sent']} at {achieved:.1f} req/s (asked {args.rate:g}), ok {figures['ok']}, failed {failed}; "
          f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms; "
          f"RSS after warm-up {warm:.1f} MB, at the end {end:.1f} MB, max {result['rss_mb_max']:.1f} MB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
