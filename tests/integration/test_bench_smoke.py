"""Keep the benchmark harnesses working: quick runs that must finish and write a result of the right shape.

No rate, latency or count is asserted: load on the machine moves them, and benchmarks are not tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.bench


def _quick_run(module: str, out: Path, timeout: float) -> dict:
    """Run ``python -m <module> --quick --out <out>``, which must succeed, and return the result it wrote."""
    run = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)")
def test_bench_quick_run_produces_a_result(tmp_path: Path) -> None:
    result = _quick_run("bench.run", tmp_path / "result.json", timeout=300)
    cases = {(c["name"], c["connections"]): c for c in result["cases"]}
    assert set(cases) == {(n, c) for n in ("noop", "mutate", "validate") for c in (1, 16)}
    for case in cases.values():
        assert isinstance(case["errors"], int) and isinstance(case["requests_per_s"], int | float), case
    assert isinstance(result["mutate_to_noop_ratio"], int | float) and result["meshguard_rss_mb"] > 0
    assert set(result["medians"]) == {f"{n} c{c}" for n in ("noop", "mutate", "validate") for c in (1, 16)}


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("valgrind") is None,
                    reason="wrk or valgrind is not installed (.ci/run installs them)")
def test_instruction_count_quick_run_counts_the_server(tmp_path: Path) -> None:
    result = _quick_run("bench.instructions", tmp_path / "instructions.json", timeout=900)
    per_request = {case: c["instructions_per_request"] for case, c in result["cases"].items()}
    assert set(per_request) == {"noop", "mutate", "validate"}
    # Instruction counts do not move with load, so this bound is safe: counted in the right process and only
    # while requests ran (meshguard does all the floor does and more; a request is not the whole start-up).
    assert 20_000 < per_request["noop"] < per_request["mutate"] < 20_000_000, per_request
    assert per_request["noop"] < per_request["validate"] < 20_000_000, per_request
    assert 0 < result["mutate_to_noop_ratio"] < 1


def test_bench_ratio_pairs_cases_of_the_same_round() -> None:
    """On a drifting machine only a floor and a meshguard figure measured side by side make a ratio."""
    from bench.run import Case, medians, ratio

    def case(round_: int, name: str, rate: float) -> Case:
        return Case(round_, name, "server", "/", 16, rate, 1.0, 1.0, 1.0, 1.0, 0, 1.0, 1.0)

    rates = [(100, 50), (200, 120), (150, 60)]  # per round: floor, mutate -> ratios 0.5, 0.6, 0.4
    cases = [c for r, (floor, mutate) in enumerate(rates) for c in (case(r, "noop", floor), case(r, "mutate", mutate))]
    assert ratio(cases, "mutate") == 0.5  # the ratio of the medians would say 60 / 150 = 0.4
    assert medians(cases)["noop c16"]["requests_per_s"] == 150


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/run installs it)")
def test_soak_smoke_run_reports_its_figures() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "0.1", "--rate", "100"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    # Exit 1 means "some requests failed", which load can cause; anything else, or no summary, is a broken harness.
    assert run.returncode in (0, 1), run.stdout + run.stderr
    assert re.search(r"^sent \d+ at [\d.]+ req/s \(asked 100\), ok \d+, failed \d+; p50 ", run.stdout, re.M), run.stdout
    assert re.search(r"^wrote .*soak-.*\.json$", run.stdout, re.M), run.stdout


def test_e2e_benchmark_pins_every_thread_of_a_process() -> None:
    """``--webhook-cpu`` relies on it: a server's threads all move, not just its main thread."""
    from bench.e2e_throughput import _pin

    script = "import threading, time\nfor _ in range(3): threading.Thread(target=time.sleep, args=(30,)).start()\n" \
             "print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        _pin(child.pid, {0})
        tasks = list(Path(f"/proc/{child.pid}/task").iterdir())
        assert len(tasks) == 4
        for task in tasks:
            allowed = re.search(r"Cpus_allowed_list:\s*(\S+)", (task / "status").read_text())
            assert allowed and allowed.group(1) == "0", task
    finally:
        child.kill()
        child.wait()


def test_xds_convergence_quick_run_produces_a_result(tmp_path: Path) -> None:
    result = _quick_run("bench.xds_convergence", tmp_path / "result.json", timeout=300)
    assert result["proxies"] == 20 and result["services"] == 20
    for key in ("initial_sync_s", "rss_mib", "rss_peak_mib", "cpu_s_per_change"):
        assert isinstance(result[key], int | float) and result[key] >= 0, (key, result)
    # Every type was pushed and acknowledged, so the server's convergence histogram has all three.
    assert {f"{kind}_p99_bucket_s" for kind in ("cds", "eds", "lds")} <= set(result), result


def test_pcr_signing_quick_run_signs_every_request(tmp_path: Path) -> None:
    from tests.e2e.cluster import BinariesMissing, binaries

    try:
        binaries()
    except BinariesMissing as missing:
        pytest.skip(str(missing))
    result = _quick_run("bench.pcr_signing", tmp_path / "result.json", timeout=300)
    assert result["requests"] == 20 and set(result["phases"]) == {"backlog", "live"}
    assert all(phase["seconds"] > 0 for phase in result["phases"].values()), result


def test_dataplane_quick_run_measures_both_paths(tmp_path: Path) -> None:
    from tests.dataplane.conftest import netns_forbidden

    if shutil.which("wrk") is None or netns_forbidden():
        pytest.skip("needs wrk and network namespaces (root; .ci/run installs wrk)")
    result = _quick_run("bench.dataplane", tmp_path / "result.json", timeout=300)
    assert set(result["medians"]) == {"plaintext", "mtls"} and result["throughput_ratio"] > 0, result
    assert len(result["app_over_proxy_cpu_per_round"]) == 1 and 0 < result["one_core_ratio"] <= 1, result
