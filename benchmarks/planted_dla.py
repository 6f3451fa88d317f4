"""Planted bugs in direct logit attribution (issue 21), term by term: each keeps the sum of the
terms equal to the logit, so only a test of the terms one at a time can catch it.
:mod:`planted_bugs` merges :data:`DLA_PLANTS` into its table; run one as::

    python benchmarks/planted_bugs.py neuron_scores_without_activation
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


def _neuron_terms(rescore: Callable) -> None:
    """Wrap :func:`depthlens.analysis.dla._mlp_terms` so each neuron's value is ``rescore(...)`` of
    it, the rest absorbing the change (the MLP's total, and so the sum, stay right)."""
    from depthlens.analysis import dla

    real = dla._mlp_terms

    def mlp_terms(parts, run, i, p, u, top, notes):
        terms = real(parts, run, i, p, u, top, notes)
        if not any(t.kind == "neuron" for t in terms):
            return terms
        total = sum(t.value for t in terms)
        changed = [
            dataclasses.replace(t, value=rescore(parts, run, i, p, u, t)) if t.kind == "neuron" else t for t in terms
        ]
        rest = total - sum(t.value for t in changed if t.kind == "neuron")
        return [dataclasses.replace(t, value=rest) if t.kind == "mlp_rest" else t for t in changed]

    dla._mlp_terms = mlp_terms


def _neuron_scores_without_activation() -> None:
    """A neuron's score is ``(W_downᵀ u)_n``, its writing direction's logit, not times its activation ``a_n``."""

    def rescore(parts, run, i, p, u, term):
        return term.value / float(run.at(f"neurons.{i}", p)[term.index])

    _neuron_terms(rescore)


def _neurons_skip_sandwich_norm() -> None:
    """Neuron scores use the residual's covector ``u`` even where a sandwich norm ends the MLP."""
    from depthlens.analysis.dla_model import projection

    def rescore(parts, run, i, p, u, term):
        a = run.at(f"neurons.{i}", p)
        return float((projection(parts, "neurons", i).weight[:, term.index] @ u) * a[term.index])

    _neuron_terms(rescore)


def _heads_absorb_projection_bias() -> None:
    """Heads are split without the output projection's bias as a term of its own: it is shared
    out equally among the heads (so the heads still add up to the branch)."""
    from depthlens.analysis import dla

    real = dla._attention_terms

    def attention_terms(parts, run, i, p, u, notes):
        terms = real(parts, run, i, p, u, notes)
        bias = sum(t.value for t in terms if t.kind == "attn_bias")
        heads = sum(t.kind == "head" for t in terms)
        return [dataclasses.replace(t, value=t.value + bias / heads) for t in terms if t.kind == "head"] or terms

    dla._attention_terms = attention_terms


DLA_PLANTS: dict[str, tuple[Callable[[], None], list[str]]] = {
    "neuron_scores_without_activation": (_neuron_scores_without_activation, ["tests/test_dla_oracle.py"]),
    "heads_absorb_projection_bias": (_heads_absorb_projection_bias, ["tests/test_dla_oracle.py"]),
    "neurons_skip_sandwich_norm": (_neurons_skip_sandwich_norm, ["tests/test_dla_oracle.py"]),
}
