"""depthlens → tuned-lens: export a depthlens tuned lens for a golden model, with its logits.

Run in depthlens's environment by ``benchmarks/golden/tuned_lens_golden.sh``:
``python benchmarks/golden/tuned_lens_export.py MODEL_DIR OUT``. It loads the tiny model that
``tuned_lens_golden.py models`` saved, gives a depthlens :class:`TunedLens` random translators
(seeded), writes it with :func:`export_tuned_lens` to ``OUT/lens`` and writes depthlens's own
per-layer logits on the golden tokens to ``OUT/expected.safetensors`` (``logits [L, B, T, vocab]``)
with the tolerance for the comparison in ``OUT/expected.json``. The wrapper then loads ``OUT/lens``
with tuned-lens 0.2.0 itself (``tuned_lens_golden.py check-export``) and records the comparison in
``tests/golden/tuned_lens/<family>/export_check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from depthlens.lenses.tuned import TunedLens
from depthlens.lenses.tuned_lens_format import export_tuned_lens
from depthlens.model.hidden_states import capture

SEED = 30
INPUT_IDS = [[5, 17, 42, 3, 88, 61, 29], [70, 2, 2, 54, 13, 95, 40]]
"""The golden tokens of ``tuned_lens_golden.py``."""
EPS32 = torch.finfo(torch.float32).eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    model.config.name_or_path = f"depthlens-golden/tiny-{args.model_dir.parent.name}"
    lens = TunedLens(model)
    d = lens.parts.d_model
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(torch.randn(d, d, generator=generator) * 0.5 / math.sqrt(d))
            translator.bias.copy_(0.3 * torch.randn(d, generator=generator))
    export_tuned_lens(lens, args.out / "lens")
    states = capture(model, torch.tensor(INPUT_IDS))
    with torch.no_grad():
        logits = torch.stack([lens(states[i], i) for i in range(lens.num_layers)])
    save_file({"logits": logits.contiguous()}, args.out / "expected.safetensors")
    # The two sides differ by float32 rounding only: transformers 4 against 5, eager attention
    # against SDPA. Each logit is a sum of d terms after L blocks whose longest sums have
    # (d + intermediate + seq) terms; allow eps times that many terms of the largest logit's size.
    terms = lens.num_layers * (d + model.config.to_dict().get("intermediate_size", 4 * d) + len(INPUT_IDS[0])) + 3 * d
    tolerance = float(2 * terms * EPS32 * logits.abs().max())
    (args.out / "expected.json").write_text(json.dumps({"tolerance": tolerance, "seed": SEED}) + "\n")


if __name__ == "__main__":
    main()
