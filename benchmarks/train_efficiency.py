"""Held-out KL versus wall time for three ways to train a tuned lens, measured in one run.

Methods (all on smollm2-135m and the built-in Shakespeare corpus, through ``depthlens.train``):

- ``sgd``: the paper's recipe: identity start, SGD with Nesterov momentum 0.9, lr 1.0, weight
  decay 1e-3, gradient clipping 1.0, linear decay;
- ``muon``: identity start, Muon for the translator matrices and Adam for the biases;
- ``ls+muon`` (the default of ``depthlens train``): closed-form least-squares start, then Muon.

Every (method, budget) pair is a separate run whose schedule decays over that budget, so each
point is what a user asking for that many minutes gets. All runs are scored on the same held-out
tokens of the validation split. The script also measures this machine's float32 matmul rate with
the unembedding's own shapes and the fraction of it that the KL step reaches (unembedding forward
and backward FLOPs over the lens forward/backward time).

Usage: ``python benchmarks/train_efficiency.py --minutes 5 10``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from depthlens import LogitLens, TunedLens, capture, load_model
from depthlens.data import load_chunks
from depthlens.objective import accumulate_gradients
from depthlens.train import train

METHODS = {
    "sgd": {"optimizer": "sgd", "init": "identity"},
    "muon": {"optimizer": "muon", "init": "identity"},
    "ls+muon": {"optimizer": "muon", "init": "least_squares"},
}


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


def kl_step_rate(lens: TunedLens, states: list[torch.Tensor], target: torch.Tensor, repeats: int = 2) -> float:
    """GFLOP/s of the per-layer KL forward + backward (counting the two unembedding matmuls)."""
    best = float("inf")
    for _ in range(repeats):
        lens.zero_grad()
        start = time.perf_counter()
        accumulate_gradients(lens, states, target, scale=1.0 / target.shape[0])
        best = min(best, time.perf_counter() - start)
    flops = 4 * target.shape[0] * lens.num_layers * lens.parts.d_model * lens.parts.vocab_size
    return flops / best / 1e9


def held_out_kl(lens: TunedLens | LogitLens, states: list[torch.Tensor], target: torch.Tensor) -> float:
    """Mean over layers 0…L−1 of the mean per-token KL(final ‖ lens), nats."""
    with torch.no_grad():
        per_layer = accumulate_gradients(lens, states, target) / target.shape[0]
    return per_layer.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/train_efficiency.json")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    logit = LogitLens(model)
    rate = matmul_rate(logit.parts.d_model, logit.parts.vocab_size, 512)
    val_chunks = load_chunks("shakespeare", tokenizer, 256, args.eval_tokens // 256, split="validation")
    hs = capture(model, val_chunks)
    states = [s.reshape(-1, s.shape[-1]) for s in hs.states]
    target = hs.logits.reshape(len(states[0]), -1).float().log_softmax(-1)
    step_rate = kl_step_rate(TunedLens(model), [s[:512] for s in states], target[:512])
    results = {"matmul_gflops": rate, "kl_step_gflops": step_rate, "logit_kl": held_out_kl(logit, states, target),
               "eval_tokens": args.eval_tokens, "runs": []}
    print(f"fp32 matmul rate {rate:.1f} GFLOP/s; KL step {step_rate:.1f} GFLOP/s = {step_rate / rate:.0%} of it")
    print(f"logit lens held-out KL {results['logit_kl']:.3f} nats (mean over layers 0…L−1)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for minutes in args.minutes:
            for name in args.methods:
                run = train(loaded=(model, tokenizer), minutes=minutes, out=f"{scratch}/{name}-{minutes}", **METHODS[name])
                lens = TunedLens.from_pretrained(run.lens_path, model)
                kl = held_out_kl(lens, states, target)
                results["runs"].append({"method": name, "minutes": minutes, "steps": run.steps, "kl": kl})
                print(f"{name:8s} {minutes:5.1f} min  {run.steps:4d} steps  held-out KL {kl:.3f}", flush=True)
    table = {(r["method"], r["minutes"]): r["kl"] for r in results["runs"]}
    print("\n| minutes | " + " | ".join(args.methods) + " | ls+muon / sgd |")
    print("|---|" + "---|" * (len(args.methods) + 1))
    for minutes in args.minutes:
        ratio = table.get(("ls+muon", minutes), float("nan")) / table.get(("sgd", minutes), float("nan"))
        print(f"| {minutes:g} | " + " | ".join(f"{table[(m, minutes)]:.3f}" for m in args.methods) + f" | {ratio:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
