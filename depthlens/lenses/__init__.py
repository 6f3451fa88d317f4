"""Readouts: the readout protocol, the logit and tuned lenses, lens files."""
