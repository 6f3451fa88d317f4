"""One variant of the default recipe on a fixed step budget, scored like ``recipe.py``.

``recipe.py`` runs the default on its wall-clock budget; to compare variants fairly this script
gives every variant the same number of KL steps (``--steps``, default 284: what the 8-minute
default reached in the recorded ``recipe.json`` run) and the full least-squares start, then scores
the lens (and, with ``--start``, its least-squares start) on 2048 tokens of the 8 unseen plays and
of ``python-docs`` (all of it, as ``recipe.py``; and, for lenses trained on ``python-docs``, its 3
held-out modules): the mean over layers 0…L−1 of the per-token KL(final ‖ lens), in nats, with
the per-layer values.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/recipe_sweep.py NAME '{"optimizer": "sgd"}' [--start]``
(about 9 minutes on one thread; two variants can run side by side on a 2-core machine). Each
result is merged under ``NAME`` into ``benchmarks/results/recipe_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from depthlens import TunedLens, load_model
from depthlens.atomic import write_file
from depthlens.text.data import TextSource
from depthlens.training.train import TrainConfig, train
from recipe import MODEL, held_out, keeping_start, per_layer_kl

RESULTS = Path(__file__).parent / "results" / "recipe_sweep.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("overrides", type=json.loads, help="TrainConfig fields as a JSON object")
    parser.add_argument("--steps", type=int, default=284)
    parser.add_argument("--start", action="store_true", help="also score the least-squares start")
    args = parser.parse_args()
    model, tokenizer = load_model(MODEL)
    sets = {"unseen_plays": held_out(model, tokenizer, TextSource(), "validation", 2048),
            "out_of_domain": held_out(model, tokenizer, TextSource("python-docs"), "all", 2048),
            "python_docs_held_out": held_out(model, tokenizer, TextSource("python-docs"), "validation", 2048)}
    start = TunedLens(model)

    config = TrainConfig(**{"data": "shakespeare", "dtype": "float32", "tokens": args.steps * 256, "minutes": None,
                            **args.overrides})
    begun = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, out=f"{folder}/run", loaded=(model, tokenizer), on_step=keeping_start(start))
    row = {"overrides": args.overrides, "config": asdict(config), "steps": result.steps,
           "seconds": round(time.monotonic() - begun, 1)}
    for lens_name, lens in [("lens", result.lens)] + ([("start", start)] if args.start else []):
        for where, data in sets.items():
            layers = [round(value, 4) for value in per_layer_kl(lens, data).tolist()]
            row[f"{lens_name}_{where}"] = round(sum(layers) / len(layers), 4)
            row[f"{lens_name}_{where}_layers"] = layers
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged[args.name] = row
    write_file(RESULTS, (json.dumps(merged, indent=1) + "\n").encode())
    print(json.dumps({key: value for key, value in row.items() if not key.endswith("layers")}))


if __name__ == "__main__":
    main()
