"""Benchmark: batched causal basis extraction against the authors' sequential algorithm.

One run on smollm2-135m: k directions at one middle layer, logit lens, mean erasure, both methods
on the same states (the first ``--tokens`` tokens of the Shakespeare validation split; fixed seed,
no wall-clock budget). The reference is the authors' algorithm: each direction starts from the
unembedding's singular vector, runs L-BFGS for up to ``--max-iter`` evaluations under their
convergence test, and the frame is sorted by energy. Reports wall time and cost in full-data
energy evaluations of each method, their ratios, the energy of every direction and the energy
ratio (batched / reference) per direction and in total, and the causal-fidelity ρ of each basis;
writes benchmarks/results/causal_basis.json.

    OMP_NUM_THREADS=1 nice python benchmarks/causal_basis.py [--tokens 64] [--layer 15] [--k 8] [--max-iter 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from depthlens import LogitLens, capture, load_model
from depthlens.analysis.causal import causal_fidelity, extract_basis, prepare
from depthlens.atomic import write_file
from depthlens.text.data import load_chunks

RESULT = Path(__file__).parent / "results" / "causal_basis.json"


def _comparison(batched: dict, sequential: dict) -> dict:
    """Speed-ups (reference / batched) in wall time, CPU time (the process's, which a shared
    machine's load does not inflate) and evaluations; energy ratios (batched /
    reference) per direction in order of energy, at each reported k, and in total."""
    pairs = zip(batched["energies_nats"], sequential["energies_nats"], strict=True)
    total = sum(batched["energies_nats"]) / sum(sequential["energies_nats"])
    speedup = sequential["seconds"] / batched["seconds"]
    return {
        "speedup_wall": round(speedup, 2),
        "speedup_cpu": round(sequential["cpu_seconds"] / batched["cpu_seconds"], 2),
        "speedup_evaluations": round(sequential["evaluations"] / batched["evaluations"], 2),
        "energy_ratio": {k: round(batched["captured_nats"][k] / sequential["captured_nats"][k], 4)
                         for k in batched["captured_nats"]},
        "energy_ratio_per_direction": [round(b / s, 4) if s > 0 else None for b, s in pairs],
        "energy_ratio_total": round(total, 4),
        "target_met": speedup >= 10 and total >= 0.95,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--chunk-len", type=int, default=64)
    parser.add_argument("--group-tokens", type=int, default=16, help="positions per bootstrap block (fidelity)")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--refine-steps", type=int, default=30, help="Adam steps of the batched refinement")
    parser.add_argument("--max-iter", type=int, default=100, help="most energy evaluations per direction (reference)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="relative energy change that stops a direction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="batched,sequential", help="which methods to run, comma-separated")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(args.seed)

    model, tokenizer = load_model(args.model)
    ids = load_chunks("shakespeare", tokenizer, args.chunk_len, args.tokens // args.chunk_len, split="validation")
    lens = LogitLens(model)
    data = prepare(lens, capture(model, ids, layers=[args.layer])[args.layer], args.layer, "mean",
                   group_tokens=args.group_tokens)
    result: dict = {"model": args.model, "layer": args.layer, "k": args.k, "tokens": data.num_positions,
                    "readout": "logit", "mode": "mean", "data": "shakespeare validation", "seed": args.seed,
                    "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), shared",
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    chosen = args.methods.split(",")
    reference = {"max_iter": args.max_iter, "tolerance": args.tolerance}
    for method, options in (("batched", {"refine_steps": args.refine_steps}), ("sequential", reference)):
        if method not in chosen:
            continue
        cpu = time.process_time()
        basis = extract_basis(lens, data, args.layer, args.k, method=method, seed=args.seed, progress=True, **options)
        cpu = time.process_time() - cpu
        fidelity = causal_fidelity(model, lens, ids, data, basis, progress=True)
        result[method] = {
            "seconds": round(basis.seconds, 1), "cpu_seconds": round(cpu, 1),
            "evaluations": round(basis.evaluations, 1), "options": options,
            "captured_nats": {str(k): round(basis.captured(k), 4) for k in sorted({1, 8, 32, 64, args.k}) if k <= args.k},
            "fidelity_rho": round(fidelity.rho, 4), "fidelity_interval": [round(fidelity.low, 4), round(fidelity.high, 4)],
            "energies_nats": [round(float(e), 5) for e in basis.energies],
        }
        print(method, json.dumps({key: value for key, value in result[method].items() if key != "energies_nats"}), flush=True)
        write_file(args.out, (json.dumps(result, indent=2) + "\n").encode())
    if len(chosen) < 2:
        return
    result.update(_comparison(result["batched"], result["sequential"]))
    write_file(args.out, (json.dumps(result, indent=2) + "\n").encode())
    keys = ("speedup_wall", "speedup_cpu", "speedup_evaluations", "energy_ratio_total", "energy_ratio_per_direction",
            "target_met")
    print(json.dumps({key: result[key] for key in keys}))


if __name__ == "__main__":
    main()
