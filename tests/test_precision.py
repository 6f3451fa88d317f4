"""bfloat16 products where they are fast: the dtype choice, the cached weights, and the error bound.

Both paths are forced here through ``dtype`` or :data:`FAST_BFLOAT16_ENV`, so they are tested on
any CPU, with or without fast bfloat16. No test times anything.

The bound on the bfloat16 decoding: a logit ``z_v = Σ_i W_vi n_i`` (``n`` the normed state,
float32 either way) computed with ``W`` and ``n`` rounded to bfloat16 (relative error at most
``u = 2⁻⁸`` each), a float32 sum, and the result rounded to bfloat16 again, is off by at most
``E_v = (3u + 3u² + d·ε₃₂) Σ_i |W_vi| |n_i|``. A shift ``δ`` of the logits moves ``log Σ exp z``
and ``Σ_v p_v z_v`` each by an amount between ``min δ`` and ``max δ``, so KL(p ‖ q) and the
cross-entropy move by at most ``max δ − min δ ≤ 2 max_v E_v``.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import tiny_model

from depthlens.analysis.evaluate import evaluate
from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import TrainingError, UsageError
from depthlens.lenses.logit import LogitLens
from depthlens.model.architecture import find_parts
from depthlens.model.hidden_states import capture
from depthlens.model.precision import (
    FAST_BFLOAT16_ENV,
    bfloat16_is_fast,
    computing_in,
    float32_logits,
    lowered,
    product_rates,
    resolve_dtype,
    without_subnormals,
)
from depthlens.stats.logit_statistics import LogitStatistics
from depthlens.training.config import TrainConfig

U = 2.0**-8
"""Unit roundoff of bfloat16 (8 significant bits)."""
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def frozen():
    """The tiny Llama, frozen as :func:`~depthlens.model.load.load_model` leaves a model."""
    return tiny_model("llama", seed=0).requires_grad_(False)


@pytest.fixture
def ids():
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("forced", "expected"), [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_follows_the_forced_answer_and_names_win(monkeypatch, forced, expected):
    monkeypatch.setenv(FAST_BFLOAT16_ENV, forced)
    assert bfloat16_is_fast() is (forced == "1")
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16


def test_bad_names_and_settings_are_refused_in_one_line(monkeypatch):
    for bad in ("float16", "bf16", ""):
        with pytest.raises(UsageError, match="auto, float32, bfloat16"):
            resolve_dtype(bad)
    monkeypatch.setenv(FAST_BFLOAT16_ENV, "yes")
    with pytest.raises(UsageError, match=FAST_BFLOAT16_ENV):
        resolve_dtype("auto")
    with pytest.raises(TrainingError, match="unknown dtype"):
        TrainConfig(dtype="half").check()


def test_devices_without_a_timing_answer_without_one(monkeypatch):
    monkeypatch.delenv(FAST_BFLOAT16_ENV, raising=False)
    assert bfloat16_is_fast("meta") is False
    if not torch.cuda.is_available():
        assert bfloat16_is_fast("cuda") is False
    rates = product_rates((4, 8, 16), repeats=1)
    assert set(rates) == {"float32", "bfloat16"} and all(rate > 0 for rate in rates.values())


def test_frozen_weights_are_rounded_once_and_again_after_a_change():
    """Planted bug: a cache that ignores in-place changes keeps decoding with the old weights."""
    weight = torch.nn.Parameter(torch.randn(6, 4), requires_grad=False)
    first = lowered(weight, torch.bfloat16)
    assert lowered(weight, torch.bfloat16) is first
    assert torch.equal(first, weight.detach().bfloat16())
    with torch.no_grad():
        weight.mul_(3.0)
    assert torch.equal(lowered(weight, torch.bfloat16), weight.detach().bfloat16())


def test_bfloat16_products_are_the_rounded_products_and_float32_is_untouched():
    linear = torch.nn.Linear(16, 8).requires_grad_(False)
    x = torch.randn(5, 16)
    with computing_in(torch.bfloat16):
        low = linear(x)
    expected = torch.nn.functional.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected)
    with computing_in(torch.float32):
        assert torch.equal(linear(x), x @ linear.weight.T + linear.bias)
    assert linear(x).dtype == torch.float32


def test_trainable_weights_keep_their_gradients():
    """Planted bug: swapping a weight that requires gradients for its detached bfloat16 copy
    leaves the lens untrained (no gradient reaches it)."""
    linear = torch.nn.Linear(16, 8)
    with computing_in(torch.bfloat16):
        linear(torch.randn(5, 16)).float().square().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.dtype == torch.float32
    assert linear.weight.grad.abs().sum() > 0


def test_the_context_is_per_thread():
    """Another thread using the same module outside the context stays in float32."""
    linear = torch.nn.Linear(16, 8).requires_grad_(False)
    x, seen = torch.randn(5, 16), {}
    entered, leave = threading.Event(), threading.Event()

    def inside() -> None:
        with computing_in(torch.bfloat16):
            seen["inside"] = linear(x).dtype
            entered.set()
            leave.wait(10)

    worker = threading.Thread(target=inside)
    worker.start()
    entered.wait(10)
    seen["outside"] = linear(x).dtype
    leave.set()
    worker.join()
    assert seen == {"inside": torch.bfloat16, "outside": torch.float32}


def test_only_the_decoding_runs_in_the_context_and_each_layer_gets_its_own_logits(frozen, ids):
    """Planted bug: a reused float32 buffer that is not refilled hands on the previous layer's
    logits."""
    lens = LogitLens(frozen)
    states = capture(frozen, ids)
    inside = []

    def decoded():
        for layer, logits in lens.iter_logits(states):
            inside.append(torch.is_autocast_enabled("cpu"))
            yield layer, logits

    for layer, logits in float32_logits(decoded(), torch.bfloat16):
        assert not torch.is_autocast_enabled("cpu")
        assert logits.dtype == torch.float32
        with computing_in(torch.bfloat16):
            expected = lens(states[layer], layer).float()
        assert torch.equal(logits, expected)
    assert inside == [True] * len(states)


def _logit_bound(frozen, states) -> list[torch.Tensor]:
    """Per layer and position, ``2 max_v E_v`` (module docstring) plus float32 slack for the
    statistics (sums of ``vocab`` terms of size up to ``1 + max |z|``)."""
    parts = find_parts(frozen)
    weight = parts.unembedding.weight.detach().abs()
    d, vocab = weight.shape[1], weight.shape[0]
    bounds = []
    for state in states:
        normed = state.reshape(-1, d)
        for module in parts.final_norm:
            normed = module(normed)
        scale = normed.abs() @ weight.T
        logits = parts.decode(state.reshape(-1, d))
        slack = 4 * vocab * EPS32 * (1 + logits.abs().amax(-1))
        bounds.append(2 * (3 * U + 3 * U**2 + d * EPS32) * scale.amax(-1) + slack)
    return bounds


def test_bfloat16_decoding_stays_within_the_derived_bound(frozen, ids):
    states = capture(frozen, ids)
    lens = LogitLens(frozen)
    targets = ids[:, 1:].reshape(-1)
    scorer = LogitStatistics(states.logits[:, :-1], targets)
    exact = {layer: scorer(logits[:, :-1]) for layer, logits in lens.iter_logits(states)}
    bounds = _logit_bound(frozen, [state[:, :-1] for state in states.states])
    low = float32_logits(lens.iter_logits([state[:, :-1] for state in states.states]), torch.bfloat16)
    for layer, logits in low:
        scores = scorer(logits)
        assert (scores.kl - exact[layer].kl).abs().le(bounds[layer]).all()
        assert (scores.ce - exact[layer].ce).abs().le(bounds[layer]).all()
        assert not torch.equal(scores.kl, exact[layer].kl) or layer == len(states) - 1


def test_trajectories_in_bfloat16_stay_within_the_derived_bound(frozen, ids):
    lens = LogitLens(frozen)
    states = capture(frozen, ids)
    exact = Trajectory.from_states(lens, states)
    low = Trajectory.from_states(lens, states, dtype="bfloat16")
    bounds = torch.stack(_logit_bound(frozen, states.states)).view_as(exact.kl_to_final)
    assert (low.kl_to_final - exact.kl_to_final).abs().le(bounds).all()
    assert (low.ce - exact.ce).abs().nan_to_num(0.0).le(bounds).all()


@pytest.mark.parametrize("forced", ["0", "1"])
def test_evaluation_records_its_dtype_and_agrees_at_the_output(frozen, monkeypatch, forced):
    """With products in bfloat16 for the forward pass too, the logit lens at layer L decodes
    exactly what the model output, so its KL is 0 up to the float32 rounding of the statistics
    (sums of 320 terms of size up to ``1 + max |z|``) on either path."""
    monkeypatch.setenv(FAST_BFLOAT16_ENV, forced)
    chunks = list(torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2)))
    with pytest.warns(UserWarning, match="no bootstrap intervals"):
        report = evaluate(frozen, {"logit": LogitLens(frozen)}, chunks, [15, 15], groups=2, progress=False, dtype="auto")
    assert report.meta["dtype"] == ("bfloat16" if forced == "1" else "float32")
    kl = report.mean("logit", "kl")
    largest = frozen(torch.stack(chunks)).logits.abs().max()
    assert 0.0 <= kl[-1] <= 4 * 320 * EPS32 * (1 + largest)
    assert all(value > 0 for value in kl[:-1])


def test_the_command_line_offers_the_same_dtypes():
    """``--dtype`` spells its choices out, so that building the parser does not import torch."""
    from depthlens.apps.options import DTYPE_CHOICES
    from depthlens.model.precision import DTYPE_NAMES

    assert DTYPE_CHOICES == DTYPE_NAMES


def test_show_computes_in_the_dtype_it_is_given(tiny_model_dir, tiny_tokenizer, tmp_path):
    """``depthlens show --dtype bfloat16`` writes the bfloat16 trajectory, not the float32 one.
    Planted bug: the option parsed but not passed on."""
    import pandas as pd

    from depthlens.apps.cli import main

    text, out = "Fair is foul, and foul is fair", tmp_path / "table.csv"
    assert main(["show", text, "--model", str(tiny_model_dir), "--lens", "logit", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    written = pd.read_csv(out, keep_default_na=False, na_values=[""]).value.to_numpy()
    model = tiny_model("llama").requires_grad_(False)
    frames = {dtype: Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), text, dtype=dtype).to_dataframe()
              for dtype in ("float32", "bfloat16")}
    assert written == pytest.approx(frames["bfloat16"].value.to_numpy(), nan_ok=True, abs=1e-6)
    assert written != pytest.approx(frames["float32"].value.to_numpy(), nan_ok=True, abs=1e-6)


@pytest.mark.parametrize(("model_type", "forward"), [("llama", torch.bfloat16), ("gemma3_text", torch.float32)])
def test_families_whose_forward_drifts_keep_it_in_float32(model_type, forward):
    """With products in bfloat16, the model's own linear layers compute in bfloat16, except for the
    families whose rule keeps the forward pass in float32 (gemma3); evaluation, trajectories and a
    training step all follow the rule, and the decoding stays bfloat16."""
    from depthlens.lenses.tuned import TunedLens
    from depthlens.training.optim import make_optimizers
    from depthlens.training.train import train_step

    model = tiny_model(model_type, seed=0).requires_grad_(False)
    parts = find_parts(model)
    assert parts.forward_dtype(torch.bfloat16) == forward and parts.forward_dtype(torch.float32) == torch.float32
    seen: list[torch.dtype] = []
    first_linear = next(m for m in parts.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    decoded: list[torch.dtype] = []
    parts.unembedding.register_forward_hook(lambda module, args, out: decoded.append(out.dtype))
    chunks = list(torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2)))
    with pytest.warns(UserWarning, match="no bootstrap intervals"):
        evaluate(model, {"logit": LogitLens(model)}, chunks, [15, 15], groups=2, progress=False, dtype="bfloat16")
    Trajectory.from_ids(model, LogitLens(model), torch.stack(chunks), dtype="bfloat16")
    lens = TunedLens(model)
    config = TrainConfig(batch_tokens=32, chunk_len=16)
    train_step(lens, model, torch.stack(chunks), make_optimizers(lens, config), config, products=torch.bfloat16)
    assert len(seen) == 3 and set(seen) == {forward}
    assert torch.bfloat16 in decoded


@pytest.mark.parametrize("trainable", [False, True])
def test_translators_run_in_float32_inside_a_bfloat16_block(frozen, trainable):
    """A translator's output joins the float32 residual stream, so it is computed in float32 even
    with bfloat16 products: the transform is bit for bit the float32 one, on states scaled to
    gemma3's magnitudes (thousands), where bfloat16's rounding of the product alone would move
    each coordinate by up to 2⁻⁹ of its size. Planted bug: translators left under autocast."""
    from depthlens.lenses.tuned import TunedLens

    lens = TunedLens(frozen)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.copy_(0.05 * torch.randn(translator.weight.shape, generator=generator))
            translator.bias.copy_(torch.randn(translator.bias.shape, generator=generator))
    lens.requires_grad_(trainable)
    hidden = 1000 * torch.randn(2, 24, lens.parts.d_model, generator=generator)
    exact = lens.transform(hidden, 1)
    with computing_in(torch.bfloat16):
        low = lens.transform(hidden, 1)
        decoded = lens(hidden, 1)
    assert low.dtype == torch.float32 and torch.equal(low, exact)
    assert decoded.dtype == torch.bfloat16


@pytest.mark.parametrize(("model_type", "head"), [("llama", torch.bfloat16), ("gemma3_text", torch.float32)])
def test_the_last_layer_decodes_in_the_forward_passes_precision(model_type, head, ids):
    """The last layer's decoding is the model's output head: float32 for a family whose forward
    pass stays float32 (gemma3), so the lens at layer L still reproduces its float32 output
    exactly; bfloat16 elsewhere, like the model's own head. Earlier layers decode in bfloat16
    either way. Planted bug: the last layer decoded like the others."""
    model = tiny_model(model_type, seed=0).requires_grad_(False)
    lens = LogitLens(model)
    states = capture(model, ids)
    last = lens.num_layers
    exact = lens(states[last], last)
    with computing_in(torch.bfloat16):
        low = {layer: logits for layer, logits in lens.iter_logits(states, [0, last])}
    assert low[0].dtype == torch.bfloat16 and low[last].dtype == head
    assert torch.equal(low[last].float(), exact) == (head == torch.float32)


def test_subnormals_are_flushed_inside_the_block_and_kept_after_it():
    """Planted bugs: the flag never set, or left set after the block."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    small = torch.tensor([1e-30])
    assert float(small * 1e-10) > 0  # 1e-40 is subnormal, kept by default
    with without_subnormals():
        assert float(small * 1e-10) == 0
        assert float(small * 1e-5) == pytest.approx(1e-35)
    assert float(small * 1e-10) > 0
