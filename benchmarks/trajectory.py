"""Time and peak memory of building a Trajectory, against the bare cost of the same pictures.

The bare cost is what any per-layer picture must pay: one model forward (which also gives layer
``L``) and one lens decoding (final norm + unembedding) of every other layer ``0 … L-1``, with the
logits thrown away. The trajectory adds top-k, entropy, KL, cross-entropy and rank on top.

Both run in this one process after a short warm-up, interleaved repeat by repeat so that load
from other processes hits both alike. Peak memory is the growth of the resident set size over
what it was before each run: the kernel's high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` just before the run, so it sees every allocation torch makes (which
``tracemalloc`` does not) and not the peak of loading the model. Linux only.

On a machine whose cores are busy with other work, ``--threads 1`` gives steadier figures: with
more threads, every one of the many small tensor operations waits for its slowest thread.

Run: ``python benchmarks/trajectory.py [--model smollm2-135m] [--tokens 512] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from depthlens.text.data import load_chunks
from depthlens.model.hidden_states import capture
from depthlens.lenses import LogitLens
from depthlens.model.load import DEFAULT_MODEL, load_model
from depthlens.analysis.trajectory import Trajectory

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(run: Callable[[], object]) -> tuple[float, float, object]:
    """``(seconds, peak resident-set growth in MiB, result)`` of one call of ``run``."""
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    return seconds, (_status_kib("VmHWM") - before) / 1024, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="Trajectory chunk size (default: automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    lens = LogitLens(model)
    input_ids = load_chunks("shakespeare", tokenizer, args.tokens, 1)

    @torch.no_grad()
    def bare() -> None:
        states = capture(model, input_ids, parts=lens.parts)
        for layer in range(lens.num_layers):
            lens(states[layer], layer)

    def trajectory() -> Trajectory:
        return Trajectory.from_ids(model, lens, input_ids, tokenizer=tokenizer, k=args.k, chunk_tokens=args.chunk_tokens)

    Trajectory.from_ids(model, lens, input_ids[:, :16], k=args.k)
    results: dict[str, list[tuple[float, float, object]]] = {"bare": [], "trajectory": []}
    for _ in range(args.repeats):
        for name, run in (("bare", bare), ("trajectory", trajectory)):
            results[name].append(measure(run))

    vocab, rows = lens.parts.vocab_size, lens.num_layers + 1
    stored = results["trajectory"][-1][2].nbytes
    times = {name: [seconds for seconds, _, _ in runs] for name, runs in results.items()}
    print(f"{args.model}: {rows} rows x {args.tokens} tokens, vocab {vocab}, k={args.k}, "
          f"{torch.get_num_threads()} torch threads, {args.repeats} interleaved repeats")
    for name, runs in results.items():
        print(f"  {name:<10} median {statistics.median(times[name]):6.2f} s  (min {min(times[name]):.2f})  "
              f"peak RSS growth {max(peak for _, peak, _ in runs):7.1f} MiB")
    median = statistics.median(times["trajectory"]) / statistics.median(times["bare"])
    fastest = min(times["trajectory"]) / min(times["bare"])
    print(f"  time ratio trajectory / bare: {median:.2f}x of medians, {fastest:.2f}x of minima (target <= 1.3x)")
    print(f"  trajectory tensors: {stored / MIB:.2f} MiB; full log-probabilities would be "
          f"{rows * args.tokens * vocab * 4 / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
