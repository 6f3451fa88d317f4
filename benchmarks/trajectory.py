"""Time and peak memory of trajectories and evaluation, against the bare cost of the same work.

- **Trajectory** (logit lens, ``--tokens`` tokens): the bare cost is what any per-layer picture
  must pay, one model forward (which also gives layer ``L``) and one lens decoding (final norm +
  unembedding) of every other layer ``0 … L-1``, with the logits thrown away. The trajectory adds
  top-k, entropy, KL, cross-entropy and rank on top.
- **Evaluation** (logit and tuned lens, ``--eval-chunks`` chunks of ``--eval-chunk-len`` tokens,
  with bootstrap intervals): the bare cost is the forward of every batch of 4 chunks and one
  decoding per layer ``0 … L`` and lens. ``evaluate`` adds KL, cross-entropy, entropy, top-1
  agreement and the per-group marginal distributions, then the bootstrap.

Both run in this one process after a short warm-up, interleaved repeat by repeat so that load
from other processes hits both alike. Peak memory is the growth of the resident set size over
what it was before each run: the kernel's high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs`` just before the run, so it sees every allocation torch makes (which
``tracemalloc`` does not) and not the peak of loading the model. Linux only.

On a machine whose cores are busy with other work, ``--threads 1`` gives steadier figures: with
more threads, every one of the many small tensor operations waits for its slowest thread.

Both take ``--dtype`` (default ``auto``: bfloat16 products where this CPU runs them fast, as the
command line does), and the bare runs compute in the same precision (the forward pass as the family's
rule says, the decoding in that dtype), so each ratio is what the statistics add on this CPU's own
fast path. ``ATEN_CPU_CAPABILITY=avx2`` (or ``default``) caps PyTorch's kernels to check another
kind of CPU on this one.

Run: ``python benchmarks/trajectory.py [--models smollm2-135m gemma3-270m] [--tokens 512] [--repeats 3] [--dtype auto]``;
writes the results into ``benchmarks/results/trajectory.json`` under ``"<model> · <CPU maker> · <kernel
capability> · <dtype>"``, with the CPU (other entries stay).

The statistics run twice in each repeat, by eager passes (``DEPTHLENS_FUSED=0``) and by the compiled
kernel (``=1``, :mod:`depthlens.stats.fused`); ``compile_s`` is what compiling that kernel cost in
this process, measured on a small warm-up (seconds when torch's on-disk cache already has it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from bf16 import describe_cpu

from depthlens.analysis.evaluate import EvalReport, evaluate
from depthlens.analysis.trajectory import Trajectory
from depthlens.lenses import LogitLens, TunedLens
from depthlens.model.architecture import find_parts
from depthlens.model.hidden_states import capture
from depthlens.model.load import DEFAULT_MODEL, load_model
from depthlens.model.precision import DTYPE_NAMES, computing_in, resolve_dtype
from depthlens.stats.fused import FUSED_ENV
from depthlens.text.data import load_chunks

MIB = 2**20
RESULTS = Path(__file__).parent / "results" / "trajectory.json"


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


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float, object]]]:
    """``measure`` each of ``runs`` ``repeats`` times, alternating between them."""
    results: dict[str, list[tuple[float, float, object]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(measure(run))
    return results


def summary(results: dict[str, list[tuple[float, float, object]]], bare: str, work: str) -> dict[str, float]:
    """Median and minimum seconds and peak growth of each run, and the ratios of ``work`` (eager
    passes) and ``work_compiled`` (the compiled kernel) to ``bare``."""
    times = {name: [seconds for seconds, _, _ in runs] for name, runs in results.items()}
    facts: dict[str, float] = {}
    for name, runs in results.items():
        facts[f"{name}_median_s"] = round(statistics.median(times[name]), 2)
        facts[f"{name}_min_s"] = round(min(times[name]), 2)
        facts[f"{name}_peak_rss_growth_mib"] = round(max(peak for _, peak, _ in runs), 1)
        print(f"  {name:<20} median {facts[f'{name}_median_s']:7.2f} s  (min {facts[f'{name}_min_s']:.2f})  "
              f"peak RSS growth {facts[f'{name}_peak_rss_growth_mib']:7.1f} MiB")
    for label, name in (("", work), ("compiled_", f"{work}_compiled")):
        facts[f"{label}ratio_of_medians"] = round(statistics.median(times[name]) / statistics.median(times[bare]), 3)
        facts[f"{label}ratio_of_minima"] = round(min(times[name]) / min(times[bare]), 3)
        print(f"  time ratio {name} / {bare}: {facts[f'{label}ratio_of_medians']:.2f}x of medians, "
              f"{facts[f'{label}ratio_of_minima']:.2f}x of minima (target <= 1.3x)")
    return facts


@contextmanager
def statistics_kernel(compiled: bool) -> Iterator[None]:
    """Statistics by the compiled kernel or by eager passes, whatever the size of the work."""
    before = os.environ.get(FUSED_ENV)
    os.environ[FUSED_ENV] = "1" if compiled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FUSED_ENV]
        else:
            os.environ[FUSED_ENV] = before


def both_kernels(work: Callable[[], object]) -> dict[str, Callable[[], object]]:
    """``work`` with eager statistics and with the compiled kernel, as two runs."""
    def run(compiled: bool) -> object:
        with statistics_kernel(compiled):
            return work()
    return {"eager": lambda: run(False), "compiled": lambda: run(True)}


def compile_seconds(warm_up: Callable[[], object]) -> float:
    """Seconds of ``warm_up`` (a small run) with the compiled kernel minus with eager passes: the
    cost of compiling it in this process (fast when torch's on-disk cache has it; below 0 where the
    kernel's own speed on the warm-up outweighs a compile served from that cache)."""
    runs = both_kernels(warm_up)
    eager = measure(runs["eager"])[0]
    return round(measure(runs["compiled"])[0] - eager, 1)


def trajectory_run(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace) -> dict[str, float]:
    """The trajectory of the logit lens against its bare cost."""
    lens = LogitLens(model)
    input_ids = load_chunks("shakespeare", tokenizer, args.tokens, 1)

    @torch.no_grad()
    def bare() -> None:
        with computing_in(lens.parts.forward_dtype(args.products)):
            states = capture(model, input_ids, parts=lens.parts)
        with computing_in(args.products):
            for layer in range(lens.num_layers):
                lens(states[layer], layer)

    def trajectory() -> Trajectory:
        return Trajectory.from_ids(model, lens, input_ids, tokenizer=tokenizer, k=args.k, chunk_tokens=args.chunk_tokens,
                                   dtype=args.products)

    first = compile_seconds(lambda: Trajectory.from_ids(model, lens, input_ids[:, :16], k=args.k, dtype=args.products))
    kernels = both_kernels(trajectory)
    results = interleaved({"bare": bare, "trajectory": kernels["eager"], "trajectory_compiled": kernels["compiled"]},
                          args.repeats)
    rows, vocab = lens.num_layers + 1, lens.parts.vocab_size
    print(f"  trajectory of {rows} rows x {args.tokens} tokens, k={args.k}; compiling the kernel took {first} s")
    facts = summary(results, "bare", "trajectory")
    facts["compile_s"] = first
    facts["trajectory_mib"] = round(results["trajectory"][-1][2].nbytes / MIB, 2)
    facts["full_log_probabilities_mib"] = round(rows * args.tokens * vocab * 4 / MIB)
    print(f"  trajectory tensors: {facts['trajectory_mib']:.2f} MiB; full log-probabilities would be "
          f"{facts['full_log_probabilities_mib']} MiB")
    return facts


def evaluation_run(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace) -> dict[str, float]:
    """Evaluation of the logit and a tuned lens (with intervals) against its bare cost."""
    lenses = {"logit": LogitLens(model), "tuned": TunedLens(model)}
    chunks = list(load_chunks("shakespeare", tokenizer, args.eval_chunk_len, args.eval_chunks, split="validation"))
    byte_counts = [len(tokenizer.decode(chunk[1:].tolist()).encode()) for chunk in chunks]

    @torch.no_grad()
    def bare() -> None:
        parts = lenses["logit"].parts
        for start in range(0, len(chunks), 4):
            with computing_in(parts.forward_dtype(args.products)):
                states = capture(model, torch.stack(chunks[start : start + 4]), parts=parts)
            with computing_in(args.products):
                for lens in lenses.values():
                    for _ in lens.iter_logits(states):
                        pass

    def evaluation() -> EvalReport:
        return evaluate(model, lenses, chunks, byte_counts, progress=False, dtype=args.products)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few chunks for an interval: this is only the warm-up
        first = compile_seconds(lambda: evaluate(model, lenses, chunks[:2], byte_counts[:2], progress=False,
                                                 resamples=0, dtype=args.products))
    kernels = both_kernels(evaluation)
    results = interleaved({"bare": bare, "evaluation": kernels["eager"], "evaluation_compiled": kernels["compiled"]},
                          args.repeats)
    print(f"  evaluation of 2 lenses on {len(chunks)} chunks of {args.eval_chunk_len} tokens "
          f"({results['evaluation'][-1][2].interval_label()}); compiling the kernel took {first} s")
    facts = summary(results, "bare", "evaluation")
    facts["compile_s"] = first
    for label, name in (("", "evaluation"), ("compiled_", "evaluation_compiled")):
        facts[f"{label}tokens_per_second"] = round(results[name][-1][2].tokens / statistics.median(
            [seconds for seconds, _, _ in results[name]]), 1)
    print(f"  evaluation speed: {facts['tokens_per_second']} tokens/s eager, "
          f"{facts['compiled_tokens_per_second']} compiled")
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "gemma3-270m"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--eval-chunks", type=int, default=8)
    parser.add_argument("--eval-chunk-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="Trajectory chunk size (default: automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="precision of the products (default: auto)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.products = resolve_dtype(args.dtype)
    dtype = str(args.products).removeprefix("torch.")
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.models:
        model, tokenizer = load_model(name)
        print(f"{name}: vocab {find_parts(model).vocab_size}, {torch.get_num_threads()} torch threads, "
              f"{args.repeats} interleaved repeats, products in {dtype}")
        load_average = os.getloadavg()
        cpu = describe_cpu()
        key = f"{name} · {cpu['model'].split()[0].replace('(R)', '')} · {cpu['capability']} · {dtype}"
        results[key] = {"trajectory": trajectory_run(model, tokenizer, args),
                        "evaluation": evaluation_run(model, tokenizer, args),
                        "dtype": dtype, "cpu": cpu, "repeats": args.repeats,
                        "load_average_start": load_average, "load_average_end": os.getloadavg()}
        del model
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
