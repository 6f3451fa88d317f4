"""Benchmark: batched causal basis extraction against the paper's sequential reference.

One run on smollm2-135m: k = 64 directions at one middle layer, logit lens, mean erasure, both
methods on the same states. Reports wall time, the energy of the first 8/32/64 directions
(nats) and the causal-fidelity ρ of each basis; writes benchmarks/results/causal_basis.json.

    OMP_NUM_THREADS=1 nice python benchmarks/causal_basis.py [--tokens 256] [--layer 15] [--k 64] [--max-iter 8]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--chunk-len", type=int, default=128)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=8, help="L-BFGS iterations per direction (sequential)")
    parser.add_argument("--methods", default="batched,sequential", help="which methods to run, comma-separated")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    model, tokenizer = load_model(args.model)
    ids = load_chunks("shakespeare", tokenizer, args.chunk_len, args.tokens // args.chunk_len, split="validation")
    lens = LogitLens(model)
    data = prepare(lens, capture(model, ids, layers=[args.layer])[args.layer], args.layer, "mean", group_tokens=32)
    result: dict = {"model": args.model, "layer": args.layer, "k": args.k, "tokens": data.num_positions,
                    "readout": "logit", "mode": "mean", "data": "shakespeare validation",
                    "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), shared",
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    chosen = args.methods.split(",")
    for method, options in (("batched", {}), ("sequential", {"max_iter": args.max_iter})):
        if method not in chosen:
            continue
        basis = extract_basis(lens, data, args.layer, args.k, method=method, progress=True, **options)
        fidelity = causal_fidelity(model, lens, ids, data, basis, progress=True)
        result[method] = {
            "seconds": round(basis.seconds, 1), "evaluations": round(basis.evaluations, 1), "options": options,
            "captured_nats": {str(k): round(basis.captured(k), 4) for k in (8, 32, 64) if k <= args.k},
            "fidelity_rho": round(fidelity.rho, 4), "fidelity_interval": [round(fidelity.low, 4), round(fidelity.high, 4)],
            "energies_nats": [round(float(e), 5) for e in basis.energies],
        }
        print(method, json.dumps({key: value for key, value in result[method].items() if key != "energies_nats"}), flush=True)
        write_file(args.out, (json.dumps(result, indent=2) + "\n").encode())
    if len(chosen) < 2:
        return
    batched, sequential = result["batched"], result["sequential"]
    result["speedup"] = round(sequential["seconds"] / batched["seconds"], 2)
    result["energy_ratio"] = {k: round(batched["captured_nats"][k] / sequential["captured_nats"][k], 4)
                              for k in batched["captured_nats"]}
    result["target_met"] = result["speedup"] >= 10 and all(r >= 0.95 for r in result["energy_ratio"].values())
    write_file(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({key: result[key] for key in ("speedup", "energy_ratio", "target_met")}))


if __name__ == "__main__":
    main()
