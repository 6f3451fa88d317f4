"""Golden files written by tuned-lens itself, for ``tests/test_tuned_lens_format.py``.

tuned-lens 0.2.0 (the last release) needs transformers 4.x, so this script runs in an environment
of its own, never in depthlens's: ``benchmarks/golden/tuned_lens_golden.sh`` builds that
environment and runs every step below. Each step runs under one tuned-lens release:

``models OUT``  (any release) builds two tiny random models from a config alone, with a fixed
    seed: GPT-2 (tied unembedding, LayerNorm) and Llama (untied, RMSNorm), with random non-zero
    biases everywhere and norm gains away from 1, and saves them (``config.json`` +
    ``model.safetensors``) under ``OUT/<family>/model``.
``lens OUT``  (under 0.2.0, 0.1.0 or 0.0.5; 0.0.5 for GPT-2 only) creates a tuned lens for each model with that
    release's own ``TunedLens``, sets random non-zero translator weights and biases (seeded),
    saves it with the release's own ``save`` and writes its per-layer logits on fixed tokens.
    0.2.0 also writes a float16 copy (``lens_fp16``) and the logits tuned-lens gives after
    loading that copy onto the float32 model.
``check-export LENS MODEL EXPECTED OUT``  (under 0.2.0) loads a lens that depthlens exported,
    with tuned-lens's own loader, and compares its per-layer logits with depthlens's.

Per model folder ``OUT/<family>/``: ``lens_<release>/`` (tuned-lens's files, untouched),
``outputs_<release>.safetensors`` (``input_ids [B, T]``, ``hidden [L, B, T, d]``: the states
tuned-lens decodes, ``hidden_states[i]`` for ``i < L``, ``logits [L, B, T, vocab]``: the lens's
logits per layer, and ``model_logits [B, T, vocab]``), and ``meta_<release>.json`` (versions,
seeds, the unembedding hash tuned-lens computed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

MODEL_SEED = 1234
INPUT_IDS = [[5, 17, 42, 3, 88, 61, 29], [70, 2, 2, 54, 13, 95, 40]]
"""Two fixed sequences of 7 token ids below the tiny vocabulary size (96)."""
FAMILIES = {
    "gpt2": {
        "vocab_size": 96, "n_embd": 16, "n_layer": 3, "n_head": 2, "n_inner": 32, "n_positions": 32,
        "initializer_range": 0.2, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    },
    "llama": {
        "vocab_size": 96, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 32, "max_position_embeddings": 32,
        "initializer_range": 0.2, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False,
    },
}
LENS_SEEDS = {"0.2.0": 20, "0.1.0": 10, "0.0.5": 5}
"""A different seed per release, so a test that read the wrong file would fail."""
OLD_FAMILIES = ("gpt2",)
"""0.0.5 finds the final norm only if it is an ``nn.LayerNorm`` (it predates Llama), so its lens for
the Llama model would decode without the final norm: 0.0.5 writes only the GPT-2 lens."""


def release() -> str:
    """The tuned-lens release this process imports."""
    return version("tuned-lens")


def perturb_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Draw every bias from N(0, 0.1²) and every norm gain from 1 + N(0, 0.25²), in place."""
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                elif is_norm and name == "weight":
                    param.copy_(1 + 0.25 * torch.randn(param.shape, generator=generator))


def build_models(out: Path) -> None:
    """Build, perturb and save the tiny models (``OUT/<family>/model``)."""
    for family, overrides in FAMILIES.items():
        torch.manual_seed(MODEL_SEED)
        config = AutoConfig.for_model(family, **overrides)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
        perturb_(model, torch.Generator().manual_seed(MODEL_SEED))
        folder = out / family / "model"
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "generation_config.json").unlink(missing_ok=True)
        print(f"{family}: {sum(p.numel() for p in model.parameters())} parameters -> {folder}")


def load_model(out: Path, family: str) -> torch.nn.Module:
    """The saved tiny model, float32, eager attention, eval mode."""
    folder = out / family / "model"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    model.config.name_or_path = f"depthlens-golden/tiny-{family}"
    return model


def randomise_(translators, d_model: int, generator: torch.Generator) -> None:
    """Translator weights from N(0, 0.5²/d) and biases from N(0, 0.3²): far from the identity."""
    with torch.no_grad():
        for translator in translators:
            translator.weight.copy_(torch.randn(translator.weight.shape, generator=generator) * 0.5 / math.sqrt(d_model))
            translator.bias.copy_(0.3 * torch.randn(translator.bias.shape, generator=generator))


def make_lens(model: torch.nn.Module, tag: str, generator: torch.Generator):
    """A tuned lens built by the running release, with random translators."""
    from tuned_lens.nn.lenses import TunedLens

    if tag == "0.0.5":
        lens = TunedLens(model)
        translators = list(lens)
    else:
        lens = TunedLens.from_model(model)
        translators = list(lens.layer_translators)
    randomise_(translators, model.config.hidden_size, generator)
    return lens.eval()


@torch.no_grad()
def per_layer_logits(lens, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """tuned-lens's own decoding: ``lens(hidden_states[i], i)`` for each ``i < L``."""
    input_ids = torch.tensor(INPUT_IDS)
    output = model(input_ids, output_hidden_states=True)
    hidden = output.hidden_states[: model.config.num_hidden_layers]
    logits = [lens(h, i) for i, h in enumerate(hidden)]
    return {
        "input_ids": input_ids,
        "hidden": torch.stack(hidden).contiguous(),
        "logits": torch.stack(logits).contiguous(),
        "model_logits": output.logits.contiguous(),
    }


def write_meta(folder: Path, tag: str, seed: int, lens_config: dict) -> None:
    import numpy
    import transformers

    meta = {
        "tuned_lens": tag, "transformers": transformers.__version__, "torch": torch.__version__,
        "numpy": numpy.__version__, "model_seed": MODEL_SEED, "lens_seed": seed,
        "lens_config": lens_config,
    }
    (folder / f"meta_{tag}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def build_lenses(out: Path) -> None:
    """Write each model's lens with the running release, and its per-layer logits."""
    tag = release()
    for family in OLD_FAMILIES if tag == "0.0.5" else FAMILIES:
        model = load_model(out, family)
        seed = LENS_SEEDS[tag]
        lens = make_lens(model, tag, torch.Generator().manual_seed(seed))
        folder = out / family
        lens.save(folder / f"lens_{tag}")
        save_file(per_layer_logits(lens, model), folder / f"outputs_{tag}.safetensors")
        config = json.loads((folder / f"lens_{tag}" / "config.json").read_text())
        write_meta(folder, tag, seed, config)
        if tag == "0.2.0":
            write_float16(lens, model, folder)
        print(f"{family}: tuned-lens {tag} lens -> {folder / f'lens_{tag}'}")


def write_float16(lens, model: torch.nn.Module, folder: Path) -> None:
    """Save a float16 copy with tuned-lens's ``save``; record what tuned-lens reads back from it."""
    from tuned_lens.nn.lenses import TunedLens

    lens.half().save(folder / "lens_0.2.0_fp16")
    lens.float()
    reread = TunedLens.from_model_and_pretrained(model, str(folder / "lens_0.2.0_fp16")).eval()
    save_file(per_layer_logits(reread, model), folder / "outputs_0.2.0_fp16.safetensors")


def check_export(lens_dir: Path, model_dir: Path, expected: Path, out: Path) -> int:
    """Load depthlens's export with tuned-lens; compare its logits with depthlens's own.

    Writes ``out`` (JSON) and returns a process exit status: 0 if every layer agrees to the
    tolerance recorded in ``expected``'s companion JSON, else 1.
    """
    from tuned_lens.nn.lenses import TunedLens

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    lens = TunedLens.from_model_and_pretrained(model, str(lens_dir)).eval()
    ours = load_file(expected)
    theirs = per_layer_logits(lens, model)
    tolerance = json.loads(expected.with_suffix(".json").read_text())["tolerance"]
    diff = (theirs["logits"] - ours["logits"]).abs().amax(dim=(1, 2, 3))
    exported = json.loads((lens_dir / "config.json").read_text())
    result = {
        "tuned_lens": release(), "transformers": __import__("transformers").__version__,
        "lens_dir_config": exported,
        "max_abs_diff_per_layer": [float(x) for x in diff], "tolerance": tolerance,
        "hash_matches": lens.unembed.unembedding_hash() == exported["unembed_hash"],
        "warnings": warnings, "agree": bool((diff <= tolerance).all()),
    }
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["agree"] and not warnings else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("models").add_argument("out", type=Path)
    sub.add_parser("lens").add_argument("out", type=Path)
    check = sub.add_parser("check-export")
    for name in ("lens_dir", "model_dir", "expected", "out"):
        check.add_argument(name, type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.step == "models":
        build_models(args.out)
    elif args.step == "lens":
        build_lenses(args.out)
    else:
        return check_export(args.lens_dir, args.model_dir, args.expected, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
