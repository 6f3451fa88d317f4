"""Does the default recipe come within 10% of a run with 20× its KL tokens?

Two lenses for one model, trained with the default recipe (``TrainConfig`` defaults: the ``mixed``
corpus, the least-squares start, Adam on shortlist-KL steps), the same seed and the same
precision, one on ``--tokens`` KL-step tokens (the default run) and one on ``--factor`` times as
many (the longer run; its learning rate decays over its own, longer schedule; it reads the
corpus's training split more than once where the split is shorter than its budget, and the record
says how many passes that was: the mixed corpus's split holds about 576k tokens, so 20 × 960 steps
read it about 8.5 times, while the default run reads under half of it). Both are then
evaluated on the same held-out tokens with :func:`~depthlens.analysis.evaluate.evaluate_held_out`
(exact KL over the whole vocabulary, nats, bootstrap groups of chunks): the corpus's validation
split and each of its unseen kinds.

For each set the record gives the mean over layers 0…L−1 of each lens's KL(final ‖ lens), their
ratio (default / longer), the layers where the default is more than 10% above the longer run, and
the paired per-layer differences (default − longer) with their 95% intervals. The question is
answered "yes" on a set when the ratio of the means is at most 1.1.

Both runs train in ``--runs`` (``default/`` and ``longer/``, each a run folder with its
checkpoint): stopped at any point, the same command resumes each where its checkpoint left it, and
a finished run is loaded, not retrained. On this project's 2-core CPU the longer run of
smollm2-135m (20 × 960 steps) takes about five hours of one core in bfloat16 (1.0 step/s with the
other core busy), so it may span several sittings; on a GPU, minutes.

Run: ``OMP_NUM_THREADS=1 python benchmarks/longer_run.py [--tokens 245760] [--factor 20]
[--dtype bfloat16] [--device cuda] [--out benchmarks/results/longer_run.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from depthlens import load_model
from depthlens.analysis.evaluate import EvalReport, evaluate_held_out
from depthlens.atomic import write_file
from depthlens.errors import DepthlensError
from depthlens.lenses.tuned import TunedLens
from depthlens.text import corpus
from depthlens.text.data import TextSource, token_chunks
from depthlens.training.runs import checkpoint_dir
from depthlens.training.train import TrainConfig, train

WITHIN = 1.1
"""The question's bound: the default run's mean KL at most this many times the longer run's."""


def train_or_resume(loaded: tuple[Any, Any], tokens: int, args: argparse.Namespace, run: Path,
                    split_tokens: int) -> dict[str, Any]:
    """Train (or resume, or finish at once if done) the default recipe on ``tokens`` KL tokens in
    ``run``, reading the ``split_tokens``-token training split again where the budget needs it."""
    began = time.monotonic()
    resume = checkpoint_dir(run).is_dir() and any(checkpoint_dir(run).iterdir())
    config = TrainConfig(model=args.model, tokens=tokens, minutes=None, seed=args.seed, dtype=args.dtype,
                         out=str(run), checkpoint_minutes=args.checkpoint_minutes)
    config.repeat_data = config.init_tokens + tokens > split_tokens
    result = train(config, loaded=loaded, resume=resume)
    return {"lens": result.lens, "steps": result.steps, "kl_tokens": tokens, "resumed": resume,
            "passes_over_split": round((config.init_tokens + tokens) / split_tokens, 2),
            "seconds_this_sitting": round(time.monotonic() - began, 1)}


def compare(report: EvalReport, layers: int) -> dict[str, Any]:
    """The two lenses' mean KLs over layers 0…L−1, their ratio, the layers beyond :data:`WITHIN`,
    and the paired differences (default − longer, nats) with their intervals."""
    default, longer = (report.mean(name, "kl")[:layers] for name in ("default", "longer"))
    mean_default, mean_longer = sum(default) / layers, sum(longer) / layers
    differences = sorted((row for row in report.differences if row["metric"] == "kl" and row["layer"] < layers),
                         key=lambda row: row["layer"])
    return {
        "mean_kl_default": round(mean_default, 4), "mean_kl_longer": round(mean_longer, 4),
        "ratio": round(mean_default / mean_longer, 4), "within_10_percent": mean_default <= WITHIN * mean_longer,
        "layers_beyond_10_percent": [layer for layer, (a, b) in enumerate(zip(default, longer)) if a > WITHIN * b],
        "per_layer": [{"layer": row["layer"], "default": round(a, 4), "longer": round(b, 4),
                       "difference": round(row["value"], 4), "ci_low": row["ci_low"], "ci_high": row["ci_high"]}
                      for row, a, b in zip(differences, default, longer)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=245760,
                        help="KL-step tokens of the default run (960 steps of 256: what the 6.5-minute default reaches)")
    parser.add_argument("--factor", type=int, default=20, help="the longer run has this many times the KL tokens")
    parser.add_argument("--device", default="cpu", help="where the model runs (e.g. cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "auto"))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--runs", type=Path, default=Path("runs/longer"), help="run folders of both lenses")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "longer_run.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device)
    recipe = TrainConfig()
    split_tokens = sum(chunk.numel() for chunk in token_chunks(TextSource(recipe.data), tokenizer, recipe.chunk_len,
                                                               split="train"))
    runs = {name: train_or_resume((model, tokenizer), tokens, args, args.runs / name, split_tokens)
            for name, tokens in (("default", args.tokens), ("longer", args.tokens * args.factor))}
    lenses: dict[str, TunedLens] = {name: run.pop("lens") for name, run in runs.items()}
    layers = lenses["default"].num_layers
    sets = {"validation": ("mixed", "validation")}
    sets.update({f"unseen kind: {kind}": (f"mixed:{kind}", "validation") for kind in corpus.unseen_kinds()})
    results = {}
    for name, (source, split) in sets.items():
        report = evaluate_held_out(model, tokenizer, {"longer": lenses["longer"], "default": lenses["default"]},
                                   source, tokens=args.eval_tokens, split=split, groups=16, dtype=args.dtype)
        results[name] = compare(report, layers)
        print(f"{name}: default {results[name]['mean_kl_default']} / longer {results[name]['mean_kl_longer']} = "
              f"{results[name]['ratio']} ({'within' if results[name]['within_10_percent'] else 'NOT within'} 10%)",
              flush=True)
    record = {"model": args.model, "seed": args.seed, "dtype": args.dtype, "factor": args.factor,
              "eval_tokens": args.eval_tokens, "device": args.device,
              "machine": platform.processor() or platform.machine(),
              "kernel_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "train_split_tokens": split_tokens, "runs": runs, "sets": results}
    write_file(args.out, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


if __name__ == "__main__":
    try:
        main()
    except DepthlensError as error:
        raise SystemExit(f"longer_run: {error}") from None
