"""The Jacobian lens: its fit against transformer-lens 4.3's ``JacobianLens`` and against a
brute-force Jacobian, its reading, and its two file formats.

Tolerances come from the arithmetic. ``EPS32 = 2⁻²³`` is float32's unit of rounding.

- transformer-lens (float32) against depthlens (float32) on the same model and tokens: both sum
  the same exact quantity with different float32 operation orders (transformer-lens runs the whole
  prompt with eager attention; depthlens runs the skipped prefix as a key–value cache). The longest
  chain of float32 reductions from a source to a target in these 3-block width-32 models is, per
  block, the norm over d = 32, the q·k dot product over 8 head dims, softmax and A·V over ≤ 24
  positions, the output projection over 32 and the MLP's 32 + 64: about 200 terms, 3 blocks, plus
  ≤ 24 target positions and ≤ 24 sources: K ≈ 650. Each side's worst-case error is K·EPS32 of the
  entries' scale (max |J|, about 1), so the two agree to ``2·K·EPS32·max|J|`` ≈ 1.6e-4·max|J|.
  A planted bug moves entries by order one.
- depthlens against brute force, both in float64: the model runs in float64 but depthlens keeps
  its sums in float32, as the reference does: one rounding per prompt's row, one per addition of
  ``P`` prompts and one for the division, ``(P + 2)·EPS32·max|J|``.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import build_tiny_tokenizer
from tiny_models import FAMILY_DEFAULT, VOCAB, tiny_model
from transformers import AutoTokenizer

from depthlens import LensFileError, LogitLens, capture, find_parts
from depthlens.errors import TrainingError
from depthlens.lenses.jacobian import JacobianLens, detect
from depthlens.lenses.jacobian_artifact import write_artifact
from depthlens.lenses.jacobian_fit import fit_jacobian_lens
from depthlens.lenses.registry import load_readout
from depthlens.model.hooks import hooked, replace

EPS32 = 2.0**-23
REDUCTION_TERMS = 650
"""K of the module docstring: the longest chain of float32 reductions in a tiny model's fit."""
PROMPTS = [
    "When shall we three meet again in thunder, lightning, or in rain? When the battle's lost and won.",
    "Fair is foul, and foul is fair: hover through the fog and filthy air, said the witches.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
]
SKIP, MAX_LEN = 5, 24
STRONG = {"initializer_range": 0.3}
"""Weights 15× the default scale, so that every J is far from the identity and a transposed or
misplaced matrix is far off."""
BRIDGED = {"llama": {}, "gpt2": {"num_key_value_heads": FAMILY_DEFAULT}, "gemma3_text": {}}
"""Families fitted by both libraries, and their config beside :data:`STRONG`: transformer-lens's
GPT-2 bridge reads a ``num_key_value_heads`` that GPT-2 itself ignores, so GPT-2 gets none."""


def _bridge(model, tmp_path):
    """A transformer-lens bridge around ``model`` with no download: config and tokenizer from a
    local folder, weights from the model object itself."""
    from transformer_lens.model_bridge import TransformerBridge

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=model, tokenizer=tokenizer, device="cpu")
    return bridge.eval()


def _tl_fit(bridge, skip=SKIP, max_len=MAX_LEN):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    return TLJacobianLens.fit(bridge, PROMPTS, corpus="tests", max_seq_len=max_len,
                              skip_first_positions=skip, show_progress=False)


@pytest.fixture(scope="module", params=sorted(BRIDGED))
def fitted_pair(request, tmp_path_factory):
    """The same tiny model fitted by transformer-lens and by depthlens, on the same tokens. The
    bridge swaps the blocks of the model it wraps for its own (which keep no key–value cache), so
    depthlens gets a second copy with the same weights."""
    config = {**STRONG, **BRIDGED[request.param]}
    bridge = _bridge(tiny_model(request.param, **config), tmp_path_factory.mktemp(request.param))
    model = tiny_model(request.param, **config)
    theirs = _tl_fit(bridge)
    tokens = [bridge.to_tokens(prompt)[0] for prompt in PROMPTS]
    parts = find_parts(model)
    ours = fit_jacobian_lens(model, tokens, states=range(1, parts.num_layers), skip_first=SKIP,
                             max_seq_len=MAX_LEN, prompt_batch=2)
    return model, bridge, theirs, ours


def test_fit_matches_transformer_lens(fitted_pair):
    _, _, theirs, ours = fitted_pair
    assert theirs.source_layers == [layer - 1 for layer in ours.states] == [0, 1]
    assert ours.n_prompts == theirs.n_prompts == len(PROMPTS)
    for layer in theirs.source_layers:
        expected, actual = theirs.jacobians[layer], ours.matrix(layer + 1)
        scale = expected.abs().max()
        assert (actual - expected).abs().max() <= 2 * REDUCTION_TERMS * EPS32 * scale
        assert (expected - torch.eye(expected.shape[0])).abs().max() > 0.1, "J must differ from I to test anything"


def test_reading_matches_transformer_lens(fitted_pair, tmp_path):
    """Our matrices, written as an artifact and read by transformer-lens, give its readout the same
    logits as ours: the layer numbering and ``W_U · norm(J h)`` agree."""
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    model, bridge, _, ours = fitted_pair
    path = ours.save_artifact(tmp_path / "lens.pt", dtype=torch.float32)
    theirs = TLJacobianLens.load(str(path))
    ids = bridge.to_tokens(PROMPTS[0])
    readout = theirs.readout(bridge, ids, return_full_logits=True)
    states = capture(model, ids)
    for state in ours.states:
        _, logits = next(ours.iter_logits(states, [state]))
        expected = readout.lens_logits[state - 1]
        scale = expected.abs().max()
        assert (logits[0] - expected).abs().max() <= 2 * REDUCTION_TERMS * EPS32 * scale


def _brute_force(model, ids: torch.Tensor, state: int, skip: int) -> torch.Tensor:
    """``1/|V| Σ_t Σ_t' ∂h_L[t'] / ∂h_state[t]`` from the full Jacobian of one whole forward pass."""
    parts = find_parts(model)
    last = f"resid.{parts.num_layers}"
    with torch.no_grad(), hooked(parts, read=[f"resid.{state}"]) as values:
        model(input_ids=ids[None], use_cache=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with hooked(parts, read=[last], edits=[replace(f"resid.{state}", x)]) as out:
            model(input_ids=ids[None], use_cache=False)
        return out[last]

    full = torch.autograd.functional.jacobian(forward, values[f"resid.{state}"])[0, :, :, 0]
    positions = range(skip, len(ids) - 1)
    return sum(full[target, :, source] for target in positions for source in positions) / len(positions)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fit_equals_brute_force_jacobian(family):
    model = tiny_model(family, **STRONG).double()
    torch.manual_seed(1)
    sequences = [torch.randint(3, VOCAB, (length,)) for length in (14, 11, 9)]
    lens = fit_jacobian_lens(model, sequences, skip_first=3, prompt_batch=2, dims=13)
    assert lens.states == [0, 1, 2]
    for state in lens.states:
        expected = sum(_brute_force(model, ids, state, 3) for ids in sequences) / len(sequences)
        scale = expected.abs().max()
        assert (lens.matrix(state).double() - expected).abs().max() <= (len(sequences) + 2) * EPS32 * scale


def test_short_prompts_are_skipped_and_none_left_is_an_error():
    model = tiny_model("llama")
    lens = fit_jacobian_lens(model, [torch.arange(3, 12), torch.arange(3, 7)], skip_first=4, states=[1])
    assert (lens.n_prompts, lens.fit_info["skipped"]) == (1, 1)
    with pytest.raises(TrainingError, match="long enough"):
        fit_jacobian_lens(model, [torch.arange(3, 8)], skip_first=4)
    assert all(p.requires_grad for p in model.parameters()), "the fit restores the weights' flags"


def test_identity_matrices_are_the_logit_lens():
    model = tiny_model("llama")
    parts = find_parts(model)
    eye = torch.eye(parts.d_model)
    lens = JacobianLens(model, {state: eye for state in range(parts.num_layers)}, n_prompts=1)
    states = capture(model, torch.randint(0, VOCAB, (2, 7)))
    logit = dict(LogitLens(model).iter_logits(states))
    for layer, logits in lens.iter_logits(states):
        assert torch.equal(logits, logit[layer])
    skewed = JacobianLens(model, {1: 2 * eye}, n_prompts=1)
    assert skewed.identity_layers == [0, 2]
    _, doubled = next(skewed.iter_logits(states, [1]))
    assert torch.allclose(doubled, parts.decode(2 * states[1]))


@pytest.fixture(scope="module")
def small_lens():
    model = tiny_model("llama")
    lens = fit_jacobian_lens(model, [torch.arange(3, 20)], skip_first=2)
    return model, lens


def test_folder_round_trip_and_registry(small_lens, tmp_path):
    model, lens = small_lens
    folder = lens.save_pretrained(tmp_path / "jlens")
    loaded = load_readout(folder, model)
    assert isinstance(loaded, JacobianLens) and loaded.states == lens.states == [0, 1, 2]
    for state in lens.states:
        assert torch.equal(loaded.matrix(state), lens.matrix(state))
    assert loaded.n_prompts == 1 and loaded.fit_info["skip_first"] == 2
    for other in (tiny_model("llama", seed=5), tiny_model("llama", hidden_size=64)):
        with pytest.raises(LensFileError, match="fitted for"):
            JacobianLens.from_pretrained(folder, other)


def test_artifact_round_trip_both_ways(small_lens, tmp_path):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    model, lens = small_lens
    path = lens.save_artifact(tmp_path / "ours.pt")
    assert detect(path) and not detect(tmp_path)
    theirs = TLJacobianLens.load(str(path))
    assert theirs.source_layers == [0, 1] and theirs.n_prompts == 1
    for layer in theirs.source_layers:
        assert torch.equal(theirs.jacobians[layer], lens.matrix(layer + 1).half().float())
    back = load_readout(path, model)
    assert back.states == [1, 2] and back.identity_layers == [0]
    assert all(torch.equal(back.matrix(s), lens.matrix(s).half().float()) for s in back.states)
    TLJacobianLens({0: torch.randn(32, 32), 1: torch.randn(32, 32)}, n_prompts=4, d_model=32).save(str(tmp_path / "tl.pt"))
    from_tl = JacobianLens.from_artifact(tmp_path / "tl.pt", model)
    reloaded = TLJacobianLens.load(str(tmp_path / "tl.pt"))
    assert from_tl.states == [1, 2] and from_tl.n_prompts == 4
    assert all(torch.equal(from_tl.matrix(layer + 1), reloaded.jacobians[layer]) for layer in (0, 1))


@pytest.mark.parametrize(
    ("matrices", "d_model", "message"),
    [
        ({0: torch.zeros(32, 32)}, 48, "residual width of 48"),
        ({0: torch.zeros(32, 31)}, 32, r"expected \(32, 32\)"),
        ({2: torch.zeros(32, 32)}, 32, "source blocks are 0 … 1"),
    ],
)
def test_artifact_that_does_not_fit_the_model_is_refused(small_lens, tmp_path, matrices, d_model, message):
    model, _ = small_lens
    path = tmp_path / "bad.pt"
    torch.save({"J": matrices, "n_prompts": 1, "source_layers": sorted(matrices), "d_model": d_model}, path)
    with pytest.raises(LensFileError, match=message):
        JacobianLens.from_artifact(path, model)


def test_artifact_with_code_or_without_j_is_refused(small_lens, tmp_path):
    model, _ = small_lens
    pickled = tmp_path / "code.pt"
    torch.save({"J": {0: torch.zeros(32, 32)}, "d_model": 32, "hook": pickle.loads}, pickled)
    with pytest.raises(LensFileError, match="weights_only"):
        JacobianLens.from_artifact(pickled, model)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"jacobian_sum": {0: torch.zeros(32, 32)}, "n_done": 2}, checkpoint)
    with pytest.raises(LensFileError, match="fit checkpoint"):
        JacobianLens.from_artifact(checkpoint, model)
    with pytest.raises(LensFileError, match="overflows"):
        write_artifact(tmp_path / "big.pt", {1: torch.full((2, 2), 1e6)}, n_prompts=1, d_model=2)
