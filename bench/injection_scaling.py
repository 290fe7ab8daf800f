"""How injection cost grows with pod size: 1 and 50 containers, and 2,000 env vars. A benchmark, not a test.

For each pod shape it times, in process, (a) ``plan``: decide + build the patch, and (b) the whole admission
path the server runs per request minus HTTP/TLS: decode the AdmissionReview, run the real ``/mutate`` handler,
encode the answer. Then it doubles the env var count a few times: with an explicit patch the planning cost must
stay flat (env vars are never looked at) and the end-to-end cost must grow linearly (JSON decode/encode only).

    .venv/bin/python -m bench.injection_scaling [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from tests.conftest import review
from webhook.config import Settings
from webhook.handlers import chain
from webhook.injection.handler import mutate_handler
from webhook.injection.patch import plan
from webhook.metrics import Metrics
from webhook.server import AdmissionApp, Webhook
from webhook.workloads import as_workload


def make_pod(containers: int, env_vars: int) -> dict[str, Any]:
    """``containers`` app containers sharing ``env_vars`` env vars between them (all in the first when 1)."""
    per = [env_vars // containers + (1 if i < env_vars % containers else 0) for i in range(containers)]
    env_index = iter(range(env_vars))
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "bench-", "labels": {"app": "bench"}},
        "spec": {"containers": [
            {"name": f"c{i}", "image": "registry.example/app:1", "ports": [{"containerPort": 8000 + i}],
             "env": [{"name": f"VAR_{next(env_index)}", "value": "some-configuration-value"} for _ in range(n)]}
            for i, n in enumerate(per)
        ]},
    }


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(median, p99) in microseconds over ``repeat`` runs, after a warm-up."""
    for _ in range(max(3, repeat // 20)):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure(app: AdmissionApp, settings: Settings, metrics: Metrics, containers: int, env_vars: int,
            repeat: int) -> dict[str, Any]:
    pod = make_pod(containers, env_vars)
    workload = as_workload(pod, "bench")
    assert workload is not None
    body = orjson.dumps(review(pod, namespace="bench"))
    hook = Webhook(chain(mutate_handler(settings, metrics), settings.limits), allow_on_error=False)
    loop = asyncio.new_event_loop()
    status, answer = loop.run_until_complete(app.admit("mutate", hook, body))
    assert status == 200 and b'"patch"' in answer, answer[:200]
    plan_times = timed(lambda: plan(workload, settings.injection, settings.namespace), repeat)
    admit_times = timed(lambda: loop.run_until_complete(app.admit("mutate", hook, body)), repeat)
    loop.close()
    return {"containers": containers, "env": env_vars, "kib": len(body) / 1024,
            "ops": len(plan(workload, settings.injection, settings.namespace).ops),
            "plan": plan_times, "admit": admit_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=500, help="timed runs per shape (default 500)")
    args = parser.parse_args()
    settings = Settings()
    metrics = Metrics()
    app = AdmissionApp({}, metrics, settings.server.max_body_bytes)
    shapes = [(1, 0), (50, 0), (1, 2000), (50, 2000), (1, 500), (1, 1000), (1, 4000), (1, 8000)]
    print("| containers | env vars | review KiB | patch ops | plan median / p99 (µs) | admission median / p99 (µs) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for containers, env_vars in shapes:
        row = measure(app, settings, metrics, containers, env_vars, args.repeat)
        print(f"| {row['containers']} | {row['env']} | {row['kib']:.1f} | {row['ops']} | "
              f"{row['plan'][0]:.1f} / {row['plan'][1]:.1f} | {row['admit'][0]:.0f} / {row['admit'][1]:.0f} |")


if __name__ == "__main__":
    main()
