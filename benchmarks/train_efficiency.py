"""Held-out KL versus wall time for three ways to train a tuned lens, measured in one run.

Methods (all on smollm2-135m and the built-in Shakespeare corpus, through ``depthlens.training.train``):

- ``sgd``: the paper's recipe (from memory, unverified; see the README's SGD recipe for how it
  differs from the authors' code): identity start, exact KL, SGD with Nesterov momentum 0.9, lr 1.0,
  weight decay 1e-3, gradient clipping 1.0, linear decay;
- ``muon``: identity start, exact KL, Muon for the translator matrices and Adam for the biases;
- ``default``: what ``depthlens train`` does with no options: the closed-form least-squares start,
  then Adam on KL steps estimated on a vocabulary shortlist.

The run has three parts, all scored on the same held-out tokens of the validation split (mean
KL(final ‖ lens) over layers 0…L−1, nats):

1. **Rates.** This machine's float32 matmul rate with the unembedding's own shapes, and the
   fraction of it that the exact and the shortlist KL steps reach (unembedding FLOPs done over the
   lens forward/backward time).
2. **Dedicated runs** of ``--dedicated`` minutes per method, using every core, one after the
   other. For ``default`` this is the command's own run: its closed-form start alone is scored
   too (at step 0, clock paused), which is target (b)'s baseline.
3. **Curves.** One run of ``--minutes`` per method, scored at the ``--marks`` (clock paused while
   scoring). All methods run at once, side by side, ``--threads`` each, so that every method gets
   the same share of the machine (on 2 cores and 3 methods, about 2/3 of a core each); each
   schedule decays over the whole run, so early marks are "anytime" values of a longer run, not
   what a run of that length would end at.

Usage: ``python benchmarks/train_efficiency.py`` (about 85 minutes on a 2-core machine);
``--dedicated`` (with no value) and ``--minutes 0`` skip parts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from depthlens import LogitLens, TunedLens, capture, load_model
from depthlens.text.data import load_chunks
from depthlens.training.objective import Shortlist, accumulate_gradients
from depthlens.training.train import TrainConfig, train

METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd", "init": "identity", "shortlist": 0, "batch_tokens": 512, "warmup_steps": 0,
            "layer_lr_decay": 0.0},
    "muon": {"optimizer": "muon", "init": "identity", "shortlist": 0, "batch_tokens": 512},
    "default": {},
}
MODEL = "smollm2-135m"


def matmul_rate(d: int, vocab: int, tokens: int, repeats: int = 5) -> float:
    """Float32 GFLOP/s of ``[tokens, d] @ [d, vocab]``, best of ``repeats``."""
    a, b = torch.randn(tokens, d), torch.randn(d, vocab)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * tokens * d * vocab / best / 1e9


def kl_step_rate(lens: TunedLens, states: list[torch.Tensor], target: torch.Tensor,
                 shortlist: Shortlist | None, repeats: int = 3) -> tuple[float, float]:
    """GFLOP/s of one per-layer KL forward + backward, counting the two unembedding matmuls on
    the vocabulary entries actually decoded, and the seconds it took (best of ``repeats``)."""
    best, columns = float("inf"), lens.parts.vocab_size
    for _ in range(repeats):
        lens.zero_grad()
        torch.manual_seed(0)
        if shortlist is not None:
            columns = len(shortlist.sample(target).vocab)
        torch.manual_seed(0)
        start = time.perf_counter()
        accumulate_gradients(lens, states, target, scale=1.0 / target.shape[0], shortlist=shortlist,
                             block_tokens=target.shape[0])
        best = min(best, time.perf_counter() - start)
    flops = 4 * target.shape[0] * lens.num_layers * lens.parts.d_model * columns
    return flops / best / 1e9, best


def held_out(model: torch.nn.Module, tokenizer: Any, tokens: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """States ``L + 1 × [tokens, d]`` and final log-probabilities ``[tokens, vocab]`` of the first
    ``tokens`` validation tokens."""
    hs = capture(model, load_chunks("shakespeare", tokenizer, 256, tokens // 256, split="validation"))
    states = [s.reshape(-1, s.shape[-1]) for s in hs.states]
    return states, hs.logits.reshape(len(states[0]), -1).float().log_softmax(-1)


def held_out_kl(lens: TunedLens | LogitLens, states: list[torch.Tensor], target: torch.Tensor) -> float:
    """Mean over layers 0…L−1 of the mean per-token KL(final ‖ lens), nats."""
    with torch.no_grad():
        per_layer = accumulate_gradients(lens, states, target, layers=range(lens.num_layers)) / target.shape[0]
    return per_layer.mean().item()


def run_method(method: str, minutes: float, marks: list[float], threads: int, eval_tokens: int) -> dict[str, Any]:
    """Train ``method`` for ``minutes`` with ``threads`` threads; score it at step 0 and at every
    mark (minutes) and at the end. Returns the points ``(minutes, steps, kl)``."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model(MODEL)
    states, target = held_out(model, tokenizer, eval_tokens)
    pending = sorted(m for m in marks if m < minutes)
    points: list[dict[str, float]] = []

    def score(lens: TunedLens, progress: dict[str, Any]) -> None:
        due = progress["step"] == 0 or (pending and progress["seconds"] >= pending[0] * 60)
        if due:
            while pending and progress["seconds"] >= pending[0] * 60:
                pending.pop(0)
            points.append({"minutes": progress["seconds"] / 60, "steps": progress["step"], "kl": held_out_kl(lens, states, target)})
            print(f"  {method:8s} {progress['seconds'] / 60:6.2f} min {progress['step']:5d} steps  KL {points[-1]['kl']:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        result = train(loaded=(model, tokenizer), minutes=minutes, out=scratch, on_step=score, **METHODS[method])
        points.append({"minutes": result.seconds / 60, "steps": result.steps, "kl": held_out_kl(result.lens, states, target)})
    print(f"  {method:8s} {result.seconds / 60:6.2f} min {result.steps:5d} steps  KL {points[-1]['kl']:.3f} (end)", flush=True)
    return {"method": method, "minutes": minutes, "threads": threads, "points": points}


def rates(eval_tokens: int) -> dict[str, float]:
    """Part 1: the matmul rate, the KL step rates, and the logit lens's held-out KL."""
    model, tokenizer = load_model(MODEL)
    states, target = held_out(model, tokenizer, eval_tokens)
    lens = TunedLens(model)
    config = TrainConfig()
    batch = slice(0, config.batch_tokens)
    matmul = matmul_rate(lens.parts.d_model, lens.parts.vocab_size, config.batch_tokens)
    exact, exact_s = kl_step_rate(lens, [s[batch] for s in states], target[batch], None)
    short, short_s = kl_step_rate(lens, [s[batch] for s in states], target[batch], Shortlist(config.shortlist, config.negatives))
    out = {"matmul_gflops": matmul, "exact_step_gflops": exact, "exact_step_seconds": exact_s,
           "shortlist_step_gflops": short, "shortlist_step_seconds": short_s,
           "logit_kl": held_out_kl(LogitLens(model), states, target)}
    print(f"fp32 matmul rate {matmul:.1f} GFLOP/s ({config.batch_tokens} × {lens.parts.d_model} × {lens.parts.vocab_size})")
    print(f"exact KL step:     {exact:.1f} GFLOP/s = {exact / matmul:.0%} of it, {exact_s:.2f} s per {config.batch_tokens} tokens")
    print(f"shortlist KL step: {short:.1f} GFLOP/s = {short / matmul:.0%} of it, {short_s:.2f} s per {config.batch_tokens} tokens "
          f"({exact_s / short_s:.1f}× faster)")
    print(f"logit lens held-out KL {out['logit_kl']:.3f} nats", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dedicated", type=float, nargs="*", default=[TrainConfig().minutes],
                        help="minutes of the dedicated runs (all threads, one after the other; default: the "
                             "command's own budget); none to skip")
    parser.add_argument("--dedicated-methods", nargs="+", default=["default"], choices=list(METHODS))
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the curve runs (0 to skip)")
    parser.add_argument("--marks", type=float, nargs="+", default=[5, 10, 20, 30, 45])
    parser.add_argument("--threads", type=int, default=1, help="threads per curve run")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/train_efficiency.json")
    args = parser.parse_args()

    results: dict[str, Any] = {"eval_tokens": args.eval_tokens, "marks": [*args.marks, args.minutes],
                               "rates": rates(args.eval_tokens), "dedicated": [], "curves": []}
    cores = torch.get_num_threads()
    for minutes in args.dedicated:
        for method in args.dedicated_methods:
            print(f"dedicated run: {method}, {minutes:g} min, {cores} threads", flush=True)
            results["dedicated"].append(run_method(method, minutes, [], cores, args.eval_tokens))
    if args.minutes > 0:
        processes = len(args.methods)
        print(f"curves: {args.minutes:g} min per method, side by side, {args.threads} thread(s) each "
              f"on {os.cpu_count()} cores", flush=True)
        jobs = [(m, args.minutes, args.marks, args.threads, args.eval_tokens) for m in args.methods]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results["curves"] = pool.starmap(run_method, jobs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: dict[str, Any]) -> None:
    """Markdown tables of the dedicated runs and the curves."""
    for run in results["dedicated"]:
        start, end = run["points"][0], run["points"][-1]
        extra = f", closed-form start alone {start['kl']:.3f}, ratio {end['kl'] / start['kl']:.2f}" if run["method"] == "default" else ""
        print(f"dedicated {run['method']}: {end['minutes']:.1f} min, {end['steps']} steps, KL {end['kl']:.3f}{extra}")
    if not results["curves"]:
        return
    curves = {c["method"]: c["points"] for c in results["curves"]}
    marks = results["marks"]
    print("\n| minutes | " + " | ".join(curves) + (" | default / sgd |" if {"sgd", "default"} <= curves.keys() else " |"))
    print("|---|" + "---|" * (len(curves) + ({"sgd", "default"} <= curves.keys())))
    for mark in marks:
        row = {m: min((p for p in points[1:]), key=lambda p: abs(p["minutes"] - mark)) for m, points in curves.items()}
        cells = [f"{row[m]['kl']:.3f} ({row[m]['steps']})" for m in curves]
        if {"sgd", "default"} <= curves.keys():
            cells.append(f"{row['default']['kl'] / row['sgd']['kl']:.2f}")
        print(f"| {mark:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
