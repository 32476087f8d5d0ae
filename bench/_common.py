"""Shared bits of the benchmarks: where results go, peak-memory sampling, the model to use."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


class PeakMemory:
    """Peak resident (``ru_maxrss``) and peak anonymous memory (RssAnon, sampled) of this process, in MiB.

    File-backed pages of a memory-mapped checkpoint count in RSS but not in RssAnon, so the two
    together tell how much of the peak is the model held in memory versus the mapped file.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_anon_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_anon_kib = max(self.peak_anon_kib, _rss_anon_kib())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon_kib = max(self.peak_anon_kib, _rss_anon_kib())

    @property
    def peak_anon_mib(self) -> float:
        return self.peak_anon_kib / 1024

    @staticmethod
    def peak_rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (0 where it is missing)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_anon_kib() -> int:
    return _status_kib("RssAnon")


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return _status_kib("VmRSS") / 1024


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_row_process(script: str, argv: list[str], row: str, key: str = "row") -> dict[str, Any]:
    """Run ``script argv --row ROW`` in a fresh process; its ``ROW{json}`` line, or ``{key: row, "error": ...}``."""
    proc = subprocess.run([sys.executable, script, *argv, "--row", row], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{row}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {key: row, "error": proc.stderr[-2000:]}
    print(f"{row}: done", file=sys.stderr)
    return json.loads(proc.stdout.split("ROW", 1)[1])


def write_results(name: str, payload: dict[str, Any], table: str) -> None:
    """``bench/results/<name>.json`` and ``<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages of this machine now (``os.getloadavg``); other work skews timings."""
    return [round(value, 2) for value in os.getloadavg()]


def interleaved_prefill_seconds(models: dict[str, Any], prompt: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of a no-cache forward pass over ``prompt`` per model, after one warm-up each, the models
    taken round-robin ``repeats`` times so a busy machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(prompt, use_cache=False)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(prompt, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return times


def run_rows_persisted(script: str, argv: list[str], rows: list[str], name: str) -> tuple[list[dict], list[list[float]]]:
    """Each row by :func:`run_row_process`, with the load average before it; finished rows are kept in
    ``bench/results/<name>.partial.json`` as they come, so an interrupted run loses at most one row."""
    results, loads = [], []
    for row in rows:
        loads.append(load_average())
        results.append(run_row_process(script, argv, row))
        (RESULTS / f"{name}.partial.json").write_text(json.dumps({"argv": argv, "rows": results, "loads": loads}))
    return results, loads
