"""How fast the causal checks turn one block of erased logits into KLs against the clean
distribution, on the built-in models' vocabularies: the three ways depthlens has done it.

- ``log_softmax + kl``: :func:`depthlens.stats.divergences.kl` of ``z.log_softmax(-1)`` (the model
  side of fidelity before :func:`~depthlens.stats.divergences.kl_to_logits_`);
- ``formula without ÷ S``: ``Σ p log p − Σ floored_exp(log p) z + floored_logsumexp z`` with fresh
  temporaries (the readout side before it; still the differentiable path of the search);
- ``kl_to_logits_``: the formula with ``p``, its sum and ``Σ p log p`` cached, divided by the sum
  (the normaliser of a float32 ``log_softmax`` is off by up to about ``1e-5``, which the plain
  formula multiplies by ``logsumexp z``), and ``z`` exponentiated in place.

Each is timed on the same random blocks (``--rows`` × vocabulary, logits from a random
unembedding of the model's width, so the spread of a real readout), interleaved, best of
``--repeats``; the products that make the logits are not timed. Every result is compared with
the float64 KL of the renormalised ``p``. Run with ``OMP_NUM_THREADS=1`` for the one-thread figures the pages quote::

    OMP_NUM_THREADS=1 python benchmarks/causal_kl.py [--rows 256] [--repeats 5] [--out causal_kl.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bf16 import describe_cpu

from depthlens.atomic import write_file
from depthlens.stats.divergences import KLReference, entropy, floored_exp, floored_logsumexp, kl, kl_to_logits_

SHAPES = {"smollm2-135m": (576, 49_152), "gemma3-270m": (640, 262_144)}
"""Width and vocabulary of the built-in models."""


def _methods(log_p: torch.Tensor) -> dict:
    reference, neg_entropy = KLReference.of(log_p), -entropy(log_p)
    return {
        "log_softmax + kl": lambda z: kl(log_p, z.log_softmax(-1)),
        "formula without ÷ S": lambda z: neg_entropy - (z * floored_exp(log_p)).sum(-1) + floored_logsumexp(z),
        "kl_to_logits_": lambda z: kl_to_logits_(reference, z),
    }


def measure(width: int, vocab: int, rows: int, repeats: int) -> dict:
    """Best seconds per block of each method, its ratio to the first, and its largest error (nats)."""
    generator = torch.Generator().manual_seed(0)
    unembedding = torch.randn(vocab, width, generator=generator) * (3 / width**0.5)
    clean = torch.randn(rows, width, generator=generator)
    erased = clean + 0.3 * torch.randn(rows, width, generator=generator)
    log_p = (clean @ unembedding.T).log_softmax(-1)
    logits = erased @ unembedding.T
    exact = kl(log_p.double().log_softmax(-1), logits.double().log_softmax(-1))
    methods = _methods(log_p)
    best = dict.fromkeys(methods, float("inf"))
    error = dict.fromkeys(methods, 0.0)
    with torch.no_grad():
        for _ in range(repeats):
            for name, method in methods.items():
                z = logits.clone()
                began = time.perf_counter()
                result = method(z)
                best[name] = min(best[name], time.perf_counter() - began)
                error[name] = max(error[name], float((result.double() - exact).abs().max()))
    first = next(iter(best.values()))
    return {name: {"seconds": round(best[name], 4), "speedup_wall": round(first / best[name], 2),
                   "max_error_nats": error[name]} for name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per block (default: 256, the causal search's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each method (default: 5)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = {"cpu": describe_cpu(), "rows": args.rows, "repeats": args.repeats, "models": {}}
    for model, (width, vocab) in SHAPES.items():
        results["models"][model] = measured = measure(width, vocab, args.rows, args.repeats)
        for name, row in measured.items():
            print(f"{model:13} {name:19} {row['seconds']:7.3f} s/block  {row['speedup_wall']:5.2f}×  "
                  f"max error {row['max_error_nats']:.1e} nats", flush=True)
    if args.out:
        write_file(args.out, (json.dumps(results, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
