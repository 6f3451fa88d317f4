"""A quiet terminal: cached forward passes use the key–value cache argument the installed
transformers wants (no FutureWarning), and the command line prints a warning as one line."""

import warnings

import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens
from depthlens.analysis.generate import generate_from_layer
from depthlens.apps.terminal import one_line_warning, one_line_warnings
from depthlens.errors import UnsupportedModelError
from depthlens.lenses.attribute import subject_jacobians
from depthlens.model.kv_cache import cache_argument, output_cache, with_cache


def test_cached_passes_warn_nothing_and_match_uncached():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 9, 40, 41, 7, 12]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated past_key_values would raise here
        cached = generate_from_layer(model, LogitLens(model), ids, layer=2, max_new_tokens=4)
        jacobians = subject_jacobians(model, ids, subject=3)
    uncached = generate_from_layer(model, LogitLens(model), ids, layer=2, max_new_tokens=4, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert jacobians is not None


def test_the_cache_is_passed_and_read_under_the_name_the_model_uses():
    model = tiny_model("llama")
    name = cache_argument(model)
    assert name == "cache"  # transformers ≥ 5.2x renamed past_key_values
    assert with_cache(model, "kv") == {name: "kv"}

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    assert with_cache(OldStyle(), "kv") == {"past_key_values": "kv"}
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[5, 9, 40]]), use_cache=True)
    assert output_cache(output) is output["cache"] and output_cache(output).get_seq_length() == 3
    assert output_cache({"past_key_values": "kv"}) == "kv"
    with pytest.raises(UnsupportedModelError, match="returned no key-value cache"):
        output_cache({"logits": 1})


def test_a_warning_prints_as_one_line_inside_a_command_only():
    """No file, line number or source line (a decorator's ``return func(*args, **kwargs)``)."""
    arguments = ("no bootstrap intervals: only 1 chunk", UserWarning, "/site-packages/torch/utils/_contextlib.py", 124,
                 "return func(*args, **kwargs)")
    with one_line_warnings():
        assert warnings.formatwarning(*arguments) == "depthlens: warning: no bootstrap intervals: only 1 chunk\n"
    assert warnings.formatwarning is not one_line_warning
    assert "_contextlib.py:124" in warnings.formatwarning(*arguments)
    assert one_line_warning("gone in 6.0", FutureWarning, "x.py", 1) == "depthlens: FutureWarning: gone in 6.0\n"
