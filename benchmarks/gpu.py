"""A tuned lens for a model of real size on one GPU: random weights with Llama-3-8B's shapes.

No download: the model is built from its config alone (32 layers, width 4096, 32 heads with 8
key-value heads, MLP width 14,336, vocabulary 128,256), on the device, in bfloat16, with random
weights. Token ids are drawn uniformly; the point is the cost, not what the lens learns. The run,
phase by phase, with the seconds, tokens per second and peak device memory of each:

1. **build**: the model on the device;
2. **least-squares start**: ``--init-tokens`` tokens of forward passes, their float64 sums on the
   device (:class:`~depthlens.training.closed_form.LeastSquares`), one solve per layer;
3. **KL steps**: ``--steps`` steps of ``--step-tokens`` tokens with the default recipe (Adam, the
   KL estimated on a shortlist), products in bfloat16 (:func:`depthlens.training.train.train_step`);
4. **evaluation**: the logit and the tuned lens on ``--eval-tokens`` tokens, every layer, with
   bootstrap intervals (:func:`depthlens.analysis.evaluate.evaluate`).

Memory on one GPU for the 8B shapes: weights 16 GB (bfloat16); translators 32 × 4096² float32
(2.1 GB) with their gradients and Adam's two moments (8.6 GB in all); least-squares sums 8.6 GB
(float64); activations of a step well under 4 GB. Sized to finish in under 8 minutes on one H100.

``--tiny`` runs the same code on a 3-layer model of width 64 on the CPU (or the GPU if there is
one), in seconds: the test suite's smoke test. Needs only torch, transformers and depthlens's
training and evaluation modules (no plotting or web packages).

Run: ``python benchmarks/gpu.py [--tiny] [--steps 100] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from depthlens.analysis.evaluate import evaluate
from depthlens.atomic import write_file
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.tuned import TunedLens
from depthlens.model.hidden_states import capture
from depthlens.model.precision import computing_in, resolve_dtype
from depthlens.training.closed_form import LeastSquares
from depthlens.training.config import TrainConfig
from depthlens.training.optim import make_optimizers
from depthlens.training.train import train_step

LLAMA_3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
              "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
"""Llama-3-8B's shapes (its published ``config.json``)."""
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
"""A 3-layer model of the same family, for the smoke test."""
FULL_RUN = {"init_tokens": 16384, "steps": 100, "step_tokens": 2048, "eval_tokens": 4096, "chunk_len": 256}
TINY_RUN = {"init_tokens": 128, "steps": 2, "step_tokens": 32, "eval_tokens": 128, "chunk_len": 16}
GIB = 2**30


class Phases:
    """Seconds and peak device memory of each phase, timed after the device has finished its work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.results: dict[str, dict[str, float]] = {}

    def run(self, name: str, work: Callable[[], Any], tokens: int = 0) -> Any:
        """Run ``work()`` as phase ``name`` over ``tokens`` tokens; returns what it returns."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        result = work()
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        entry = {"seconds": round(seconds, 2)}
        if tokens:
            entry.update(tokens=tokens, tokens_per_s=round(tokens / seconds, 1))
        if cuda:
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 2)
        self.results[name] = entry
        print(f"{name:>20}: " + ", ".join(f"{key} {value}" for key, value in entry.items()), flush=True)
        return result


def build_model(shapes: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama with ``shapes`` and random weights, made directly on ``device`` in ``dtype``, frozen."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shapes), dtype=dtype)
    return model.eval().requires_grad_(False)


def random_chunks(vocab: int, count: int, length: int, seed: int) -> list[torch.Tensor]:
    """``count`` chunks ``[length]`` of token ids drawn uniformly from the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (count, length), generator=generator))


def least_squares_start(model: torch.nn.Module, lens: TunedLens, chunks: list[torch.Tensor], batch: int,
                        products: torch.dtype) -> None:
    """Fit every translator by ridge least squares (ridge 1e-4, as the default recipe) on ``chunks``."""
    device = lens.translators[0].weight.device
    stats = LeastSquares(lens.num_layers, lens.parts.d_model, device)
    for start in range(0, len(chunks), batch):
        with computing_in(products, device):
            states = capture(model, torch.stack(chunks[start : start + batch]).to(device), parts=lens.parts)
        stats.update(states.states)
    stats.apply(lens, 1e-4)


def kl_steps(model: torch.nn.Module, lens: TunedLens, chunks: list[torch.Tensor], per_step: int,
             config: TrainConfig, products: torch.dtype) -> list[float]:
    """Train with the default recipe, ``per_step`` chunks a step; returns the mean KL per layer
    (nats, shortlist estimate) of each step."""
    optimizers = make_optimizers(lens, config)
    losses = []
    for start in range(0, len(chunks) - per_step + 1, per_step):
        batch = torch.stack(chunks[start : start + per_step])
        losses.append(train_step(lens, model, batch, optimizers, config, products=products).mean().item())
    return losses


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase of the module docstring; returns the figures."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes, plan = (TINY, TINY_RUN) if args.tiny else (LLAMA_3_8B, FULL_RUN)
    plan = {**plan, **{key: value for key, value in vars(args).items() if key in plan and value is not None}}
    products = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    phases = Phases(device)
    model = phases.run("build", lambda: build_model(shapes, device, products))
    lens = TunedLens(model)
    length, vocab = plan["chunk_len"], shapes["vocab_size"]
    per_step = max(1, plan["step_tokens"] // length)
    config = TrainConfig(chunk_len=length, batch_tokens=per_step * length, dtype=str(products).removeprefix("torch."))
    fit = random_chunks(vocab, max(1, plan["init_tokens"] // length), length, seed=1)
    phases.run("least-squares start", lambda: least_squares_start(model, lens, fit, per_step, products),
               tokens=len(fit) * length)
    train = random_chunks(vocab, plan["steps"] * per_step, length, seed=2)
    losses = phases.run("KL steps", lambda: kl_steps(model, lens, train, per_step, config, products),
                        tokens=len(train) * length)
    held_out = random_chunks(vocab, max(8, plan["eval_tokens"] // length), length, seed=3)
    report = phases.run("evaluation", lambda: evaluate(
        model, {"logit": LogitLens(model), "tuned": lens}, held_out, [length - 1] * len(held_out),
        groups=len(held_out), resamples=200, progress=False, dtype=products), tokens=len(held_out) * (length - 1))
    kl = {name: sum(report.mean(name, "kl")) / (lens.num_layers + 1) for name in ("logit", "tuned")}
    print(f"mean KL over layers (nats): logit {kl['logit']:.4f}, tuned {kl['tuned']:.4f}; "
          f"KL steps: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shapes": shapes, "plan": plan, "dtype": str(products).removeprefix("torch."), "phases": phases.results,
            "mean_kl": kl, "step_losses": [round(loss, 5) for loss in losses], "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 3-layer model of width 64, in seconds (smoke test)")
    parser.add_argument("--device", help="default: cuda if there is one, else cpu")
    parser.add_argument("--dtype", default="bfloat16", help="auto, float32 or bfloat16 (default)")
    for name, value in FULL_RUN.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"default {value} ({TINY_RUN[name]} with --tiny)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    result = run(args)
    if args.out:
        write_file(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
