"""Instructions per admission request, counted by valgrind: meshguard's cost in a unit that does not drift.

    python -m bench.instructions            # about 3 minutes
    python -m bench.instructions --quick    # a few requests per case: keeps the harness working in CI

Request rates on a shared machine move by tens of percent within minutes (see ``bench.run``), which hides any
change smaller than that. The number of instructions the server executes per request does not depend on how busy
the machine is: two runs of this agree to a fraction of a percent, so a change of a few percent is visible.

Each server (the no-op floor and meshguard, started as ``bench.run`` starts them) runs under callgrind with
instrumentation off while it starts. Once it answers, instrumentation is switched on, it is warmed up, the
counters are zeroed, wrk sends requests over one connection for ``--seconds``, and the counters are dumped and
divided by the number of requests wrk completed. One connection, so that every request is alone in its turn of
the event loop; under concurrency requests share turns and each costs a little less.

What is counted: user-space instructions of the server process, all of them (Python, uvloop, OpenSSL, orjson).
What is not: the kernel's work for the sockets, and wrk. Instructions are not time (a cache miss costs more than
an add, and valgrind counts a ``rep movsb`` copy byte by byte), so the rates in ``bench.run`` stay the measure of
speed; this is the measure of a change, and its floor/meshguard ratio tracks ``bench.run``'s throughput ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.run import RESULTS, Server, Setup, check_answer, run_wrk

CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no")


def _control(server: Server, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(server.process.pid)], check=True, capture_output=True)


def _dumped_instructions(out: Path) -> int:
    """The instruction total of the newest dump callgrind wrote next to ``out`` (``out.1``, ``out.2``...)."""
    dumps = sorted(out.parent.glob(f"{out.name}.*"), key=lambda p: int(p.suffix[1:]))
    match = re.search(r"^totals:\s+(\d+)", dumps[-1].read_text(), re.M)
    if not match:
        raise RuntimeError(f"no totals in {dumps[-1]}")
    return int(match.group(1))


def count(server: Server, out: Path, setup: Setup, path: str, body: str, seconds: float) -> dict[str, float]:
    """Instructions per request for ``path`` on a server running under callgrind: instrumentation on, a second of
    uncounted warm-up, then the counted run."""
    url = f"https://127.0.0.1:{server.port}{path}"
    _control(server, "--instr=on")
    # Uncounted: with instrumentation switched on callgrind translates every code path anew, so the first requests
    # are slow enough to time out on a busy machine.
    run_wrk(url, setup.work / body, setup.lua, 1, 1)
    # Under valgrind on a loaded machine a short run can complete no request at all: run longer until one does.
    for attempt in range(4):
        _control(server, "--zero")
        result, _ = run_wrk(url, setup.work / body, setup.lua, 1, seconds * 2**attempt)
        _control(server, "--dump")
        requests = result["requests"]
        if requests:
            break
    if requests == 0 or result["errors"] or result["non2xx"]:
        raise RuntimeError(f"{url}: {result}")
    return {"requests": requests, "instructions_per_request": round(_dumped_instructions(out) / requests)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per case (harness smoke test)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each counted wrk run")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/instructions-<timestamp>.json)")
    args = parser.parse_args(argv)
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (Debian package valgrind)", file=sys.stderr)
        return 2
    seconds = 2.0 if args.quick else args.seconds
    # Ten policies per namespace as in bench.run's full store: /validate's cost depends on the policies in the
    # workload's namespace, not on the total, and a smaller store starts faster under valgrind.
    setup = Setup.create(namespaces=100, policies=1000)
    results: dict[str, dict[str, float]] = {}
    # Per server: (case, path, request body, the answer meshguard must give; the floor's is not checked).
    plan = {"noop": [("noop", "/", "mutate.json", "")],
            "meshguard": [("mutate", "/mutate", "mutate.json", "patched"),
                          ("validate", "/validate", "validate.json", "allowed")]}
    for target, cases in plan.items():
        out = setup.work / f"callgrind.{target}.out"
        wrapper = (*CALLGRIND, f"--callgrind-out-file={out}")
        server = setup.noop(wrapper) if target == "noop" else setup.meshguard(wrapper)
        try:
            server.wait(setup.ca, timeout=600)
            for case, path, body, expect in cases:
                url = f"https://127.0.0.1:{server.port}{path}"
                if expect:
                    check_answer(url, setup.work / body, setup.ca, expect)
                results[case] = count(server, out, setup, path, body, seconds)
                print(f"{case:9} {results[case]['instructions_per_request']:>12,} instructions/request"
                      f"  ({results[case]['requests']} requests)", flush=True)
        finally:
            server.stop()
    floor = results["noop"]["instructions_per_request"]
    summary = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds_per_case": seconds,
        "cases": results,
        **{f"{case}_to_noop_ratio": round(floor / results[case]["instructions_per_request"], 3)
           for case in ("mutate", "validate")},
    }
    print(f"noop/mutate instruction ratio {summary['mutate_to_noop_ratio']}, "
          f"noop/validate {summary['validate_to_noop_ratio']}")
    out = args.out or RESULTS / f"instructions-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
