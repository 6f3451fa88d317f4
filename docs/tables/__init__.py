"""The tables of the docs pages, rendered from the committed result files.

A page marks each generated table with ``<!-- table: NAME -->`` … ``<!-- /table -->``.
``python docs/regenerate.py --tables`` (and every regeneration, after its steps) rewrites every marked
block from the results; ``tests/test_regenerate.py`` checks that the committed pages hold exactly
what their committed results render to, so no number on a page can drift from its file.

Intervals are the 95% intervals the result files state. Units: KL and energies in nats; Spearman
ρ, Aitchison similarity and AUROC are unitless.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from . import applications, readouts, science
from .common import ROOT, table

DOCS = ROOT / "docs"
PAGES = ("science", "applications", "readouts")
BLOCK = re.compile(r"(<!-- table: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def claims_table() -> str:
    """One row per claim of the paper that the pages test, with both models' results and a verdict."""
    rows = (science.claim_lens_rows() + science.claim_drift_rows() + science.claim_causal_rows()
            + applications.claim_injection_rows() + applications.claim_overthinking_rows()
            + applications.claim_depth_rows())
    return table(["claim (where in the paper)", "the paper's figure", "smollm2-135m [95%]", "gemma3-270m [95%]",
                  "verdict"], rows)


TABLES: dict[str, Callable[[], str]] = {
    "claims": claims_table,
    "eval": science.eval_table, "drift": science.drift_table, "energy": science.energy_table,
    "fidelity": science.fidelity_table,
    "energy-k64": science.energy_k64_table,
    "causal-basis": science.causal_basis_table, "causal-kl": science.causal_kl_table,
    "alignment": science.alignment_table,
    "injection": applications.injection_table, "srm": applications.srm_table,
    "overthinking": applications.overthinking_table, "depth": applications.depth_table,
    "token-depth": applications.token_depth_table,
    **{f"timings-{page}": (lambda page=page: readouts.timings_table(page)) for page in PAGES},
    **{f"checks-{page}": (lambda page=page: readouts.checks_table(page)) for page in PAGES},
    "identity-smollm2": lambda: readouts.identity_table("docs/readouts/patchscope/identity-curve.json"),
    "identity-gemma3": lambda: readouts.identity_table("docs/readouts/gemma3/patchscope/identity-curve.json"),
    "generate-smollm2": lambda: readouts.generation_table("docs/readouts/generate/generations.json",
                                                          "docs/readouts/generate-tuned/generations.json"),
    "generate-gemma3": lambda: readouts.generation_table("docs/readouts/gemma3/generate/generations.json",
                                                         "docs/readouts/gemma3/generate-tuned/generations.json"),
}
"""Every table a page can mark, by name."""


def render(text: str, tables: dict[str, Callable[[], str]] = TABLES, *, strict: bool = True) -> str:
    """``text`` with every marked block replaced by its table; an unknown name is an error. A table
    whose result file (or a field of it) is missing is an error too, or, unless ``strict``, left as
    it is with a note."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in tables:
            raise SystemExit(f"tables: no table named {name!r}; known: {', '.join(sorted(tables))}")
        try:
            return match.group(1) + tables[name]() + match.group(4)
        except (FileNotFoundError, KeyError) as missing:
            what = missing.filename if isinstance(missing, FileNotFoundError) else f"the field {missing}"
            if strict:
                raise SystemExit(f"tables: {name} needs {what}; run its step of docs/regenerate.py")
            print(f"tables: {name} left as it was: {what} is missing")
            return match.group(0)
    return BLOCK.sub(replace, text)


def main() -> None:
    """Rewrite every marked table of every page from the committed results."""
    for page in PAGES:
        path = DOCS / f"{page}.md"
        text = path.read_text(encoding="utf-8")
        rendered = render(text, strict=False)
        if rendered != text:
            path.write_text(rendered, encoding="utf-8")
            print(f"tables: rewrote docs/{page}.md")
