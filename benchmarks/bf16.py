"""float32 against bfloat16 products: training steps, evaluation and matrix-product rates, per model.

For each model (default: both built-in ones), in one process, the two dtypes interleaved repeat
by repeat so that load from other processes hits both alike:

- **matrix products**: the rate of ``x @ Wᵀ`` with the unembedding's shape (256 tokens × d ×
  vocab) in each dtype, GFLOP/s (:func:`depthlens.model.precision.product_rates`);
- **evaluation**: tokens per second of :func:`depthlens.analysis.evaluate.evaluate` (logit lens
  and a tuned lens, every layer), and the share of its dtype's product rate that this reaches
  (FLOPs counted below: the products only, so the rest is what the statistics cost);
- **training**: steps per second of :func:`depthlens.training.train.train_step` (the default
  recipe: 256 tokens, Adam, the KL estimated on a shortlist), and the same share;
- **accuracy**: the largest relative difference of the per-layer KL between the dtypes (layers
  whose float32 KL is above :data:`KL_FLOOR` nats), for evaluation and for the training loss of
  one step from the same lens on ``--exact-tokens`` tokens with the exact KL; and whether every bfloat16 evaluation value lies in
  the float32 row's bootstrap interval (with ``--eval-chunks`` ≥ 8).

FLOPs per token: the forward pass is ``2 ×`` the weights of the model's linear layers (the
unembedding included) plus ``2 · seq · d`` per layer for attention scores and values (causal);
evaluation decodes every layer ``0 … L`` with each lens, ``2 · d · vocab`` (plus ``2 · d²`` for a
tuned translator); a training step adds, per layer, the translator (``6 · d²``: forward, and the
backward's two products) and the shortlist decode (``4 · d · k``, forward and the input gradient).

The tuned lens is fitted by least squares on ``--fit-tokens`` training tokens (float32), so its
KLs are those of a real lens. Run (one thread is steadier on a shared machine):
``OMP_NUM_THREADS=1 python benchmarks/bf16.py [--models smollm2-135m gemma3-270m]``; writes
``benchmarks/results/bf16.json``, one entry per model (other models' entries stay), with the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from depthlens.analysis.evaluate import EvalReport, evaluate
from depthlens.atomic import write_file
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.tuned import TunedLens
from depthlens.model.architecture import find_parts
from depthlens.model.hidden_states import capture
from depthlens.model.load import load_model
from depthlens.model.precision import bfloat16_is_fast, cpu_flags, cpu_name, product_rates
from depthlens.text.data import load_chunks
from depthlens.training.closed_form import LeastSquares
from depthlens.training.config import TrainConfig
from depthlens.training.objective import Shortlist
from depthlens.training.optim import make_optimizers
from depthlens.training.train import train_step

RESULTS = Path(__file__).parent / "results" / "bf16.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KL_FLOOR = 0.01
"""Layers whose float32 KL is below this many nats (the last layer: 0) are left out of the
relative differences, where rounding alone is a large fraction of the value."""
RESOLUTION = 1e-6
"""Differences up to this (nats, or a fraction for top-1) are below what the float32 statistics
resolve: their sums over 49k–262k vocabulary terms round too, so that the KL between two identical
gemma3-270m distributions comes out at 2.9·10⁻⁵ nats in float32."""


def describe_cpu() -> dict[str, Any]:
    """The CPU: its model name, the flags that matter for float32 and bfloat16 products, PyTorch's
    kernel capability and thread count."""
    return {"model": cpu_name(), "flags": cpu_flags(),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "bfloat16_is_fast": bfloat16_is_fast()}


def forward_flops(model: torch.nn.Module, seq: int) -> float:
    """FLOPs of the forward pass per token (see the module docstring)."""
    parts = find_parts(model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * linear + 2.0 * seq * parts.d_model * parts.num_layers


def fitted_lens(model: torch.nn.Module, tokenizer: Any, tokens: int) -> TunedLens:
    """A tuned lens fitted by ridge least squares (ridge 1e-4, float32) on ``tokens`` training tokens."""
    lens = TunedLens(model)
    stats = LeastSquares(lens.num_layers, lens.parts.d_model)
    for chunk in load_chunks(None, tokenizer, 256, max(1, tokens // 256), split="train", shuffle_seed=0):
        stats.update(capture(model, chunk[None], parts=lens.parts).states)
    stats.apply(lens, 1e-4)
    return lens


def time_evaluation(model: torch.nn.Module, lenses: dict[str, Any], chunks: list[torch.Tensor],
                    repeats: int) -> dict[str, Any]:
    """Seconds of :func:`evaluate` per dtype (best of ``repeats``, interleaved) and each report."""
    seconds = dict.fromkeys(DTYPES, math.inf)
    reports: dict[str, EvalReport] = {}
    for _ in range(repeats):
        for name in DTYPES:
            started = time.perf_counter()
            reports[name] = evaluate(model, lenses, chunks, [1] * len(chunks), groups=len(chunks), resamples=200,
                                     progress=False, dtype=name)
            seconds[name] = min(seconds[name], time.perf_counter() - started)
    return {"seconds": seconds, "reports": reports}


def evaluation_accuracy(reports: dict[str, EvalReport]) -> dict[str, Any]:
    """Largest relative KL difference (layers above :data:`KL_FLOOR`) and the bfloat16 values that
    fall outside the float32 row's interval (every lens, layer and metric, in its first unit: the
    bits-per-byte rows are the nats rows times one constant), listed as
    ``lens/layer/metric: bfloat16 value, float32 value [interval]``. Values within
    :data:`RESOLUTION` of the float32 value agree at float32's own resolution (an entropy of 10⁻¹⁸
    nats has an interval of that size) and are listed apart, not as outside."""
    worst, outside, tiny, rows = 0.0, [], [], 0
    low = {(r["lens"], r["layer"], r["metric"], r["unit"]): r for r in reports["float32"].table}
    for row in reports["bfloat16"].table:
        reference = low[(row["lens"], row["layer"], row["metric"], row["unit"])]
        if row["metric"] == "kl" and row["unit"] == "nats" and reference["value"] > KL_FLOOR:
            worst = max(worst, abs(row["value"] - reference["value"]) / reference["value"])
        if reference["ci_low"] is None or row["unit"] == "bits_per_byte":
            continue
        rows += 1
        if not reference["ci_low"] <= row["value"] <= reference["ci_high"]:
            listed = tiny if abs(row["value"] - reference["value"]) <= RESOLUTION else outside
            listed.append(f"{row['lens']}/{row['layer']}/{row['metric']}: {row['value']:.6g}, "
                          f"{reference['value']:.6g} [{reference['ci_low']:.6g}, {reference['ci_high']:.6g}]")
    kl = {name: {"float32": reports["float32"].mean(name, "kl"), "bfloat16": reports["bfloat16"].mean(name, "kl")}
          for name in ("logit", "tuned")}
    return {"max_relative_kl_difference": worst, "kl_by_layer": kl, "rows_with_intervals": rows,
            "outside_float32_interval": len(outside), "outside_rows": outside,
            "within_float32_resolution": tiny}


def copies(model: torch.nn.Module, start: TunedLens, config: TrainConfig) -> dict[str, tuple[TunedLens, list]]:
    """For each dtype, a copy of ``start`` and its optimizers."""
    made = {}
    for name in DTYPES:
        lens = TunedLens(model)
        lens.load_state_dict(start.state_dict())
        made[name] = (lens, make_optimizers(lens, config))
    return made


def time_training(model: torch.nn.Module, start: TunedLens, batches: list[torch.Tensor]) -> dict[str, float]:
    """Seconds per :func:`train_step` of the default recipe per dtype (median over the batches,
    interleaved; each dtype trains its own copy of ``start``)."""
    config = TrainConfig()
    trained = copies(model, start, config)
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    for number, batch in enumerate(batches):
        for name, dtype in DTYPES.items():
            torch.manual_seed(number)
            lens, optimizers = trained[name]
            started = time.perf_counter()
            train_step(lens, model, batch[None], optimizers, config, products=dtype)
            times[name].append(time.perf_counter() - started)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def training_loss_gap(model: torch.nn.Module, start: TunedLens, batch: torch.Tensor) -> float:
    """Largest relative difference between the dtypes of the per-layer training loss of one step
    of ``start`` on ``batch [tokens]``, with the exact KL (no shortlist: a shortlist drawn from
    each dtype's own final distribution would differ by sampling, not rounding)."""
    config = TrainConfig(shortlist=0, chunk_len=len(batch), batch_tokens=len(batch))
    losses = {name: train_step(lens, model, batch[None], optimizers, config, products=DTYPES[name]).tolist()
              for name, (lens, optimizers) in copies(model, start, config).items()}
    return max(abs(b - a) / a for a, b in zip(losses["float32"], losses["bfloat16"]) if a > KL_FLOOR)


def shortlist_size(model: torch.nn.Module, batch: torch.Tensor) -> int:
    """Vocabulary entries in the default shortlist of one batch (top 8 per position, plus 512)."""
    logits = capture(model, batch[None]).logits[0].float().log_softmax(-1)
    torch.manual_seed(0)
    return len(Shortlist().sample(logits).vocab)


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the module docstring for one model."""
    model, tokenizer = load_model(name)
    parts = find_parts(model)
    d, vocab, layers = parts.d_model, parts.vocab_size, parts.num_layers
    rates = product_rates((256, d, vocab), repeats=3)
    lens = fitted_lens(model, tokenizer, args.fit_tokens)
    chunks = list(load_chunks(None, tokenizer, args.chunk_len, args.eval_chunks, split="validation", shuffle_seed=0))
    evaluation = time_evaluation(model, {"logit": LogitLens(model), "tuned": lens}, chunks, args.repeats)
    tokens = evaluation["reports"]["float32"].tokens
    eval_flops = forward_flops(model, args.chunk_len) + 2 * (layers + 1) * 2 * d * vocab + layers * 2 * d * d
    batches = list(load_chunks(None, tokenizer, 256, args.steps, split="train", shuffle_seed=1))
    training = time_training(model, lens, batches)
    k = shortlist_size(model, batches[0])
    step_flops = 256 * (forward_flops(model, 256) + layers * (6 * d * d + 4 * d * k))
    loss_gap = training_loss_gap(model, lens, batches[0][: args.exact_tokens])
    result: dict[str, Any] = {"d_model": d, "vocab": vocab, "layers": layers, "product_rate_gflops": rates,
                              "eval_tokens": tokens, "train_steps": len(batches), "shortlist": k}
    for dtype in DTYPES:
        per_token = evaluation["seconds"][dtype] / tokens
        per_step = training[dtype]
        result[dtype] = {"eval_tokens_per_s": 1 / per_token, "train_steps_per_s": 1 / per_step,
                         "eval_share_of_product_rate": eval_flops / per_token / 1e9 / rates[dtype],
                         "train_share_of_product_rate": step_flops / per_step / 1e9 / rates[dtype]}
    result["speedup"] = {key: result["bfloat16"][key] / result["float32"][key]
                         for key in ("eval_tokens_per_s", "train_steps_per_s")}
    result["accuracy"] = {**evaluation_accuracy(evaluation["reports"]), "max_relative_train_loss_difference": loss_gap}
    return result


def show(name: str, result: dict[str, Any]) -> None:
    """Print one model's figures."""
    rates = result["product_rate_gflops"]
    print(f"\n{name}: d={result['d_model']}, vocab={result['vocab']}, {result['layers']} layers; products "
          f"(256 × d × vocab): float32 {rates['float32']:.0f}, bfloat16 {rates['bfloat16']:.0f} GFLOP/s "
          f"({rates['bfloat16'] / rates['float32']:.2f}×)")
    print(f"{'':>9} {'eval tok/s':>11} {'share':>6} {'steps/s':>8} {'share':>6}")
    for dtype in DTYPES:
        row = result[dtype]
        print(f"{dtype:>9} {row['eval_tokens_per_s']:11.2f} {row['eval_share_of_product_rate']:6.1%} "
              f"{row['train_steps_per_s']:8.3f} {row['train_share_of_product_rate']:6.1%}")
    speed, accuracy = result["speedup"], result["accuracy"]
    print(f"bfloat16 / float32: evaluation {speed['eval_tokens_per_s']:.2f}×, training {speed['train_steps_per_s']:.2f}×")
    print(f"accuracy: KL within {accuracy['max_relative_kl_difference']:.2%} (evaluation), "
          f"{accuracy['max_relative_train_loss_difference']:.2%} (first training step); "
          f"{accuracy['outside_float32_interval']} of {accuracy['rows_with_intervals']} bfloat16 values outside "
          f"the float32 interval ({len(accuracy['within_float32_resolution'])} more within {RESOLUTION:g} of it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--eval-chunks", type=int, nargs="+", default=[8, 1],
                        help="evaluation chunks per model, in the order of --models (8 or more gives intervals)")
    parser.add_argument("--chunk-len", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 3], help="training steps per dtype, per model")
    parser.add_argument("--exact-tokens", type=int, default=64,
                        help="tokens of the one exact-KL training step that compares the losses")
    parser.add_argument("--fit-tokens", type=int, default=1024, help="least-squares tokens of the tuned lens")
    parser.add_argument("--repeats", type=int, default=1, help="evaluations per dtype (the best counts)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON file of the results (default: {RESULTS.name})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    stored["cpu"] = describe_cpu()
    print(f"CPU: {stored['cpu']}")
    for index, name in enumerate(args.models):
        own = argparse.Namespace(**{**vars(args), "eval_chunks": args.eval_chunks[min(index, len(args.eval_chunks) - 1)],
                                    "steps": args.steps[min(index, len(args.steps) - 1)]})
        result = benchmark_model(name, own)
        show(name, result)
        stored[name] = result
        write_file(args.results, (json.dumps(stored, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
