"""Measure the flight-delays job end to end against a plain Python loop.

Run ``python -m bench.flights`` (all 336,776 flights, three runs) or add
``--quick`` (one run). Each run starts the demo's cluster (a coordinator and
two workers as subprocesses on 127.0.0.1, a checkpoint every second),
submits ``examples/flight_delays.yaml``, waits for the job to finish and
verifies the committed output. Its rate is the flights divided by the time
from submission to the job's end, as the coordinator recorded both. Right
after it, in the same process, the limit runs: a plain single-process loop
over the same CSV that computes the same rows
(``jobledger_examples.flights.daily_delays``).

The last line of the output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from coordinator.demo import DemoOptions, run_demo
from jobledger_examples import flights

QUICK_RUNS = 1
FULL_RUNS = 3


def run_cluster(data_dir: Path, rows: int | None) -> dict[str, Any]:
    """Run the job once on a fresh cluster; return its figures."""
    options = DemoOptions(data_dir=data_dir, rows=rows, progress=False)
    started = time.monotonic()
    result = asyncio.run(run_demo(options))
    wall_s = time.monotonic() - started
    if not result.verified:
        raise SystemExit(f"the output of the run in {data_dir} is wrong")
    return {
        "records": result.records,
        "elapsed_s": result.elapsed_s,
        "records_per_s": result.records / result.elapsed_s,
        "checkpoints_completed": result.checkpoints_completed,
        "wall_s": wall_s,
        # CPU time of the busiest worker, its start included: the job's
        # duration on an otherwise idle machine cannot be much shorter.
        "busiest_worker_cpu_s": max(
            (v for k, v in result.cpu_seconds.items() if k.startswith("worker")),
            default=0.0,
        ),
    }


def run_plain_loop(path: Path) -> dict[str, Any]:
    """Compute the same rows in one plain loop over the CSV; return figures."""
    started = time.perf_counter()
    rows = flights.daily_delays(path)
    elapsed = time.perf_counter() - started
    with path.open(encoding="utf-8") as file:
        records = sum(1 for _ in file) - 1
    return {
        "records": records,
        "output_rows": len(rows),
        "elapsed_s": elapsed,
        "records_per_s": records / elapsed,
    }


def measure(folder: Path, runs: int, rows: int | None) -> dict[str, Any]:
    """Alternate cluster runs and plain loops; return the medians."""
    cluster_rates, plain_rates, cluster_runs = [], [], []
    load_before = os.getloadavg()
    for number in range(runs):
        data_dir = folder / f"run-{number + 1}"
        cluster = run_cluster(data_dir, rows)
        plain = run_plain_loop(data_dir / "flights.csv")
        cluster_runs.append(cluster)
        cluster_rates.append(cluster["records_per_s"])
        plain_rates.append(plain["records_per_s"])
        print(
            f"run {number + 1}: cluster {cluster['records_per_s']:,.0f} flights/s "
            f"({cluster['elapsed_s']:.2f} s, {cluster['checkpoints_completed']} "
            f"checkpoints, busiest worker {cluster['busiest_worker_cpu_s']:.2f} "
            f"CPU s, {cluster['wall_s']:.1f} s with start and stop); "
            f"plain loop {plain['records_per_s']:,.0f} flights/s",
            flush=True,
        )
    cluster_rate = statistics.median(cluster_rates)
    plain_rate = statistics.median(plain_rates)
    return {
        "records": cluster_runs[0]["records"],
        "runs": runs,
        "cluster_records_per_s": round(cluster_rate),
        "cluster_runs_records_per_s": [round(rate) for rate in cluster_rates],
        "cluster_elapsed_s": [round(run["elapsed_s"], 3) for run in cluster_runs],
        "cluster_checkpoints": [run["checkpoints_completed"] for run in cluster_runs],
        "busiest_worker_cpu_s": [
            round(run["busiest_worker_cpu_s"], 2) for run in cluster_runs
        ],
        "cluster_wall_s": [round(run["wall_s"], 1) for run in cluster_runs],
        "plain_loop_records_per_s": round(plain_rate),
        "plain_loop_runs_records_per_s": [round(rate) for rate in plain_rates],
        "ratio_cluster_to_plain_loop": round(cluster_rate / plain_rate, 3),
        "target_records_per_s": 100_000,
        "load_average_before": [round(load, 2) for load in load_before],
        "load_average_after": [round(load, 2) for load in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flights",
        description="The flight-delays job end to end against a plain loop.",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_RUNS} run instead of {FULL_RUNS}"
    )
    parser.add_argument(
        "--rows", type=int, help="use the first N flights only (default: all)"
    )
    parser.add_argument(
        "--dir", type=Path, help="folder for the runs' data (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    runs = QUICK_RUNS if args.quick else FULL_RUNS
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-flights-") as folder:
        figures = measure(Path(folder), runs, args.rows)
    figures = {
        "benchmark": "flights",
        "quick": args.quick,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        **figures,
    }
    print(
        f"median: cluster {figures['cluster_records_per_s']:,} flights/s, plain "
        f"loop {figures['plain_loop_records_per_s']:,} flights/s, ratio "
        f"{figures['ratio_cluster_to_plain_loop']}"
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
