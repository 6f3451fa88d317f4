"""Generation from a layer: the incremental key–value cache gives the same tokens as rerunning
the whole sequence, for one prompt and for a left- or right-padded batch."""

import pytest
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens
from depthlens.analysis.generate import generate_from_layer, left_pad, sample
from depthlens.errors import GenerationError, LayerError
from depthlens.text.encode import encode

TEXTS = ["When shall we three meet again", "Fair is foul", "To be, or not to be, that is"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _random_tuned(model) -> TunedLens:
    lens = TunedLens(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.normal_(0, 0.3)
    return lens


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox", "opt"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_and_uncached_generation_agree(family, batch, tiny_tokenizer):
    model = tiny_model(family)
    ids, mask = encode(tiny_tokenizer, TEXTS[:batch])
    for readout, layer in ((LogitLens(model), 1), (_random_tuned(model), 2), (LogitLens(model), 3)):
        cached = generate_from_layer(model, readout, ids, mask, layer=layer, max_new_tokens=8)
        uncached = generate_from_layer(model, readout, ids, mask, layer=layer, max_new_tokens=8, use_cache=False)
        assert torch.equal(cached.tokens, uncached.tokens)
        torch.testing.assert_close(cached.log_probs, uncached.log_probs, atol=1e-4, rtol=1e-4)


def test_each_padded_prompt_generates_as_it_would_alone(llama, tiny_tokenizer):
    ids, mask = encode(tiny_tokenizer, TEXTS)
    together = generate_from_layer(llama, LogitLens(llama), ids, mask, layer=2, max_new_tokens=6)
    for row, text in enumerate(TEXTS):
        alone_ids, _ = encode(tiny_tokenizer, text)
        alone = generate_from_layer(llama, LogitLens(llama), alone_ids, layer=2, max_new_tokens=6)
        assert torch.equal(together.tokens[row], alone.tokens[0])


def test_the_last_layer_is_the_models_own_greedy_generation(llama, tiny_tokenizer):
    ids, _ = encode(tiny_tokenizer, TEXTS[0])
    ours = generate_from_layer(llama, LogitLens(llama), ids, layer=3, max_new_tokens=6)
    theirs = llama.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert ours.tokens[0].tolist() == theirs[0, ids.shape[1] :].tolist()


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50)
    a = sample(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = sample(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    top3 = logits.topk(3).indices
    for _ in range(20):
        drawn = sample(logits, temperature=2.0, top_k=3)
        assert all(int(t) in top3[i].tolist() for i, t in enumerate(drawn))
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), logits.argmax(-1))


def test_left_pad_moves_padding_left():
    ids = torch.tensor([[1, 2, 0], [3, 4, 5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    new_ids, new_mask = left_pad(ids, mask)
    assert new_ids.tolist() == [[0, 1, 2], [3, 4, 5]] and new_mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_bad_settings_give_one_clear_error(llama, tiny_tokenizer):
    ids, _ = encode(tiny_tokenizer, TEXTS[0])
    lens = LogitLens(llama)
    with pytest.raises(LayerError, match="out of range"):
        generate_from_layer(llama, lens, ids, layer=4)
    for kwargs, message in (
        ({"max_new_tokens": 0}, "at least 1"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 1, "top_k": 0}, "top-k"),
        ({"temperature": 1, "top_p": 1.5}, "top-p"),
    ):
        with pytest.raises(GenerationError, match=message):
            generate_from_layer(llama, lens, ids, layer=1, **kwargs)


def test_the_command_generates_at_each_layer(tiny_model_dir, tmp_path):
    import json

    from depthlens.apps.cli import main

    assert (
        main(
            [
                "generate",
                "Fair is",
                "To be, or not",
                "--model",
                str(tiny_model_dir),
                "--layers",
                "1,3",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0.8",
                "--top-p",
                "0.9",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "generations.json").read_text())
    assert [r["layer"] for r in rows] == [1, 3]
    from depthlens.model.load import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    ids, mask = encode(tokenizer, ["Fair is", "To be, or not"])
    generator = torch.Generator().manual_seed(0)  # the command's default --seed, drawn layer after layer
    for row in rows:
        expected = generate_from_layer(model, LogitLens(model), ids, mask, layer=row["layer"], max_new_tokens=4,
                                       temperature=0.8, top_p=0.9, generator=generator)
        assert row["continuations"] == expected.texts(tokenizer)
        assert row["mean_log_prob"] == pytest.approx(float(expected.log_probs.mean()), abs=1e-6)
    assert main(["generate", "Fair", "--model", str(tiny_model_dir), "--layers", "9"]) == 2


def test_a_model_without_a_key_value_cache_is_refused_cached_and_generates_uncached():
    """RWKV carries a recurrent state, not a key-value cache: a cached step would see only its new
    token, so cached generation stops with one line; uncached generation at the last layer is the
    model's own greedy continuation, rerun on the whole sequence at every step."""
    from depthlens.errors import UnsupportedModelError

    model = tiny_model("rwkv", initializer_range=0.3)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    lens = LogitLens(model)
    with pytest.raises(UnsupportedModelError, match=r"no key-value cache.*\(use_cache=False\)"):
        generate_from_layer(model, lens, ids, layer=lens.num_layers, max_new_tokens=3)
    result = generate_from_layer(model, lens, ids, layer=lens.num_layers, max_new_tokens=3, use_cache=False)
    expected = ids
    with torch.no_grad():
        for _ in range(3):
            expected = torch.cat([expected, model(expected).logits[:, -1:].argmax(-1)], 1)
    assert result.tokens.tolist() == expected[:, 6:].tolist()
