"""Every lens side by side on smollm2-135m and gemma3-270m: the numbers of ``docs/lenses.md``.

For each model this gets every next-token lens depthlens has, each with a fixed budget of tokens
and seed 0 (never a wall-clock budget), then evaluates them all on the same held-out text:

- ``logit``: the model's own final norm and unembedding, nothing to train;
- ``tuned``: block-output translators, the default recipe (least-squares start, then KL steps) on
  the built-in ``mixed`` corpus, with :data:`BUDGETS`' token counts;
- ``tuned inside blocks``: the same recipe for translators at ``resid.i + attn.i``, the point
  after attention and before the MLP (shown as half-layers ``i + 0.5``);
- ``J-lens``: the Jacobian lens (Gurnee et al. 2026, not in this project's reference excerpt),
  fitted here on prompts of the ``mixed`` training split, no training.

The attribute lens reads a relation's attribute of a subject, not the next token, so a next-token
KL says nothing about it; it is left out, and the page says so.

Each lens is got in a child process, so its time and peak memory (resident set) are its own; a
lens already in ``--runs`` is kept, so an interrupted run resumes. The J-lens is also compared with
transformer-lens 4.3's ``JacobianLens`` fitted on the same token ids (``--peer-prompts``).

Evaluation (:func:`depthlens.analysis.evaluate.evaluate_held_out`, bootstrap 95% intervals over
groups of chunks, seed 0) reads the 8 unseen plays (the ``shakespeare`` validation split, which no
lens trains on) and the held-out documents of ``mixed:python-docs``. Products run in the precision
``--dtype auto`` picks (bfloat16 on a CPU with fast bfloat16, else float32); the JSON records it.

Run from a fresh clone (``pip install -e '.[test,gemma3]'``)::

    python benchmarks/lenses_side_by_side.py            # both models, then docs/lenses.md
    python benchmarks/lenses_side_by_side.py --models smollm2-135m

Writes ``benchmarks/results/lenses_<model>.json``, ``docs/lenses/<model>_<text>.png`` and
``docs/lenses.md`` (``page`` rewrites only the page from the results). The whole run took about
50 minutes on this project's 2-core machine while other jobs ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PICTURES = ROOT / "docs" / "lenses"
SEED = 0
BUDGETS: dict[str, dict[str, int]] = {
    "smollm2-135m": {"init_tokens": 16384, "tokens": 65536, "jacobian_prompts": 4, "jacobian_len": 64,
                     "eval_tokens": 2048, "chunk_len": 128},
    "gemma3-270m": {"init_tokens": 8192, "tokens": 32768, "jacobian_prompts": 2, "jacobian_len": 64,
                    "eval_tokens": 1024, "chunk_len": 128},
}
"""Token budgets per model: least-squares start and KL-step tokens of each tuned lens, J-lens
prompts and their length, evaluation tokens per text and the chunk length (≥ 8 chunks, so every
layer gets an interval)."""
KINDS = ("tuned", "mid", "jacobian")
TEXTS = {"unseen plays": ("shakespeare", "validation"), "python-docs": ("mixed:python-docs", "validation")}
JACOBIAN_SKIP = 8


def lens_dir(runs: Path, model: str, kind: str) -> Path:
    """Where the ``kind`` lens of ``model`` is kept."""
    return runs / model / kind


def lens_path(folder: Path) -> Path:
    """The lens folder inside a lens's run folder (where ``depthlens train`` puts it too)."""
    return folder / "lens"


def acquire(model_name: str, kind: str, runs: Path, dtype: str) -> dict[str, Any]:
    """Train or fit one lens in this process; returns its cost: wall and CPU seconds (the machine's
    load average beside them, since other work slows the wall clock), tokens, peak resident MB."""
    import torch

    from depthlens import load_model

    torch.manual_seed(SEED)
    budget = BUDGETS[model_name]
    model, tokenizer = load_model(model_name)
    model.eval()
    folder = lens_dir(runs, model_name, kind)
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before, started = before.ru_utime + before.ru_stime, time.monotonic()
    if kind == "jacobian":
        tokens = _fit_jacobian(model, tokenizer, budget, folder)
    else:
        tokens = _train_tuned(model, tokenizer, budget, folder, kind, dtype)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cost = {"seconds": round(time.monotonic() - started, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_before),
            "threads": torch.get_num_threads(), "load_average": [round(x, 1) for x in os.getloadavg()],
            "tokens": tokens, "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    (folder / "cost.json").write_text(json.dumps(cost), encoding="utf-8")
    return cost


def _train_tuned(model: Any, tokenizer: Any, budget: dict[str, int], folder: Path, kind: str, dtype: str) -> int:
    from depthlens.training.train import TrainConfig, train

    config = TrainConfig(data="mixed", tokens=budget["tokens"], minutes=None, init_tokens=budget["init_tokens"],
                         seed=SEED, out=str(folder), checkpoint_minutes=1e9, dtype=dtype,
                         **({"site": "mid"} if kind == "mid" else {}))
    result = train(config, loaded=(model, tokenizer))
    return budget["init_tokens"] + result.tokens


def _fit_jacobian(model: Any, tokenizer: Any, budget: dict[str, int], folder: Path) -> int:
    from depthlens.lenses.jacobian_fit import fit_jacobian_lens

    sequences = jacobian_prompts(tokenizer, budget["jacobian_prompts"], budget["jacobian_len"])
    lens = fit_jacobian_lens(model, sequences, skip_first=JACOBIAN_SKIP, max_seq_len=budget["jacobian_len"])
    lens.save_pretrained(lens_path(folder))
    return sum(len(ids) for ids in sequences)


def jacobian_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens: the first long-enough training documents of ``mixed``."""
    from depthlens.text.data import TextSource, load_chunks

    chunks = load_chunks(TextSource("mixed"), tokenizer, length, count, split="train", shuffle_seed=SEED)
    return [chunk.tolist() for chunk in chunks]


def peer_agreement(model_name: str, runs: Path, prompts: int) -> dict[str, Any]:
    """Largest ``|J_ours − J_theirs|`` over ``max |J_theirs|`` per layer, both fitted on the same
    ``prompts`` token sequences (transformer-lens 4.3's ``JacobianLens``; its block ``ℓ`` output
    is our state ``ℓ + 1``)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import JacobianLens as PeerJacobianLens

    from depthlens import load_model
    from depthlens.lenses.jacobian_fit import fit_jacobian_lens

    budget = BUDGETS[model_name]
    model, tokenizer = load_model(model_name)
    peer_model, _ = load_model(model_name)
    bridge = TransformerBridge.boot_transformers(peer_model.config.name_or_path, hf_model=peer_model.eval(),
                                                 tokenizer=tokenizer, device="cpu").eval()
    texts = [tokenizer.decode(ids) for ids in jacobian_prompts(tokenizer, prompts, budget["jacobian_len"])]
    started = time.monotonic()
    theirs = PeerJacobianLens.fit(bridge, texts, corpus="mixed", max_seq_len=budget["jacobian_len"],
                                  skip_first_positions=JACOBIAN_SKIP, show_progress=False)
    peer_seconds = time.monotonic() - started
    ids = [bridge.to_tokens(text)[0, : budget["jacobian_len"]] for text in texts]
    started = time.monotonic()
    ours = fit_jacobian_lens(model.eval(), ids, states=[layer + 1 for layer in theirs.jacobians],
                             skip_first=JACOBIAN_SKIP, max_seq_len=budget["jacobian_len"])
    seconds = time.monotonic() - started
    worst = {layer + 1: float((ours.matrix(layer + 1) - matrix).abs().max() / matrix.abs().max())
             for layer, matrix in sorted(theirs.jacobians.items())}
    return {"prompts": len(texts), "tokens_per_prompt": budget["jacobian_len"], "max_relative_difference": max(worst.values()),
            "per_state": worst, "transformer_lens_seconds": round(peer_seconds, 1), "depthlens_seconds": round(seconds, 1),
            "threads": torch.get_num_threads()}


def evaluate_all(model_name: str, runs: Path, dtype: str) -> dict[str, Any]:
    """Every lens of ``model_name`` on every text of :data:`TEXTS`: the evaluation tables."""
    from depthlens import load_model
    from depthlens.analysis.evaluate import evaluate_held_out
    from depthlens.lenses.registry import load_readout

    model, tokenizer = load_model(model_name)
    model.eval()
    budget = BUDGETS[model_name]
    lenses = {"logit": load_readout("logit", model)}
    lenses.update({kind: load_readout(str(lens_path(lens_dir(runs, model_name, kind))), model) for kind in KINDS})
    reports = {}
    for text, (source, split) in TEXTS.items():
        report = evaluate_held_out(model, tokenizer, lenses, source, tokens=budget["eval_tokens"],
                                   chunk_len=budget["chunk_len"], split=split, dtype=dtype, seed=SEED)
        reports[text] = report.to_json()
    return reports


def run_child(arguments: list[str]) -> None:
    """Run this script with ``arguments`` in a child process; raise if it fails."""
    subprocess.run([sys.executable, __file__, *arguments], check=True)


def run_model(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Get every lens of ``model_name`` (resuming), compare with the peer, evaluate; the results."""
    costs = {}
    for kind in KINDS:
        cost_file = lens_dir(args.runs, model_name, kind) / "cost.json"
        if not cost_file.is_file():
            run_child(["acquire", "--model", model_name, "--kind", kind, "--runs", str(args.runs), "--dtype", args.dtype])
        costs[kind] = json.loads(cost_file.read_text(encoding="utf-8"))
    peer = peer_agreement(model_name, args.runs, args.peer_prompts) if args.peer_prompts else None
    return {"model": model_name, "seed": SEED, "budget": BUDGETS[model_name], "dtype": args.dtype, "costs": costs,
            "peer_jacobian": peer, "evaluations": evaluate_all(model_name, args.runs, args.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="?", default="all", choices=["all", "acquire", "page"])
    parser.add_argument("--models", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--model", choices=list(BUDGETS), help="(acquire) the model")
    parser.add_argument("--kind", choices=KINDS, help="(acquire) the lens to train or fit")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "side-by-side", help="where lenses are kept")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--peer-prompts", type=int, default=1, help="prompts of the transformer-lens comparison (0: skip)")
    args = parser.parse_args()
    if args.phase == "acquire":
        print(json.dumps(acquire(args.model, args.kind, args.runs, args.dtype)))
        return
    if args.phase == "all":
        RESULTS.mkdir(parents=True, exist_ok=True)
        for model_name in args.models:
            results = run_model(model_name, args)
            (RESULTS / f"lenses_{model_name}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    from lenses_page import write_page

    write_page(RESULTS, PICTURES, ROOT / "docs" / "lenses.md")


if __name__ == "__main__":
    main()
