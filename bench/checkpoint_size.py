"""Checkpoint size per format, and peak memory of a quantized load vs a plain float32 load.

    python bench/checkpoint_size.py [--model PATH]   (default: the bundled SmolLM2-135M)

Each load runs in a fresh process so its peak memory is its own. Writes
``bench/results/checkpoint_size.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FORMATS = {
    "int8": dict(bits=8, group_size=-1),
    "int4 g128": dict(bits=4, group_size=128),
    "int4 g128 + int8 embeddings": dict(bits=4, group_size=128, embeddings="int8"),
    "int4 g128 + int8-g128 embeddings": dict(bits=4, group_size=128, embeddings="int8-g128"),
    "int4 g32": dict(bits=4, group_size=32),
    "int3 g128": dict(bits=3, group_size=128),
    "int2 g64": dict(bits=2, group_size=64),
}

LOAD = """
import json, sys, time, torch
sys.path.insert(0, {bench!r})
from _common import PeakMemory
import hfquant
from hfquant.stats import checkpoint_bytes, storage_stats
from transformers import AutoModelForCausalLM
model_path, fmt, save_to = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = hfquant.HfQuantConfig(**fmt) if fmt else None
with PeakMemory() as peak:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config)
    seconds = time.perf_counter() - start
out = dict(load_seconds=seconds, peak_rss_mib=peak.peak_rss_mib(), peak_anon_mib=peak.peak_anon_mib,
           params=sum(p.numel() for p in model.parameters()))
if config is not None:
    model.save_pretrained(save_to)
    out.update(storage=storage_stats(model).to_dict(), checkpoint_bytes=checkpoint_bytes(save_to))
else:
    out.update(checkpoint_bytes=checkpoint_bytes(model_path))
print("RESULT" + json.dumps(out))
"""


def run_load(model: str, fmt: dict, save_to: str) -> dict:
    script = LOAD.format(bench=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, model, json.dumps(fmt), save_to],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import environment, write_results

    from hfquant.bundled import bundled_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="float checkpoint folder (default: bundled SmolLM2-135M)")
    args = parser.parse_args()
    model = args.model or str(bundled_model_path())
    rows = {"fp32": run_load(model, {}, "")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt in FORMATS.items():
            rows[name] = run_load(model, fmt, str(Path(tmp) / name.replace(" ", "_")))
    base = rows["fp32"]
    lines = ["| format | bits/weight stored (quantized layers) | checkpoint MB | vs fp32 | load peak RSS MiB | "
             "load peak anon MiB | anon vs fp32 | load s |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        bpw = row["storage"]["bits_per_weight"] if "storage" in row else 32.0
        lines.append(f"| {name} | {bpw:.3f} | {row['checkpoint_bytes'] / 1e6:.1f} | "
                     f"{row['checkpoint_bytes'] / base['checkpoint_bytes']:.3f} | {row['peak_rss_mib']:.0f} | "
                     f"{row['peak_anon_mib']:.0f} | {row['peak_anon_mib'] / base['peak_anon_mib']:.2f} | "
                     f"{row['load_seconds']:.1f} |")
    table = f"Model: `{model}`\n\n" + "\n".join(lines)
    write_results("checkpoint_size", {"model": model, "env": environment(), "rows": rows}, table)


if __name__ == "__main__":
    main()
