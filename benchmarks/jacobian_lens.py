"""J-lens fit: depthlens against transformer-lens 4.3's ``JacobianLens.fit``, on smollm2-135m.

Both libraries fit the same exact estimator (Gurnee et al. 2026) on the same token ids: sources
and targets at positions ``[skip, T − 1)``, source layers = the outputs of blocks ``0 … L − 2``
(depthlens's states ``1 … L − 1``). Each prompt is fitted by transformer-lens, then by depthlens,
one after the other, so a change in the machine's load hits both alike; the speed ratio is the sum
of transformer-lens's times over the sum of depthlens's. Agreement is the largest
``|J_ours − J_theirs|`` of each layer over that layer's largest ``|J_theirs|``; float32 sums of a
few thousand terms, so about 1e-4 or less is rounding.

transformer-lens's bridge replaces the blocks of the model it wraps, so it gets its own copy of
the weights. Its fit prepends the tokenizer's BOS token; depthlens is given the bridge's token ids.

Run (13 minutes on one core of a machine running other jobs: load average 8 to 13 on 2 cores)::

    OMP_NUM_THREADS=1 python benchmarks/jacobian_lens.py --prompts 2 --tokens 32 --skip 8

Writes ``benchmarks/results/jacobian_lens.json``; ``--save DIR`` also saves depthlens's lens (a J-lens
folder, 38 MB for smollm2-135m).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

import depthlens
from depthlens.atomic import write_file
from depthlens.lenses.jacobian import JacobianLens
from depthlens.lenses.jacobian_fit import fit_jacobian_lens
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


def run(args: argparse.Namespace) -> dict:
    """Fit both lenses prompt by prompt; returns the timings, ratio and agreement."""
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    torch.set_num_threads(1)
    model, tokenizer = depthlens.load_model(args.model)
    model.eval()
    bridge = bridge_for(args.model, tokenizer)
    layers = model.config.num_hidden_layers
    texts = prompts(args.prompts)
    theirs_time = ours_time = 0.0
    theirs_sum: dict[int, torch.Tensor] = {}
    ours_lenses: list[JacobianLens] = []
    for index, text in enumerate(texts):
        ids = bridge.to_tokens(text)[0, : args.tokens]
        started = time.perf_counter()
        theirs = TLJacobianLens.fit(bridge, [text], corpus="shakespeare", max_seq_len=args.tokens,
                                    skip_first_positions=args.skip, show_progress=False)
        theirs_time += time.perf_counter() - started
        started = time.perf_counter()
        ours = fit_jacobian_lens(model, [ids], states=range(1, layers), skip_first=args.skip, max_seq_len=args.tokens)
        ours_time += time.perf_counter() - started
        for layer, matrix in theirs.jacobians.items():
            theirs_sum[layer] = theirs_sum.get(layer, 0) + matrix
        ours_lenses.append(ours)
        print(f"prompt {index + 1}/{len(texts)} ({len(ids)} tokens): transformer-lens {theirs_time:.1f} s, "
              f"depthlens {ours_time:.1f} s so far", flush=True)
    agreement = []
    for layer, total in sorted(theirs_sum.items()):
        expected = total / len(texts)
        actual = sum(lens.matrix(layer + 1) for lens in ours_lenses) / len(texts)
        agreement.append(float((actual - expected).abs().max() / expected.abs().max()))
    merged = JacobianLens(model, {state: sum(lens.matrix(state) for lens in ours_lenses) / len(texts)
                                  for state in ours_lenses[0].states},
                          n_prompts=len(texts),
                          fit_info={**ours_lenses[0].fit_info, "seconds": round(ours_time, 3),
                                    "positions": sum(lens.fit_info["positions"] for lens in ours_lenses)})
    if args.save:
        merged.save_pretrained(args.save)
    return {
        "model": args.model,
        "prompts": len(texts),
        "tokens_per_prompt": args.tokens,
        "skip_first": args.skip,
        "source_layers": f"blocks 0-{layers - 2} (depthlens states 1-{layers - 1})",
        "threads": torch.get_num_threads(),
        "transformer_lens_seconds": round(theirs_time, 2),
        "depthlens_seconds": round(ours_time, 2),
        "speed_ratio": round(theirs_time / ours_time, 2),
        "max_relative_difference": max(agreement),
        "relative_difference_per_layer": [float(f"{value:.3g}") for value in agreement],
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
          f"{result['speed_ratio']}x faster; J agrees to {result['max_relative_difference']:.2e} of its scale")


if __name__ == "__main__":
    main()
