"""Patchscopes: a source state written into a target prompt, read at every layer or generated from."""

import pytest
import torch
from tiny_models import tiny_model

from depthlens import TunedLens, capture, find_parts
from depthlens.analysis.generate import generate_from_layer
from depthlens.analysis.patchscope import (
    IDENTITY_PROMPT,
    Patch,
    fit_affine_map,
    paired_states,
    patchscope,
    patchscope_generate,
    token_identity_curve,
    tuned_map,
)
from depthlens.errors import LayerError, PatchscopeError
from depthlens.lenses.logit import LogitLens
from depthlens.model.hooks import hooked, replace

SOURCE = "When shall we three meet again in thunder"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _ids(tokenizer, text):
    return tokenizer(text, return_tensors="pt").input_ids


def test_patching_a_state_into_its_own_run_changes_nothing(llama, tiny_tokenizer):
    ids = _ids(tiny_tokenizer, SOURCE)
    result = patchscope(llama, ids, ids, Patch(source_layer=2, source_position=4, target_position=4))
    torch.testing.assert_close(result.states.logits, capture(llama, ids).logits)


def test_a_last_layer_patch_is_decoded_as_the_source_would_be(llama, tiny_tokenizer):
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    result = patchscope(llama, source, target, Patch(source_layer=3, source_position=5))
    clean = capture(llama, source)
    torch.testing.assert_close(result.states.logits[0, -1], clean.logits[0, 5], atol=1e-5, rtol=1e-5)
    trajectory = result.trajectory(tokenizer=tiny_tokenizer)
    assert trajectory.layers == (0, 1, 2, 3) and trajectory.top_ids.shape[2] == target.shape[1]
    ids, probs = result.top(3)
    assert ids[0] == int(clean.logits[0, 5].argmax()) and probs == sorted(probs, reverse=True)


def test_the_identity_curve_reads_back_the_next_token_at_the_last_layer(llama, tiny_tokenizer):
    texts = [SOURCE, "Fair is foul"]
    curve = token_identity_curve(llama, tiny_tokenizer, texts, layers=[0, 3])
    assert curve.layers == [0, 3] and curve.next_token[1] == 1.0
    target = _ids(tiny_tokenizer, IDENTITY_PROMPT + " ->")
    slot = _ids(tiny_tokenizer, IDENTITY_PROMPT).shape[1] - 1
    parts = find_parts(llama)
    for index, layer in enumerate([0, 3]):  # one source position at a time, written out
        same, next_same, count = 0, 0, 0
        for text in texts:
            ids = _ids(tiny_tokenizer, text)
            clean = capture(llama, ids, layers=[layer])
            for position in range(1, ids.shape[1]):
                state = clean[layer][:, position][:, None]
                with torch.no_grad(), hooked(parts, edits=[replace(f"resid.{layer}", state, positions=[slot])]):
                    logits = llama(input_ids=target, use_cache=False).logits[0]
                same += int(logits[-1].argmax()) == int(ids[0, position])
                next_same += int(logits[slot].argmax()) == int(clean.logits[0, position].argmax())
                count += 1
        assert curve.positions == count
        assert curve.identity[index] == pytest.approx(same / count) and curve.next_token[index] == pytest.approx(next_same / count)
    assert curve.to_rows()[0]["source_layer"] == 0


def test_generation_applies_the_patch_once_and_reads_it_through_the_cache(llama, tiny_tokenizer):
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    patch = Patch(source_layer=1, source_position=3)
    patched = patchscope_generate(llama, source, target, patch, max_new_tokens=6)
    state = capture(llama, source, layers=[1])[1][:, 3]
    edit = replace("resid.1", state[:, None], positions=[target.shape[1] - 1], once=True)
    slow = generate_from_layer(
        llama, LogitLens(llama), target, layer=3, max_new_tokens=6, edits=[edit], use_cache=False
    )
    assert torch.equal(patched.tokens, slow.tokens)
    assert int(patched.tokens[0, 0]) == int(patchscope(llama, source, target, patch).states.logits[0, -1].argmax())


def test_a_tuned_translator_as_the_map(llama, tiny_tokenizer):
    lens = TunedLens(llama)
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    plain = patchscope(llama, source, target, Patch(1, 2, target_layer=3))
    through = patchscope(llama, source, target, Patch(1, 2, target_layer=3), mapping=tuned_map(lens, 1))
    torch.testing.assert_close(plain.states.logits, through.states.logits)  # an untrained lens is the identity


def test_a_source_and_target_of_different_widths(llama, tiny_tokenizer):
    wide = tiny_model("llama", seed=1, hidden_size=48)
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    with pytest.raises(PatchscopeError, match="width 32 but the target model's is 48"):
        patchscope(llama, source, target, Patch(2), target_model=wide)
    text = _ids(tiny_tokenizer, "To be, or not to be, that is the question. Fair is foul, and foul is fair")
    x, y = paired_states(llama, wide, text, 2, 2)
    mapping = fit_affine_map(x, y)
    assert mapping.weight.shape == (48, 32)
    result = patchscope(llama, source, target, Patch(2), target_model=wide, mapping=mapping)
    assert result.states[0].shape[-1] == 48
    mapped = mapping(capture(llama, source, layers=[2])[2][:, -1]).float()  # the patch written out by hand
    edit = replace("resid.2", mapped[:, None], positions=[target.shape[1] - 1])
    with torch.no_grad(), hooked(find_parts(wide), edits=[edit]):
        logits = wide(input_ids=target, use_cache=False).logits
    torch.testing.assert_close(result.states.logits, logits)
    assert not torch.allclose(logits, capture(wide, target).logits, atol=1e-3)


def test_an_exact_affine_relation_is_recovered():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    w, b = torch.randn(4, 6), torch.randn(4)
    fitted = fit_affine_map(x, x @ w.T + b, ridge=0.0)
    torch.testing.assert_close(fitted.weight, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted(x), x @ w.T + b, atol=1e-4, rtol=1e-4)


def test_bad_input_gives_one_clear_error(llama, tiny_tokenizer):
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    with pytest.raises(PatchscopeError, match="source position 99"):
        patchscope(llama, source, target, Patch(1, 99))
    with pytest.raises(PatchscopeError, match="target position"):
        patchscope(llama, source, target, Patch(1, 0, target_position=-99))
    with pytest.raises(LayerError):
        patchscope(llama, source, target, Patch(7))
    with pytest.raises(LayerError):
        patchscope(llama, source, target, Patch(1, target_layer=9))
    with pytest.raises(PatchscopeError, match="paired states"):
        fit_affine_map(torch.randn(5, 3), torch.randn(4, 3))
    assert find_parts(llama).d_model == 32


def test_the_command_writes_the_patched_trajectory_and_the_curve(tiny_model_dir, tmp_path, capsys):
    import json

    from depthlens.apps.cli import main

    assert (
        main(
            [
                "patchscope",
                SOURCE,
                "--model",
                str(tiny_model_dir),
                "--source-layer",
                "1",
                "--generate",
                "3",
                "--out",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    document = json.loads((tmp_path / "one" / "patchscope.json").read_text())
    assert document["patch"]["target_layer"] == 1 and "generation" in document
    assert (tmp_path / "one" / "patchscope.png").read_bytes().startswith(b"\x89PNG")
    from depthlens.model.load import load_model

    # The numbers are checked above; here, that the command writes the library's for its inputs.
    model, tokenizer = load_model(str(tiny_model_dir))
    source, target = (tokenizer(text, return_tensors="pt").input_ids for text in (SOURCE, IDENTITY_PROMPT))
    patch = Patch(1, -1, None, -1)
    ids, probs = patchscope(model, source, target, patch).top(5)
    assert document["top"] == json.loads(json.dumps([[tokenizer.decode([i]), p] for i, p in zip(ids, probs, strict=True)]))
    generated = patchscope_generate(model, source, target, patch, max_new_tokens=3).texts(tokenizer)[0]
    assert document["generation"] == generated
    assert (
        main(
            [
                "patchscope",
                SOURCE,
                "--identity-curve",
                "--layers",
                "0,3",
                "--model",
                str(tiny_model_dir),
                "--out",
                str(tmp_path / "curve"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "curve" / "identity-curve.json").read_text())
    assert [r["source_layer"] for r in rows] == [0, 3] and rows[1]["precision_at_1_next_token"] == 1.0
    curve = token_identity_curve(model, tokenizer, [SOURCE], layers=[0, 3], target_prompt=IDENTITY_PROMPT)
    assert rows == json.loads(json.dumps(curve.to_rows()))
    assert (
        main(["patchscope", SOURCE, "--model", str(tiny_model_dir), "--source-layer", "1", "--source-position", "99"])
        == 2
    )
    assert "outside its prompt" in capsys.readouterr().err
