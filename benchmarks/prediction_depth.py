"""Prediction depth against iteration learned, per example over answer choices (Belrose et al. 2023, Table 2).

The paper's Table 2 (in the excerpt in ``shared/reference``) correlates "two measures of example
difficulty, the iteration learned and prediction depth, across tasks", with the tuned lens and
with the logit lens. No public series of checkpoints is available offline, so this benchmark
makes one, for every seed:

1. trains a small GPT-2-style model on the train split of the built-in Shakespeare corpus for
   ``--steps`` optimizer steps (seeded), keeping ``--checkpoints`` checkpoints at steps
   ``round(S · (k / K)^1.5)``, ``k = 1 … K`` (denser early);
2. trains a tuned lens on the last checkpoint for a budget of ``--lens-tokens`` KL-step tokens
   (after a least-squares start on ``--lens-init-tokens``), and reports its mean KL to the final
   layer on held-out text next to the logit lens's;
3. scores a multiple-choice task built from the held-out plays: a context, and the true next word
   against 3 distractors drawn (seeded) from words of similar training-corpus frequency, each
   choice scored by its summed log-probability (:mod:`depthlens.analysis.applications.features`).

Per example, the **prediction depth** under a lens is the first layer from which the lens's likeliest
choice equals the model's (layer ``L``) at every later layer, and the **iteration learned** the
first checkpoint from which the model's likeliest choice equals the last checkpoint's at every
later one (:mod:`depthlens.analysis.applications.depth`). The excerpt holds Table 2 but not the text
of §5.3 (example difficulty), so these definitions, after Baldock et al. 2021, are from another
source (unverified). The benchmark reports Spearman ρ between them for each lens and seed, with a
95% bootstrap interval over examples, the mean over seeds, and the paper's prediction-depth ρ of
Table 2 beside them. The task (contexts and choices) is the same for every seed. All budgets are
steps and tokens, so the same command gives the same numbers (on one thread).

Full run (3 seeds; about 30 minutes on one idle CPU thread, about 45 when the machine's two cores are
shared with other jobs)::

    OMP_NUM_THREADS=1 python benchmarks/prediction_depth.py

Trial (about 4–5 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/prediction_depth.py --quick --out runs/depth-quick.json --figures runs/depth-quick

Writes ``benchmarks/results/prediction_depth.json`` and ``docs/applications/depth_shakespeare_{logit,tuned}.png``
(per-token prediction depth over a held-out passage, like the paper's Figure 11).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from depthlens.analysis.applications.depth import (
    depth_grid,
    example_correlation,
    frequency_ranked,
    next_word_examples,
    word_counts,
)
from depthlens.analysis.applications.features import score_choices
from depthlens.analysis.applications.tasks import Example
from depthlens.analysis.evaluate import evaluate_held_out
from depthlens.analysis.trajectory import Trajectory
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.readout import Readout
from depthlens.paths import portable
from depthlens.text.data import TextSource, load_chunks
from depthlens.training.train import train_lens
from depthlens.viz.pictures import save_figure

ROOT = Path(__file__).resolve().parent.parent
CORPUS = "shakespeare"

PAPER_TABLE_2 = {
    "ARC-Easy": (0.577, 0.500), "ARC-Challenge": (0.547, 0.485), "LogiQA": (0.498, 0.277), "MNLI": (0.395, 0.435),
    "PiQA": (0.660, 0.620), "QNLI": (0.409, -0.099), "QQP": (0.585, -0.340), "RTE": (0.156, 0.347),
    "SciQ": (0.530, 0.505), "SST-2": (0.555, 0.292), "WinoGrande": (0.517, 0.537),
}
"""Belrose et al. 2023, Table 2 (the excerpt in shared/reference), ρ of prediction depth and iteration
learned per example: task → (tuned lens ρ, logit lens ρ)."""

QUICK = {"seeds": [0, 1, 2], "steps": 80, "checkpoints": 8, "lens_tokens": 32768, "lens_init_tokens": 8192,
         "examples": 300, "eval_tokens": 4096}
"""``--quick``: the default model on small budgets, a trial of every phase in a few minutes."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` replaces the budgets by :data:`QUICK`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one model and one lens per seed")
    add("--steps", type=int, default=1000, help="optimizer steps of the small model")
    add("--checkpoints", type=int, default=16, help="checkpoints K, at steps round(S·(k/K)^1.5)")
    add("--layers", type=int, default=6)
    add("--width", type=int, default=128, help="model width (heads of 32 dimensions)")
    add("--vocab", type=int, default=2048, help="BPE vocabulary trained on the train split")
    add("--seq", type=int, default=128, help="tokens per training window (and lens chunk)")
    add("--batch", type=int, default=16, help="windows per optimizer step")
    add("--lr", type=float, default=3e-3)
    add("--lens-tokens", type=int, default=393216, help="KL-step tokens of the tuned lens")
    add("--lens-init-tokens", type=int, default=32768, help="tokens of the lens's least-squares start")
    add("--lens-batch-tokens", type=int, default=512)
    add("--examples", type=int, default=800, help="next-word examples from the held-out plays")
    add("--choices", type=int, default=4, help="answer choices per example (the true word and distractors)")
    add("--window", type=int, default=25, help="distractors come from ±window frequency ranks of the true word")
    add("--min-count", type=int, default=5, help="answers and distractors occur this often in the train split")
    add("--context-chars", type=int, default=128, help="characters of held-out text before the answer")
    add("--task-seed", type=int, default=0, help="seed of the examples and distractors (the same for every seed)")
    add("--eval-tokens", type=int, default=8192, help="held-out tokens of the lens KL")
    add("--resamples", type=int, default=500, help="bootstrap resamples of each ρ")
    add("--score-batch", type=int, default=32, help="examples scored at a time")
    add("--quick", action="store_true", help="small budgets (see QUICK) for a trial run")
    add("--work", default=str(Path(tempfile.gettempdir()) / "depthlens-prediction-depth"), help="lenses go here")
    add("--out", default=str(ROOT / "benchmarks" / "results" / "prediction_depth.json"))
    add("--figures", default=str(ROOT / "docs" / "applications"), help="folder of the two depth pictures")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def checkpoint_steps(total: int, count: int, power: float = 1.5) -> list[int]:
    """The steps ``round(total · (k / count)^power)``, ``k = 1 … count``, after which checkpoints
    are kept; they must be distinct and at least 1."""
    steps = [round(total * (k / count) ** power) for k in range(1, count + 1)]
    if steps[0] < 1 or len(set(steps)) != count:
        raise SystemExit(f"--steps {total} is too few for {count} distinct checkpoints {steps}; raise --steps")
    return steps


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to ``seconds[phase]``."""
    begun = time.monotonic()
    yield
    seconds[phase] = round(seconds.get(phase, 0.0) + time.monotonic() - begun, 2)


def tokenizer_for(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def new_model(args: argparse.Namespace, vocab: int, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2-style model of ``args``'s shape, its weights drawn by ``seed``."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                        n_head=max(1, args.width // 32), bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.config.name_or_path = f"shakespeare-gpt2-seed{seed}"
    return model


def model_choice_scores(model: GPT2LMHeadModel, tokenizer: Any, examples: list[Example], batch: int) -> np.ndarray:
    """The model's own log-likelihood of every choice, ``[examples, choices]`` nats (summed over the
    choice's tokens), in eval mode; the model is left in the mode it was in."""
    was_training = model.training
    scores = score_choices(model.eval(), tokenizer, {"model": LogitLens(model)}, examples, batch_size=batch,
                           progress=False).loglik["model"][:, -1]
    model.train(was_training)
    return scores


def train_model(
    args: argparse.Namespace, model: GPT2LMHeadModel, ids: torch.Tensor, seed: int,
    at_checkpoint: Callable[[int, float], None],
) -> None:
    """``args.steps`` AdamW steps on random ``[batch, seq]`` windows of ``ids`` (drawn by ``seed``),
    with a 50-step warmup and a cosine decay to 10%; ``at_checkpoint(step, loss)`` runs after each
    step of :func:`checkpoint_steps`."""
    keep = set(checkpoint_steps(args.steps, args.checkpoints))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc=f"seed {seed} · model steps", unit="step")
    for step in bar:
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=generator).tolist()
        batch = torch.stack([ids[s : s + args.seq] for s in starts])
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50) * decay
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step in keep:
            at_checkpoint(step, loss.item())
    bar.close()


def lens_quality(args: argparse.Namespace, model: GPT2LMHeadModel, tokenizer: Any, readouts: dict[str, Readout]) -> dict:
    """Each lens's KL(model ‖ lens) on held-out tokens, per layer ``0 … L − 1`` and its mean over
    them (nats), with 95% bootstrap intervals over groups of chunks."""
    report = evaluate_held_out(model, tokenizer, readouts, CORPUS, tokens=args.eval_tokens, chunk_len=args.seq,
                               split="validation", groups=16, resamples=500)
    found: dict[str, Any] = {"tokens": report.tokens}
    for name in readouts:
        rows = sorted((r for r in report.table if r["lens"] == name and r["metric"] == "kl" and r["unit"] == "nats"),
                      key=lambda r: r["layer"])[:-1]
        found[name] = {"mean_kl_nats": statistics.fmean(r["value"] for r in rows),
                       "kl_nats": [r["value"] for r in rows], "kl_low": [r["ci_low"] for r in rows],
                       "kl_high": [r["ci_high"] for r in rows]}
    better, surely, layers = report.beats_baseline("tuned")
    found["tuned_below_logit"] = {"layers": layers, "point": better, "interval_below_0": surely}
    return found


def run_seed(args: argparse.Namespace, seed: int, tokenizer: Any, ids: torch.Tensor, examples: list[Example]) -> tuple[dict, Any, dict]:
    """One seed: model with checkpoints, tuned lens, lens KL, prediction depth against iteration
    learned. Returns its record, the model and the readouts."""
    seconds: dict[str, float] = {}
    gold = np.array([e.gold for e in examples])
    model = new_model(args, len(tokenizer), seed)
    scores, log = [], []

    def at_checkpoint(step: int, loss: float) -> None:
        with timed(seconds, "checkpoint scoring"):
            scores.append(model_choice_scores(model, tokenizer, examples, args.score_batch))
        log.append({"step": step, "train_loss": round(loss, 4), "accuracy": float((scores[-1].argmax(-1) == gold).mean())})

    with timed(seconds, "model training and checkpoint scoring"):
        train_model(args, model, ids, seed, at_checkpoint)
    seconds["model training"] = round(seconds.pop("model training and checkpoint scoring") - seconds["checkpoint scoring"], 2)
    model.eval().requires_grad_(False)
    with timed(seconds, "lens training"):
        lens = train_lens(model, tokenizer, CORPUS, args.lens_tokens, out=Path(args.work) / f"seed-{seed}", seed=seed,
                          init_tokens=args.lens_init_tokens, chunk_len=args.seq, batch_tokens=args.lens_batch_tokens,
                          shortlist=0)
    readouts = {"logit": LogitLens(model), "tuned": lens.lens}
    with timed(seconds, "lens KL"):
        quality = lens_quality(args, model, tokenizer, readouts)
    with timed(seconds, "depth scoring"):
        final = score_choices(model, tokenizer, readouts, examples, batch_size=args.score_batch,
                              description=f"seed {seed} · scoring choices per layer")
        found = example_correlation(final.loglik, np.stack(scores), resamples=args.resamples, seed=seed)
    record = {"seed": seed, "checkpoint_log": log, "accuracy": final.accuracy(),
              "lens_training": {"steps": lens.steps, "kl_tokens": lens.tokens, "init_tokens": args.lens_init_tokens,
                                "final_loss": lens.history[-1]["loss"] if lens.history else None},
              "lens_kl": quality, **found.to_dict(), "seconds": seconds}
    rhos = ", ".join(f"{name} {found.rho[name]:.3f} [{found.interval[name][0]:.3f}, {found.interval[name][1]:.3f}]"
                     for name in readouts)
    kls = ", ".join(f"{name} {quality[name]['mean_kl_nats']:.4f}" for name in readouts)
    print(f"seed {seed}: ρ {rhos}; mean KL to the model {kls} nats; accuracy {final.accuracy():.3f}")
    return record, model, readouts


def paper_comparison(runs: list[dict]) -> dict:
    """Counts of the prediction-depth ρ of Table 2 (from :data:`PAPER_TABLE_2`) beside those over seeds here."""
    tuned = [t for t, _ in PAPER_TABLE_2.values()]
    logit = [g for _, g in PAPER_TABLE_2.values()]
    return {
        "source": "Belrose et al. 2023, Table 2 (shared/reference excerpt): rho of prediction depth and "
                  "iteration learned, per example, across 11 tasks; the excerpt does not name the model",
        "paper": {"tasks": len(tuned), "tuned_positive": sum(t > 0 for t in tuned),
                  "logit_positive": sum(g > 0 for g in logit), "tuned_above_logit": sum(t > g for t, g in zip(tuned, logit)),
                  "median_tuned_rho": statistics.median(tuned), "median_logit_rho": statistics.median(logit),
                  "tuned_rho_range": [min(tuned), max(tuned)], "logit_rho_range": [min(logit), max(logit)]},
        "here": {"seeds": len(runs), "tuned_positive": sum(r["rho"]["tuned"] > 0 for r in runs),
                 "logit_positive": sum(r["rho"]["logit"] > 0 for r in runs),
                 "tuned_above_logit": sum(r["rho"]["tuned"] > r["rho"]["logit"] for r in runs),
                 "tuned_interval_above_0": sum(r["interval"]["tuned"][0] > 0 for r in runs),
                 "logit_interval_above_0": sum(r["interval"]["logit"][0] > 0 for r in runs)},
        "table_2": {task: {"tuned_rho": t, "logit_rho": g} for task, (t, g) in PAPER_TABLE_2.items()},
    }


def over_seeds(runs: list[dict]) -> dict:
    """Mean and per-seed values of ρ, mean depth and lens KL over the seeds."""
    names = list(runs[0]["rho"])
    return {
        "rho_mean": {n: statistics.fmean(r["rho"][n] for r in runs) for n in names},
        "rho_per_seed": {n: [r["rho"][n] for r in runs] for n in names},
        "interval_per_seed": {n: [r["interval"][n] for r in runs] for n in names},
        "mean_depth": {n: statistics.fmean(r["mean_depth"][n] for r in runs) for n in names},
        "mean_iteration": statistics.fmean(r["mean_iteration"] for r in runs),
        "accuracy": statistics.fmean(r["accuracy"] for r in runs),
        "mean_kl_nats": {n: statistics.fmean(r["lens_kl"][n]["mean_kl_nats"] for r in runs) for n in names},
    }


def draw_pictures(args: argparse.Namespace, model: Any, tokenizer: Any, readouts: dict[str, Readout]) -> list[str]:
    """Per-token prediction depth over the first 64 tokens of a held-out chunk, one picture per lens."""
    ids = load_chunks(CORPUS, tokenizer, args.seq, 1, split="validation", shuffle_seed=args.task_seed)[:, :64]
    written = []
    for name, readout in readouts.items():
        trajectory = Trajectory.from_ids(model, readout, ids, tokenizer=tokenizer, k=1, lens_name=f"{name} lens")
        written.append(portable(save_figure(depth_grid(trajectory, width=16), Path(args.figures) / f"depth_shakespeare_{name}.png")))
    return written


def finite(value: Any) -> Any:
    """``value`` with every NaN float (a ρ of a constant list) as ``None``, for strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def main(argv: Sequence[str] | None = None) -> dict:
    """Run every seed and write the JSON report and the pictures; returns the report."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    with timed(seconds, "data, tokenizer and task"):
        source = TextSource(CORPUS)
        train_texts, held_out = list(source.documents("train")), list(source.documents("validation"))
        tokenizer = tokenizer_for(train_texts, args.vocab)
        ids = torch.tensor(tokenizer("\n\n".join(train_texts)).input_ids)
        ranked = frequency_ranked(word_counts(train_texts), args.min_count)
        examples = next_word_examples(held_out, ranked, count=args.examples, seed=args.task_seed, choices=args.choices,
                                      window=args.window, context_chars=args.context_chars)
    runs, model, readouts = [], None, {}
    for seed in args.seeds:
        record, model, readouts = run_seed(args, seed, tokenizer, ids, examples)
        runs.append(record)
    with timed(seconds, "pictures"):
        pictures = draw_pictures(args, model, tokenizer, readouts)
    report = finite({
        "config": {**vars(args), "work": portable(args.work), "out": portable(args.out), "figures": portable(args.figures)},
        "budgets": {"model_steps": args.steps, "model_tokens": args.steps * args.batch * args.seq,
                    "checkpoint_steps": checkpoint_steps(args.steps, args.checkpoints),
                    "lens_kl_tokens": args.lens_tokens, "lens_init_tokens": args.lens_init_tokens,
                    "train_tokens_available": len(ids), "seeds": args.seeds, "task_seed": args.task_seed},
        "task": {"examples": len(examples), "choices": args.choices, "chance": 1 / args.choices,
                 "first": {"prompt": examples[0].prompt, "choices": examples[0].choices, "gold": examples[0].gold}},
        "over_seeds": over_seeds(runs), "comparison": paper_comparison(runs), "runs": runs,
        "pictures": pictures, "seconds": {**seconds, "seeds": [r["seconds"] for r in runs]},
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(json.dumps({"over_seeds": report["over_seeds"], "here": report["comparison"]["here"]}, indent=2))
    return report


if __name__ == "__main__":
    main()
