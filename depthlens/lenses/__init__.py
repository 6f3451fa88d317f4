"""Readouts: the readout protocol, the logit and tuned lenses, lens files."""

from depthlens.lenses.logit import LogitLens
from depthlens.lenses.readout import Lens, Readout
from depthlens.lenses.tuned import TunedLens

__all__ = ["Lens", "LogitLens", "Readout", "TunedLens"]
