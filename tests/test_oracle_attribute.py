"""Oracle tests of the attribute lens and of the web app's readout tabs: the LRE's β and low-rank
cut against a separate SVD, an LRE that must return its subject's final state exactly, the
faithfulness score against a one-prompt-at-a-time reference read at the subject's position, and
the tabs' controls and lock checked by their effect."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from depthlens import capture
from depthlens.apps import web_readouts
from depthlens.lenses.attribute import faithfulness, fit_attribute_lens
from depthlens.text.relations import Relation, subject_position

RELATION = Relation(
    "fox",
    ("The fox of {} is",),
    (("quick", "brown"), ("lazy", "dog"), ("fair", "foul"), ("thunder", "rain"), ("question", "be"), ("fog", "air")),
)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", initializer_range=0.3).eval()


@pytest.fixture(scope="module")
def fitted(llama, tiny_tokenizer):
    return fit_attribute_lens(llama, tiny_tokenizer, RELATION, [("quick", "brown"), ("lazy", "dog")], n_context=1)


def test_beta_survives_the_low_rank_cut(fitted):
    lens = fitted.with_beta(2.5)
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for rank in (3, 32):
        low = lens.low_rank(rank)
        for layer in (0, 2):
            u, s, vh = np.linalg.svd(lens.weight[layer].double().numpy())
            w = (u[:, :rank] * s[:rank]) @ vh[:rank]
            expected = 2.5 * h.double().numpy() @ w.T + lens.bias[layer].double().numpy()
            # |W h| ≲ 1e2 summed over d = 32 in float32: ~1e-4 absolute.
            np.testing.assert_allclose(low.transform(h, layer).double().numpy(), expected, atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(lens.low_rank(32).transform(h, 1), lens.transform(h, 1), atol=5e-4, rtol=1e-4)


def test_the_lre_of_one_subject_returns_its_final_state(llama, tiny_tokenizer):
    """With one subject, ``W h_s + b = z`` by construction; β then adds ``(β − 1) W h_s``. A lens
    that is only its bias gives ``z − W h_s`` instead."""
    lens = fit_attribute_lens(llama, tiny_tokenizer, RELATION, [("fair", "foul")], n_context=1)
    text = RELATION.prompt("fair", [])
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids
    at = subject_position(tiny_tokenizer, text, "fair")
    states = capture(llama, ids)
    z = states[lens.num_layers][0, -1].float()
    for layer in range(lens.num_layers + 1):
        h = states[layer][0, at].float()
        scale = float(z.abs().max())  # float32 Jacobian products: errors ~1e-5 of the state's size
        torch.testing.assert_close(lens.transform(h, layer), z, atol=1e-4 * scale, rtol=0)
        wh = lens.weight[layer] @ h
        if layer < 2:  # (later states at the subject barely reach the last position: W h_s ≈ 0 there)
            assert float(wh.abs().max()) > 1e-2 * scale  # W h_s is not negligible: a bias-only lens fails
        torch.testing.assert_close(lens.with_beta(3.0).transform(h, layer), z + 2.0 * wh, atol=3e-4 * scale, rtol=0)


def _faithfulness_by_hand(lens, model, tokenizer, held_out, position):
    """Per layer, the fraction of ``held_out`` whose lens top-1 at the subject (``position="subject"``)
    or last token equals the model's top-1, one prompt at a time."""
    context = [tuple(p) for p in lens.info["train"]][: lens.info["n_context"]]
    agree = np.zeros(lens.num_layers + 1)
    for subject, _ in held_out:
        text = RELATION.prompt(subject, [p for p in context if p[0] != subject])
        ids = tokenizer(text, return_tensors="pt").input_ids
        at = subject_position(tokenizer, text, subject) if position == "subject" else ids.shape[1] - 1
        states = capture(model, ids)
        own = int(states.logits[0, -1].argmax())
        for layer in range(lens.num_layers + 1):
            agree[layer] += int(lens(states[layer][0, at], layer).argmax()) == own
    return (agree / len(held_out)).tolist()


def test_faithfulness_is_read_at_the_subject(llama, tiny_tokenizer, fitted):
    """An LRE from the one subject "fair" returns its final state there, so at the subject's
    position it agrees with the model on "fair" at every layer; read at the last token it does not."""
    held = list(RELATION.pairs[2:])
    one = fit_attribute_lens(llama, tiny_tokenizer, RELATION, [("fair", "foul")], n_context=1)
    for lens in (fitted, fitted.with_beta(3.0), one):
        score = faithfulness(lens, llama, tiny_tokenizer, RELATION, held, batch_size=3)
        assert score.agreement == _faithfulness_by_hand(lens, llama, tiny_tokenizer, held, "subject")
    right = faithfulness(one, llama, tiny_tokenizer, RELATION, [("fair", "foul")])
    assert right.agreement == [1.0] * (one.num_layers + 1)
    wrong = _faithfulness_by_hand(one, llama, tiny_tokenizer, [("fair", "foul")], "last")
    assert wrong != right.agreement  # the position matters


class _RecordingLock:
    """A lock that remembers whether it is held; a forward hook checks it on every model call."""

    def __init__(self) -> None:
        self.held = False
        self.entered = 0

    def __enter__(self):
        self.held, self.entered = True, self.entered + 1
        return self

    def __exit__(self, *exc):
        self.held = False


@pytest.fixture()
def tabs(llama, tiny_tokenizer, monkeypatch):
    import gradio as gr

    from depthlens import LogitLens

    monkeypatch.setattr(web_readouts, "BUILTIN_RELATIONS", {"fox": RELATION})
    monkeypatch.setattr(web_readouts, "load_relation", lambda name: RELATION)
    lock = _RecordingLock()
    unlocked = []
    handle = llama.register_forward_pre_hook(lambda module, args: unlocked.append(1) if not lock.held else None)
    with gr.Blocks():
        readouts = web_readouts.readout_tabs(llama, tiny_tokenizer, {"logit": LogitLens(llama)}, lock=lock)
    yield readouts, lock, unlocked
    handle.remove()


def test_every_tab_runs_the_model_under_the_apps_lock(tabs):
    readouts, lock, unlocked = tabs
    readouts.dla("Fair is foul, and foul is fair", -1, "", "")
    readouts.patch("Fair is foul, and foul is fair", 1, 2, "identity", "logit", 2)
    readouts.attribute("fox", 2, 1.0, "The fox of fair is")
    assert lock.entered >= 3 and not unlocked


def test_the_beta_slider_changes_the_numbers_shown(tabs, llama, tiny_tokenizer):
    readouts, _, _ = tabs
    train, held = RELATION.split(2)
    lens = fit_attribute_lens(llama, tiny_tokenizer, RELATION, train)
    shown = {}
    for beta in (1.0, 4.0):
        message, curve, heatmap = readouts.attribute("fox", 2, beta, "The fox of fair is")
        expected = faithfulness(lens.with_beta(beta), llama, tiny_tokenizer, RELATION, held[: web_readouts.HELD_OUT])
        assert list(curve.data[0].y) == expected.agreement and list(curve.data[1].y) == expected.lens_correct
        assert f"β = {beta:g}" in message
        shown[beta] = np.asarray(heatmap.data[0].z, dtype=float)
    assert np.abs(shown[1.0] - shown[4.0]).max() > 1e-3  # the trajectory's probabilities move with β


def test_the_app_hands_its_own_lock_to_the_readout_tabs(llama, tiny_tokenizer, monkeypatch):
    from depthlens import LogitLens
    from depthlens.apps import web

    seen = {}
    real_tabs = web.readout_tabs

    def tabs(*args, lock=None, **kwargs):
        seen["lock"] = lock
        return real_tabs(*args, lock=lock, **kwargs)

    class Recording(web.Explorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["explorer"] = self

    monkeypatch.setattr(web, "readout_tabs", tabs)
    monkeypatch.setattr(web, "Explorer", Recording)
    web.build_app(llama, tiny_tokenizer, {"logit": LogitLens(llama)})
    assert seen["lock"] is seen["explorer"].lock
