"""Lenses inside a block: tuned-lens translators at the point after attention and before the MLP.

A readout may declare the ``site`` its states come from (:data:`~depthlens.model.hidden_states.Site`):
``"block"`` (the default, for a readout that declares none) reads the ``L + 1`` block outputs,
``"mid"`` reads mid states ``resid.i + attn.i`` (see :mod:`depthlens.model.hidden_states`), whose
last state ``L`` is the block output as usual. Code that captures states for a readout asks
:func:`site_of` which to capture (:func:`~depthlens.model.hidden_states.capture`'s ``site``), and
places its layer ``i`` at depth ``i + 0.5`` (:func:`~depthlens.model.hidden_states.depth`).

:class:`MidTunedLens` is a :class:`~depthlens.lenses.tuned.TunedLens` whose layer ``i < L`` means
mid state ``i``; it is trained by the same recipe (``depthlens train --site mid``) and saved as a
folder of kind ``"tuned-mid"``. It refuses states that do not say they are mid states, so a
command that captures only block outputs fails with a clear error instead of decoding them with
the wrong translators.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from depthlens.errors import LayerError
from depthlens.lenses.readout import Readout
from depthlens.lenses.tuned import TunedLens
from depthlens.model.hidden_states import SITES, Site


def site_of(readout: Readout) -> Site:
    """The site whose states ``readout`` decodes: its ``site`` attribute, else ``"block"``."""
    site = getattr(readout, "site", "block")
    if site not in SITES:
        raise LayerError(f"readout {readout.kind!r} declares site {site!r}: a readout's site is one of {', '.join(SITES)}")
    return site


def check_site(states: Sequence[torch.Tensor], readout: Readout) -> None:
    """Raise :class:`LayerError` unless ``states`` (a
    :class:`~depthlens.model.hidden_states.HiddenStates`, or a plain sequence, which holds block
    outputs) are of the site ``readout`` decodes."""
    found, wanted = getattr(states, "site", "block"), site_of(readout)
    if found != wanted:
        raise LayerError(
            f"the {readout.kind} lens decodes {wanted} states but was given {found} states: capture them with "
            f"capture(model, input_ids, site={wanted!r}); commands that read only block outputs (table, generate, "
            "causal, patchscope, compare) cannot use it, show and eval can"
        )


class MidTunedLens(TunedLens):
    """A tuned lens inside every block: ``translators[i]`` maps mid state ``i`` (``resid.i +
    attn.i``, ``0 ≤ i < L``) to ``h + A_i h + b_i`` before the model's decoding; layer ``L`` is the
    last block's output, decoded as is. Weights as :class:`~depthlens.lenses.tuned.TunedLens`."""

    kind = "tuned-mid"
    site: Site = "mid"

    def iter_logits(
        self, states: Sequence[torch.Tensor], layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer, logits [batch, seq, vocab])`` for mid states ``states`` (a
        :class:`~depthlens.model.hidden_states.HiddenStates` with ``site == "mid"``); raises
        :class:`LayerError` for block outputs, before any decoding."""
        check_site(states, self)
        return super().iter_logits(states, layers)


def lens_class(site: Site) -> type[TunedLens]:
    """The tuned-lens class that is trained at ``site``."""
    return MidTunedLens if site == "mid" else TunedLens


__all__ = ["MidTunedLens", "check_site", "lens_class", "site_of"]
