"""Where a decoded token's time goes: torch.profiler over 8 single-token steps of the bundled model, 1 thread.

    PYTHONPATH=$PWD python bench/decode_profile.py int4 int8 fp32

Prints, per format, the median and fastest of 16 unprofiled steps and the top operators by self
CPU time per step (float32 activations, batch 1, KV cache after a 16-token prompt). The numbers in
``bench/results/decode_profile.md`` come from it.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import hfquant
from hfquant.bundled import bundled_model_path

CONFIGS = {"fp32": None, "int8": {"bits": 8, "group_size": -1}, "int4": {"bits": 4, "group_size": 128}}
PROMPT_TOKENS, WARMUP_STEPS, PROFILED_STEPS, TIMED_STEPS, TOP = 16, 4, 8, 16, 10


def profile_decode(name: str) -> None:
    qconfig = CONFIGS[name]
    model = AutoModelForCausalLM.from_pretrained(
        str(bundled_model_path()), dtype=torch.float32,
        quantization_config=hfquant.HfQuantConfig(**qconfig) if qconfig else None)
    with torch.no_grad():
        out = model(torch.randint(1000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)), use_cache=True)
        state = {"cache": out.cache, "token": out.logits[:, -1:].argmax(-1)}

        def step() -> None:
            out = model(state["token"], cache=state["cache"], use_cache=True)
            state["cache"], state["token"] = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(WARMUP_STEPS):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                step()
        times = []
        for _ in range(TIMED_STEPS):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"== {name}: step median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms; "
          f"profiled op self time {total / PROFILED_STEPS / 1e3:.1f} ms/step")
    for e in events[:TOP]:
        print(f"   {e.key:50s} {e.self_cpu_time_total / PROFILED_STEPS / 1e3:7.2f} ms/step "
              f"{100 * e.self_cpu_time_total / total:5.1f}%  {e.count // PROFILED_STEPS} calls/step")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for fmt in sys.argv[1:] or list(CONFIGS):
        profile_decode(fmt)
