"""J-lens fit: depthlens against transformer-lens 4.3's ``JacobianLens.fit``, on smollm2-135m.

Both libraries fit the same exact estimator (Gurnee et al. 2026) on the same token ids: sources
and targets at positions ``[skip, T − 1)``, source layers = the outputs of blocks ``0 … L − 2``
(depthlens's states ``1 … L − 1``). Each prompt is fitted by transformer-lens, then by depthlens,
one after the other, so a change in the machine's load hits both alike. Both run on one thread and
are timed twice: wall-clock and the process's CPU time (``time.process_time``), which a busy
shared machine inflates far less. The speed ratios are transformer-lens's total over depthlens's.
Agreement is the largest ``|J_ours − J_theirs|`` of each layer over that layer's largest
``|J_theirs|``; float32 sums of a few thousand terms, so about 1e-4 or less is rounding.

The run also measures the float32 matrix-product floor: for every cotangent ``e_i`` and every
fitted position, the gradient through each linear layer of blocks ``1 … L − 1`` (``g @ W``), timed
alone on the same thread. An exact reverse-mode fit cannot do less arithmetic than that (``d``
cotangents, since ``J`` has full rank; every block, since every state has a matrix), so
transformer-lens's CPU time over that floor bounds the speed-up any such fit could show.
transformer-lens runs its backward passes over all ``T`` positions, depthlens over the ``T − 1 −
skip`` fitted ones; the GFLOP/s printed count these linear-layer products only.

transformer-lens's bridge replaces the blocks of the model it wraps, so it gets its own copy of
the weights. Its fit prepends the tokenizer's BOS token; depthlens is given the bridge's token ids.
transformer-lens runs with its default ``dim_batch`` (8).

Run (3 to 6 minutes on one core, depending on the machine's load)::

    OMP_NUM_THREADS=1 python benchmarks/jacobian_lens.py --prompts 2 --tokens 32 --skip 8

Writes ``benchmarks/results/jacobian_lens.json``; ``--save DIR`` also saves depthlens's lens (a J-lens
folder, 38 MB for smollm2-135m).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

import depthlens
from depthlens.atomic import write_file
from depthlens.lenses.jacobian import JacobianLens
from depthlens.lenses.jacobian_fit import ROW_BUDGET, fit_jacobian_lens
from depthlens.model.architecture import find_parts
from depthlens.text.sources import read_documents

RESULTS = Path(__file__).parent / "results" / "jacobian_lens.json"


def prompts(count: int, min_chars: int = 400) -> list[str]:
    """The first ``count`` scenes of the built-in Shakespeare corpus with at least ``min_chars`` characters."""
    scenes = (doc.text for doc in read_documents("shakespeare") if len(doc.text) >= min_chars)
    return list(itertools.islice(scenes, count))


def bridge_for(model_name: str, tokenizer):
    """A raw transformer-lens bridge around a second copy of ``model_name`` (no download)."""
    from transformer_lens.model_bridge import TransformerBridge

    model, _ = depthlens.load_model(model_name)
    return TransformerBridge.boot_transformers(
        model.config.name_or_path, hf_model=model.eval(), tokenizer=tokenizer, device="cpu"
    ).eval()


def traversed_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weights ``[out, in]`` of the linear layers in blocks ``1 … L − 1``: those a backward pass from
    the last block's output to state 1 (block 0's output) multiplies every cotangent by."""
    parts = find_parts(model)
    return [module.weight.detach() for block in parts.blocks[1:] for module in block.modules()
            if isinstance(module, nn.Linear)]


def matmul_floor(model: nn.Module, rows: int, repeats: int = 3) -> float:
    """CPU seconds of the products ``g [rows, out] @ W [out, in]`` for every traversed weight (best of
    ``repeats``), scaled to ``d_model`` cotangents at one position: multiply by the positions fitted."""
    weights = traversed_weights(model)
    grads = {out: torch.randn(rows, out) for out in {int(weight.shape[0]) for weight in weights}}
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for weight in weights:
            grads[int(weight.shape[0])] @ weight
        best = min(best, time.process_time() - started)
    return best * find_parts(model).d_model / rows


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds, CPU seconds)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def fit_both(args: argparse.Namespace, model: nn.Module, bridge, texts: list[str]) -> dict:
    """Fit both lenses prompt by prompt: summed times, positions, and the per-prompt lenses."""
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    layers = model.config.num_hidden_layers
    totals = {"theirs_wall": 0.0, "theirs_cpu": 0.0, "ours_wall": 0.0, "ours_cpu": 0.0, "tokens": 0, "fitted": 0}
    theirs_sum: dict[int, torch.Tensor] = {}
    ours_lenses: list[JacobianLens] = []
    for index, text in enumerate(texts):
        ids = bridge.to_tokens(text)[0, : args.tokens]
        theirs, wall, cpu = timed(TLJacobianLens.fit, bridge, [text], corpus="shakespeare", max_seq_len=args.tokens,
                                  skip_first_positions=args.skip, show_progress=False)
        totals["theirs_wall"] += wall
        totals["theirs_cpu"] += cpu
        ours, wall, cpu = timed(fit_jacobian_lens, model, [ids], states=range(1, layers), skip_first=args.skip,
                                max_seq_len=args.tokens)
        totals["ours_wall"] += wall
        totals["ours_cpu"] += cpu
        totals["tokens"] += len(ids)
        totals["fitted"] += len(ids) - 1 - args.skip
        for layer, matrix in theirs.jacobians.items():
            theirs_sum[layer] = theirs_sum.get(layer, 0) + matrix
        ours_lenses.append(ours)
        print(f"prompt {index + 1}/{len(texts)} ({len(ids)} tokens): transformer-lens "
              f"{totals['theirs_wall']:.1f} s ({totals['theirs_cpu']:.1f} s CPU), depthlens "
              f"{totals['ours_wall']:.1f} s ({totals['ours_cpu']:.1f} s CPU) so far", flush=True)
    return {**totals, "theirs_sum": theirs_sum, "ours_lenses": ours_lenses}


def agreement(theirs_sum: dict[int, torch.Tensor], ours_lenses: list[JacobianLens]) -> list[float]:
    """Per source block ``l``: ``max |J_ours − J_theirs| / max |J_theirs|`` of the prompt-averaged ``J``."""
    count, result = len(ours_lenses), []
    for layer, total in sorted(theirs_sum.items()):
        expected = total / count
        actual = sum(lens.matrix(layer + 1) for lens in ours_lenses) / count
        result.append(float((actual - expected).abs().max() / expected.abs().max()))
    return result


def merged_lens(model: nn.Module, lenses: list[JacobianLens], seconds: float) -> JacobianLens:
    """The prompt-averaged lens of the per-prompt fits."""
    return JacobianLens(model, {state: sum(lens.matrix(state) for lens in lenses) / len(lenses)
                                for state in lenses[0].states},
                        n_prompts=len(lenses),
                        fit_info={**lenses[0].fit_info, "seconds": round(seconds, 3),
                                  "positions": sum(lens.fit_info["positions"] for lens in lenses)})


def run(args: argparse.Namespace) -> dict:
    """Fit both lenses and measure the matmul floor; returns timings, ratios, rates and agreement."""
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    model, tokenizer = depthlens.load_model(args.model)
    model.eval()
    bridge = bridge_for(args.model, tokenizer)
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    texts = prompts(args.prompts)
    print(f"{args.model}: {len(texts)} prompts of up to {args.tokens} tokens (BOS included), positions "
          f"[{args.skip}, T - 1) fitted, blocks 0-{layers - 2} as sources, 1 thread, "
          f"load average {load_start[0]:.2f} on {os.cpu_count()} cores", flush=True)
    fits = fit_both(args, model, bridge, texts)
    floor = matmul_floor(model, rows=ROW_BUDGET) * fits["fitted"]
    load_end = os.getloadavg()
    differences = agreement(fits["theirs_sum"], fits["ours_lenses"])
    if args.save:
        merged_lens(model, fits["ours_lenses"], fits["ours_wall"]).save_pretrained(args.save)
    flops_per_position = 2 * d * sum(weight.numel() for weight in traversed_weights(model))
    return {
        "model": args.model,
        "prompts": len(texts),
        "tokens_per_prompt": args.tokens,
        "skip_first": args.skip,
        "tokens": fits["tokens"],
        "fitted_positions": fits["fitted"],
        "source_layers": f"blocks 0-{layers - 2} (depthlens states 1-{layers - 1})",
        "threads": torch.get_num_threads(),
        "transformer_lens_dim_batch": 8,
        "load_average_start": [round(value, 2) for value in load_start],
        "load_average_end": [round(value, 2) for value in load_end],
        "cpu_count": os.cpu_count(),
        "transformer_lens_seconds": round(fits["theirs_wall"], 2),
        "depthlens_seconds": round(fits["ours_wall"], 2),
        "speed_ratio": round(fits["theirs_wall"] / fits["ours_wall"], 2),
        "transformer_lens_cpu_seconds": round(fits["theirs_cpu"], 2),
        "depthlens_cpu_seconds": round(fits["ours_cpu"], 2),
        "cpu_speed_ratio": round(fits["theirs_cpu"] / fits["ours_cpu"], 2),
        "matmul_floor_cpu_seconds": round(floor, 2),
        "ratio_bound_at_floor": round(fits["theirs_cpu"] / floor, 2),
        "transformer_lens_linear_gflops_per_s": round(flops_per_position * fits["tokens"] / fits["theirs_cpu"] / 1e9, 1),
        "depthlens_linear_gflops_per_s": round(flops_per_position * fits["fitted"] / fits["ours_cpu"] / 1e9, 1),
        "floor_linear_gflops_per_s": round(flops_per_position * fits["fitted"] / floor / 1e9, 1),
        "max_relative_difference": max(differences),
        "relative_difference_per_layer": [float(f"{value:.3g}") for value in differences],
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per prompt, BOS included (max_seq_len)")
    parser.add_argument("--skip", type=int, default=8, help="leading positions left out (skip_first_positions)")
    parser.add_argument("--save", type=Path, help="also save depthlens's lens in this folder")
    args = parser.parse_args()
    result = run(args)
    write_file(RESULTS, (json.dumps(result, indent=2) + "\n").encode())
    print(f"transformer-lens {result['transformer_lens_seconds']} s, depthlens {result['depthlens_seconds']} s: "
          f"{result['speed_ratio']}x faster (CPU time {result['transformer_lens_cpu_seconds']} s against "
          f"{result['depthlens_cpu_seconds']} s: {result['cpu_speed_ratio']}x); J agrees to "
          f"{result['max_relative_difference']:.2e} of its scale")
    print(f"float32 matmul floor of an exact fit: {result['matmul_floor_cpu_seconds']} s CPU, so at most "
          f"{result['ratio_bound_at_floor']}x; linear-layer GFLOP/s: transformer-lens "
          f"{result['transformer_lens_linear_gflops_per_s']}, depthlens {result['depthlens_linear_gflops_per_s']}, "
          f"floor {result['floor_linear_gflops_per_s']}; load average {result['load_average_start'][0]} "
          f"-> {result['load_average_end'][0]} on {result['cpu_count']} cores")


if __name__ == "__main__":
    main()
