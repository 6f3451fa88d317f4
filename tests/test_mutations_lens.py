"""Tests that fail when lens files, layer checks, Muon or the printed summaries are wrong.

Each test here was written against a deliberately planted bug that the older tests let through
(see ``benchmarks/mutation.py`` for the mutation check that keeps these holes closed).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LayerError, LensFileError, LogitLens, TunedLens, capture, find_parts
from depthlens.analysis.trajectory import Trajectory, TrajectoryError
from depthlens.lenses.lens_file import fingerprint
from depthlens.training.optim import NEWTON_SCHULZ, Float32Muon

TEXT = "Fair is foul, and foul is fair: hover through the fog"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def states(model):
    return capture(model, torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_covers_the_final_norm(model):
    """Editing only the final norm's weight changes what every layer decodes to, so the lens
    must no longer load: the fingerprint has to cover the norm, not just the unembedding."""
    changed = tiny_model("llama", seed=0)
    with torch.no_grad():
        changed.model.norm.weight[3] += 0.25
    assert fingerprint(find_parts(changed)) != fingerprint(find_parts(model))


@pytest.mark.parametrize("constant", ["logit_multiplier", "logit_divisor", "logit_softcap"])
def test_fingerprint_covers_the_logit_constants(model, constant):
    parts = find_parts(model)
    base = fingerprint(parts)
    for value in (2.0, 30.0):
        assert fingerprint(dataclasses.replace(parts, **{constant: value})) != base, value
    assert fingerprint(dataclasses.replace(parts, **{constant: 2.0})) != fingerprint(
        dataclasses.replace(parts, **{constant: 30.0}))


def test_a_model_with_another_soft_cap_refuses_the_lens(tmp_path):
    """Same weights, another ``final_logit_softcapping``: the decoded distributions differ, so a
    lens trained for one must not load onto the other."""
    capped = tiny_model("gemma2", seed=0, final_logit_softcapping=30.0)
    other = tiny_model("gemma2", seed=0, final_logit_softcapping=5.0)
    assert torch.equal(capped.lm_head.weight, other.lm_head.weight)
    TunedLens(capped).save_pretrained(tmp_path / "lens")
    TunedLens.from_pretrained(tmp_path / "lens", tiny_model("gemma2", seed=0, final_logit_softcapping=30.0))
    with pytest.raises(LensFileError, match="trained for"):
        TunedLens.from_pretrained(tmp_path / "lens", other)


def test_fingerprint_agrees_across_float32_and_bfloat16_but_not_float16(model):
    """float32 and bfloat16 copies of one model share a fingerprint. A float16 copy does not:
    rounding through float16 first moves about 6% of the weights to another bfloat16 value
    (double rounding at bfloat16 ties), and no exact hash can agree on all three."""
    parts = find_parts(model)
    assert fingerprint(find_parts(tiny_model("llama", seed=0).to(torch.bfloat16))) == fingerprint(parts)
    half = find_parts(tiny_model("llama", seed=0).to(torch.float16))
    assert fingerprint(half) != fingerprint(parts)


def test_the_refusal_names_both_models(model, tmp_path):
    lens_model = tiny_model("llama", seed=0)
    lens_model.config._name_or_path = "the-lens-model"
    TunedLens(lens_model).save_pretrained(tmp_path / "lens")
    other = tiny_model("llama", seed=1)
    other.config._name_or_path = "the-other-model"
    with pytest.raises(LensFileError) as caught:
        TunedLens.from_pretrained(tmp_path / "lens", other)
    message = str(caught.value)
    assert "'the-lens-model'" in message and "'the-other-model'" in message
    assert message.index("the-lens-model") < message.index("the-other-model")
    assert "\n" not in message


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("layer", [-1, -4, 4])
def test_layers_outside_0_to_L_are_refused(model, states, layer):
    """Negative layers must not wrap around to the end (states[-1] would silently be layer L)."""
    for lens in (LogitLens(model), TunedLens(model)):
        with pytest.raises(LayerError, match=r"layer -?\d+ is out of range: this model has layers 0 … 3"):
            lens(states[0], layer)
        with pytest.raises(LayerError):
            list(lens.iter_logits(states, [0, layer]))
    with pytest.raises(TrajectoryError, match="out of range"):
        Trajectory.from_states(LogitLens(model), states, layers=[layer])


def test_layer_0_and_layer_L_are_accepted(model, states):
    lens = TunedLens(model)
    assert lens(states[0], 0).shape == (2, 5, VOCAB)
    assert torch.allclose(lens(states[3], 3), states.logits, atol=1e-5)


# --------------------------------------------------------------------------- Muon


def _reference_muon_steps(grads: list[torch.Tensor], lr: float, momentum: float) -> torch.Tensor:
    """Muon in float64, written out from its definition: Nesterov momentum, five quintic
    Newton–Schulz steps (torch.optim.Muon's coefficients), update scaled by 0.2·√max(m, n)."""
    a, b, c = NEWTON_SCHULZ
    weight = torch.zeros_like(grads[0], dtype=torch.float64)
    buffer = torch.zeros_like(weight)
    for grad in grads:
        grad = grad.double()
        buffer = momentum * buffer + grad
        update = grad + momentum * buffer
        x = update / (update.norm() + 1e-7)
        wide = x.shape[0] <= x.shape[1]
        x = x if wide else x.T
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x if wide else x.T
        weight = weight - lr * 0.2 * math.sqrt(max(weight.shape)) * x
    return weight


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_muon_follows_its_definition_with_momentum_0_95(shape):
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=generator) for _ in range(4)]
    parameter = torch.nn.Parameter(torch.zeros(*shape))
    optimizer = Float32Muon([parameter], lr=0.01)
    for grad in grads:
        parameter.grad = grad.clone()
        optimizer.step()
    expected = _reference_muon_steps(grads, lr=0.01, momentum=0.95)
    assert (parameter.detach().double() - expected).abs().max() < 1e-4 * expected.abs().max()
    wrong = _reference_muon_steps(grads, lr=0.01, momentum=0.9)
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()  # the check can tell


# --------------------------------------------------------------------------- printed summaries


def _summary_numbers(line: str) -> list[float]:
    return [float(field) for field in line.split()[1:6]]


def test_summary_prints_the_means_of_the_trajectory(model, tiny_tokenizer):
    lens = TunedLens(model)
    with torch.no_grad():
        for translator in lens.translators:
            translator.bias.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    traj = Trajectory.from_text(model, tiny_tokenizer, lens, TEXT)
    lines = traj.summary().splitlines()
    assert len(lines) == 2 + len(traj.layers)
    for row, line in enumerate(lines[2:]):
        expected = [
            traj.entropy[row, 0].nanmean().item(),
            traj.kl_to_final[row, 0].nanmean().item(),
            traj.ce[row, 0].nanmean().item(),
            traj.final_top1_rank[row, 0].double().median().item(),
            traj.max_prob[row, 0].nanmean().item(),
        ]
        got = _summary_numbers(line)
        for value, want, places in zip(got, expected, (3, 3, 3, 0, 3)):
            assert value == pytest.approx(want, abs=0.6 * 10**-places), (row, line)
    assert _summary_numbers(lines[-1])[1] == pytest.approx(0.0, abs=1e-3)  # the output row is the model
    assert len({tuple(_summary_numbers(line)) for line in lines[2:]}) > 1


def test_show_prints_the_same_numbers_as_the_library(tiny_model_dir, tiny_tokenizer, capsys):
    from depthlens.apps.cli import main

    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--lens", "logit"]) == 0
    printed = capsys.readouterr().out.splitlines()
    same = tiny_model("llama")
    expected = Trajectory.from_text(same, tiny_tokenizer, LogitLens(same), TEXT)
    rows = expected.summary().splitlines()[2:]
    assert [_summary_numbers(line) for line in printed[2:]] == [_summary_numbers(line) for line in rows]
    assert [line.split()[-1] for line in printed[2:]] == [line.split()[-1] for line in rows]


def test_table_every_and_width(tiny_model_dir, tiny_tokenizer, capsys):
    from depthlens.apps.cli import main
    from depthlens.text.tokens import token_label

    text = "Fair is foul, and foul is fair"
    assert main(["table", text, "--model", str(tiny_model_dir), "--every", "2", "--width", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in lines] == ["0", "2", "output"]
    same = tiny_model("llama")
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids
    _, top1 = LogitLens(same).top_k(capture(same, ids), k=1, layers=[0, 2, 3])
    for line, row in zip(lines, top1[:, 0, :, 0].tolist()):
        cells = [cell.strip() for cell in line.split("│")[2:-1]]
        assert cells == [token_label(tiny_tokenizer, t, 3) for t in row]
        assert max(len(cell) for cell in cells) <= 3


# --------------------------------------------------------------------------- lens files, in detail


def _saved(model, tmp_path, name="the-lens-model"):
    model.config._name_or_path = name
    lens = TunedLens(model)
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return lens, lens.save_pretrained(tmp_path / "lens")


def _rewrite_config(path, change):
    import json

    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def test_config_json_is_sorted_indented_and_versioned(tmp_path):
    import json

    _, path = _saved(tiny_model("llama", seed=0), tmp_path)
    text = (path / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config["format"] == "depthlens-lens" and config["format_version"] == 1


def test_a_config_without_format_version_still_loads(tmp_path):
    model = tiny_model("llama", seed=0)
    lens, path = _saved(model, tmp_path)
    _rewrite_config(path, lambda c: c.pop("format_version"))
    loaded = TunedLens.from_pretrained(path, model)
    assert torch.equal(loaded.translators[1].weight, lens.translators[1].weight)


def test_the_refusal_describes_both_models_in_full(tmp_path):
    lens_model = tiny_model("llama", seed=0)
    _, path = _saved(lens_model, tmp_path)
    other = tiny_model("llama", seed=1)
    other.config._name_or_path = "the-other-model"
    with pytest.raises(LensFileError) as caught:
        TunedLens.from_pretrained(path, other)
    ours, theirs = fingerprint(find_parts(lens_model))[:12], fingerprint(find_parts(other))[:12]
    assert str(caught.value) == (
        f"the lens in {path} was trained for 'the-lens-model' (llama, 3 layers, vocab {VOCAB}, fingerprint {ours}), "
        f"but the model given is 'the-other-model' (llama, 3 layers, vocab {VOCAB}, fingerprint {theirs}); "
        "load the model it was trained for or train a new lens")


def test_a_config_that_names_no_model_is_described_with_question_marks(tmp_path):
    model = tiny_model("llama", seed=0)
    _, path = _saved(model, tmp_path)
    _rewrite_config(path, lambda c: c.pop("model"))
    with pytest.raises(LensFileError, match=r"trained for '\?' \(\?, \? layers, vocab \?, fingerprint \?\), but"):
        TunedLens.from_pretrained(path, model)


def test_another_lens_type_is_named(tmp_path):
    model = tiny_model("llama", seed=0)
    _, path = _saved(model, tmp_path)
    _rewrite_config(path, lambda c: c.update(lens_type="attribute"))
    with pytest.raises(LensFileError, match=f"^{path} holds a 'attribute' lens, not a 'tuned' lens$"):
        TunedLens.from_pretrained(path, model)


def _rewrite_weights(path, tensors_or_bytes):
    import hashlib

    from safetensors.torch import save

    payload = tensors_or_bytes if isinstance(tensors_or_bytes, bytes) else save(tensors_or_bytes)
    (path / "model.safetensors").write_bytes(payload)
    _rewrite_config(path, lambda c: c.update(weights_sha256=hashlib.sha256(payload).hexdigest()))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    model = tiny_model("llama", seed=0)
    lens, path = _saved(model, tmp_path)
    tensors = {k: v.clone() for k, v in lens.state_dict().items()}
    del tensors["translators.2.bias"]
    _rewrite_weights(path, tensors)
    with pytest.raises(LensFileError, match=rf"^{path} has the wrong tensors \(missing \['translators.2.bias'\], unexpected \[\]\)$"):
        TunedLens.from_pretrained(path, model)
    tensors = {k: v.clone() for k, v in lens.state_dict().items()}
    tensors.update({f"extra.{i}": torch.zeros(1) for i in range(5)})
    _rewrite_weights(path, tensors)
    with pytest.raises(LensFileError, match=r"unexpected \['extra.0', 'extra.1', 'extra.2'\]\)$"):
        TunedLens.from_pretrained(path, model)
    _rewrite_weights(path, {"other": torch.zeros(1)})
    with pytest.raises(LensFileError, match=r"missing \['translators.0.bias', 'translators.0.weight', 'translators.1.bias'\], unexpected \['other'\]"):
        TunedLens.from_pretrained(path, model)


def test_a_checksummed_file_that_is_not_safetensors_is_named(tmp_path):
    model = tiny_model("llama", seed=0)
    _, path = _saved(model, tmp_path)
    _rewrite_weights(path, b"\x08\x00\x00\x00\x00\x00\x00\x00{not a h")
    with pytest.raises(LensFileError, match=r"model.safetensors is not a valid safetensors file \("):
        TunedLens.from_pretrained(path, model)


def test_lens_options_are_honoured(model, states):
    """``vocab=`` picks logits, ``layers=`` picks layers, ``k`` defaults to 1, any float dtype
    goes in, and a lens can be built from the model's parts."""
    lens = TunedLens(find_parts(model))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([5, 0, 17])
    assert torch.allclose(lens(states[1], 1, vocab=ids), lens(states[1], 1)[..., ids], atol=1e-5)
    assert torch.allclose(lens(states[1].double(), 1), lens(states[1], 1), atol=1e-5)
    assert lens.stack_logits(states, layers=[2, 0]).shape == (2, 2, 5, VOCAB)
    assert torch.equal(lens.stack_logits(states, layers=[2, 0])[0], lens(states[2], 2))
    values, ids = lens.top_k(states, layers=[1])
    assert values.shape == ids.shape == (1, 2, 5, 1)
    assert torch.equal(ids[0, ..., 0], lens(states[1], 1).argmax(-1))
