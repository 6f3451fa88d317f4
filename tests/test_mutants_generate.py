"""Generation from a layer, checked against answers known independently: a written-out greedy loop
that reruns the whole sequence through the model (positions from ``0``, edits applied), each prompt
of a padded batch generating as it would alone, sampling supports whose size is fixed by
construction, and the exact context-length and argument errors with their boundaries."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model
from transformers import LlamaForCausalLM

from depthlens import LogitLens
from depthlens.analysis.generate import check_length, context_length, generate_from_layer, left_pad, sample
from depthlens.errors import GenerationError
from depthlens.model.architecture import ModelParts
from depthlens.model.hooks import Edit, add, hooked

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 250, 31]])
ROWS = [[5, 17, 42, 99, 7], [8, 3], [200, 11, 64, 9]]


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama", initializer_range=0.3)


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return tiny_model("gpt2", initializer_range=0.3)


@torch.no_grad()
def _greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int, edits: Sequence[Edit] = ()) -> list[int]:
    """Greedy tokens after ``ids [1, seq]`` from the model's own logits, rerunning the whole
    sequence (no cache, default positions ``0 … seq-1``) with ``edits`` at every step."""
    out = []
    for _ in range(steps):
        with hooked(LogitLens(model).parts, edits=edits):
            logits = model(input_ids=ids, use_cache=False).logits
        out.append(int(logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return out


def _padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as one batch padded with token 0 (mask 0) on ``side``."""
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, where], mask[i, where] = torch.tensor(row), 1
    return ids, mask


def _limited(limit: object) -> SimpleNamespace:
    """A stand-in model whose config states ``max_position_embeddings = limit``."""
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit))


# --- the model is run with the right positions, cache and edits -------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt2_last_layer_is_a_rerun_greedy_loop(gpt2, use_cache):
    """GPT-2's positions are absolute (learned embeddings), so a position off by any amount
    changes its logits: the last layer's logit lens is the model's own output, so generation must
    equal the greedy loop that reruns the sequence with positions ``0 … seq-1``."""
    lens = LogitLens(gpt2)
    ours = generate_from_layer(gpt2, lens, PROMPT, layer=lens.num_layers, max_new_tokens=6, use_cache=use_cache)
    assert ours.tokens[0].tolist() == _greedy(gpt2, PROMPT, 6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_padded_rows_generate_as_alone(gpt2, side):
    """With absolute positions, a padded row reads the same positions as the text alone only if
    the position ids skip the padding (``cumsum(mask) - 1``): each row must match the greedy loop
    run on that row alone."""
    ids, mask = _padded(ROWS, side)
    lens = LogitLens(gpt2)
    for use_cache in (True, False):
        together = generate_from_layer(gpt2, lens, ids, mask, layer=3, max_new_tokens=5, use_cache=use_cache)
        for row, text in enumerate(ROWS):
            assert together.tokens[row].tolist() == _greedy(gpt2, torch.tensor([text]), 5), (use_cache, row)


def test_cached_generation_works_when_the_config_turns_the_cache_off():
    """A config with ``use_cache=False`` (as MPT's default) must not stop the cached path from
    keeping its cache: the tokens still equal the full-rerun greedy loop."""
    model = tiny_model("llama", initializer_range=0.3, use_cache=False)
    lens = LogitLens(model)
    ours = generate_from_layer(model, lens, PROMPT, layer=3, max_new_tokens=6)
    assert ours.tokens[0].tolist() == _greedy(model, PROMPT, 6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_edits_apply_with_and_without_the_cache(llama, use_cache):
    """An edit adding a vector to residual state 1 at every position changes what is generated;
    both paths must give the greedy loop that reruns the sequence with that edit."""
    torch.manual_seed(0)
    edits = [add("resid.1", 3.0 * torch.randn(llama.config.hidden_size))]
    lens = LogitLens(llama)
    ours = generate_from_layer(llama, lens, PROMPT, layer=3, max_new_tokens=6, use_cache=use_cache, edits=edits)
    expected = _greedy(llama, PROMPT, 6, edits)
    assert ours.tokens[0].tolist() == expected
    assert expected != _greedy(llama, PROMPT, 6)  # the edit matters, so dropping it would show


class _NoPositions(LlamaForCausalLM):
    """A model whose forward takes no ``position_ids`` (nor any other keyword it doesn't name)."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: object = None,
        use_cache: bool | None = None,
    ) -> object:
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache)


def test_a_forward_without_position_ids_is_not_given_them(llama):
    """Position ids are passed only where the forward signature names them: a model that takes
    none generates (same weights, so same tokens as the greedy loop) instead of raising."""
    plain = _NoPositions(llama.config).eval()
    plain.load_state_dict(llama.state_dict())
    lens = LogitLens(plain)
    for use_cache in (True, False):
        ours = generate_from_layer(plain, lens, PROMPT, layer=3, max_new_tokens=4, use_cache=use_cache)
        assert ours.tokens[0].tolist() == _greedy(llama, PROMPT, 4)


class _Spy:
    """A :class:`Readout` that decodes as the logit lens and records what it is handed."""

    kind = "spy"

    def __init__(self, model: torch.nn.Module) -> None:
        self.lens = LogitLens(model)
        self.parts: ModelParts = self.lens.parts
        self.seen: list[tuple[int, list[int], int]] = []

    @property
    def num_layers(self) -> int:
        return self.lens.num_layers

    def iter_logits(
        self, states: Sequence[torch.Tensor], layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        filled = [i for i, s in enumerate(states) if s is not None]
        self.seen.append((len(states), filled, int(states[filled[0]].shape[1])))
        return self.lens.iter_logits(states, layers)


def test_the_readout_gets_l_plus_1_states_and_the_last_position_only(llama):
    """The protocol hands a readout ``L + 1`` states; generation fills only the chosen layer, with
    only the last position (one per step: 1 prefill + 3 cached steps = 4 calls)."""
    spy = _Spy(llama)
    generate_from_layer(llama, spy, PROMPT, layer=2, max_new_tokens=4)
    assert spy.seen == [(spy.num_layers + 1, [2], 1)] * 4


# --- sampling -----------------------------------------------------------------------------------------------------


def test_sample_defaults_to_greedy():
    """Without a temperature, ``sample`` is the argmax: logits that are nearly flat over 100
    tokens would almost never give the argmax in all 64 rows if drawn."""
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 1e-3
    drawn = sample(logits, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_exactly_k_tokens_for_one_row(k):
    """One row (batch 1 < k) of logits 2.0, 1.9, 1.8, -5, -5: the ``k`` likeliest (tokens
    ``0 … k-1``) are all drawn in 300 draws (each has probability ≥ 0.3 within the top 3; missing
    one has probability below 3 × 0.7³⁰⁰) and the rest never."""
    logits = torch.tensor([[2.0, 1.9, 1.8, -5.0, -5.0]])
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, temperature=1.0, top_k=k, generator=generator)) for _ in range(300)}
    assert drawn == set(range(k))


@pytest.mark.parametrize(("top_p", "size"), [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)])
def test_top_p_on_four_equal_tokens_keeps_the_smallest_set_reaching_p(top_p, size):
    """Four equal logits have probabilities exactly 0.25 each (cumulative 0.25, 0.5, 0.75, 1.0,
    exact in float): the smallest set reaching ``p = 0.25·n`` is ``n`` tokens (a token whose
    predecessors already reach ``p`` is dropped); 0.76 needs all four. In 200 draws every kept
    token appears (missing one has probability below 4 × 0.75²⁰⁰)."""
    logits = torch.zeros(1, 4)
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, temperature=1.0, top_p=top_p, generator=generator)) for _ in range(200)}
    assert len(drawn) == size


def test_a_one_token_vocabulary_always_draws_that_token():
    """A readout over one token has nothing else to draw: every row gets token 0."""
    drawn = sample(torch.zeros(3, 1), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert drawn.tolist() == [0, 0, 0]


def test_boundary_sampling_settings_are_accepted(llama):
    """``top_k = 1`` is allowed and is greedy (only the argmax is left); ``top_p = 1`` is allowed
    and equals sampling without it (nothing is cut, so the seeded draw is the same)."""
    lens = LogitLens(llama)
    greedy = generate_from_layer(llama, lens, PROMPT, layer=2, max_new_tokens=5)
    top1 = generate_from_layer(llama, lens, PROMPT, layer=2, max_new_tokens=5, temperature=1.5, top_k=1,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1.tokens, greedy.tokens)
    full = generate_from_layer(llama, lens, PROMPT, layer=2, max_new_tokens=5, temperature=1.5, top_p=1.0,
                               generator=torch.Generator().manual_seed(4))
    free = generate_from_layer(llama, lens, PROMPT, layer=2, max_new_tokens=5, temperature=1.5,
                               generator=torch.Generator().manual_seed(4))
    assert torch.equal(full.tokens, free.tokens)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "generate at least 1 token, not 0"),
        ({"temperature": -0.5}, "the temperature must be 0 (greedy) or more, got -0.5"),
        ({"temperature": 1.0, "top_k": 0}, "top-k must be at least 1, got 0"),
        ({"temperature": 1.0, "top_p": 0.0}, "top-p must be in (0, 1], got 0.0"),
        ({"temperature": 1.0, "top_p": 1.0000001}, "top-p must be in (0, 1], got 1.0000001"),
    ],
)
def test_bad_settings_are_refused_with_their_value(llama, kwargs, message):
    """Each setting just past its limit is refused, naming the rule and the value given."""
    with pytest.raises(GenerationError, match=f"^{re.escape(message)}$"):
        generate_from_layer(llama, LogitLens(llama), PROMPT, layer=1, **kwargs)


# --- padding ------------------------------------------------------------------------------------------------------


def test_left_pad_without_a_mask_gives_a_long_mask_of_ones():
    """No mask means no padding: the ids come back as given and the mask is all 1, as int64
    whatever the ids' dtype (here int32)."""
    ids = torch.tensor([[4, 5, 6]], dtype=torch.int32)
    new_ids, mask = left_pad(ids, None)
    assert new_ids is ids
    assert mask.dtype == torch.long and mask.tolist() == [[1, 1, 1]]


def test_left_pad_keeps_token_order_in_long_rows():
    """A 40-token row with padding scattered through it: the real tokens come out in their own
    order after all the padding (a sort that is not stable could shuffle them)."""
    ids = torch.arange(1, 41)[None]
    mask = (torch.arange(40) % 3 != 0).long()[None]
    new_ids, new_mask = left_pad(ids, mask)
    kept = [t for t in range(1, 41) if (t - 1) % 3 != 0]
    assert new_ids[0, 40 - len(kept) :].tolist() == kept
    assert new_mask[0].tolist() == [0] * (40 - len(kept)) + [1] * len(kept)


def test_left_pad_accepts_a_one_token_prompt():
    """A prompt of exactly one token is not empty: it is moved to the end."""
    new_ids, new_mask = left_pad(torch.tensor([[9, 0, 0], [1, 2, 3]]), torch.tensor([[1, 0, 0], [1, 1, 1]]))
    assert new_ids.tolist() == [[0, 0, 9], [1, 2, 3]] and new_mask.tolist() == [[0, 0, 1], [1, 1, 1]]


def test_left_pad_refuses_one_empty_prompt_in_a_batch():
    """One row of the batch with an all-0 mask is refused, even though the batch has tokens."""
    message = "a prompt of the batch is empty (its mask is all 0): give every prompt at least one token"
    with pytest.raises(GenerationError, match=f"^{re.escape(message)}$"):
        left_pad(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [0, 0]]))


def test_left_pad_names_both_shapes_when_they_differ():
    """A mask that doesn't match the tokens is refused, naming both shapes."""
    with pytest.raises(GenerationError, match=re.escape("the attention mask (2, 3) does not match the tokens (2, 4)")):
        left_pad(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))


# --- context length -----------------------------------------------------------------------------------------------


def test_context_length_reads_the_config(llama):
    """The tiny models' configs state ``max_position_embeddings = 128``."""
    assert context_length(llama) == 128


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (_limited(1), 1),
        (_limited(0), None),
        (_limited(None), None),
        (SimpleNamespace(config=SimpleNamespace()), None),
        (torch.nn.Linear(2, 2), None),
    ],
)
def test_context_length_is_a_positive_int_or_none(model, expected):
    """A limit of 1 is a limit; 0, ``None``, a config without the field and a module without a
    config all mean no stated limit."""
    assert context_length(model) == expected


@pytest.mark.parametrize(
    ("prompt", "new", "fix"),
    [(6, 5, "generate at most 4 new tokens"), (9, 2, "generate at most 1 new tokens"), (10, 1, "shorten the prompt"),
     (12, 3, "shorten the prompt")],
)
def test_check_length_message_gives_the_room_left(prompt, new, fix):
    """With a limit of 10 tokens, ``10 - prompt`` new tokens fit; with no room left the only fix
    is a shorter prompt."""
    message = (f"the prompt has {prompt} tokens and {new} new ones are asked for, but the model reads at most 10 "
               f"tokens: {fix}")
    with pytest.raises(GenerationError, match=f"^{re.escape(message)}$"):
        check_length(_limited(10), prompt, new)


def test_check_length_accepts_exactly_the_limit_and_no_limit():
    """Prompt plus new tokens equal to the limit fit; a model with no stated limit takes any."""
    check_length(_limited(10), 6, 4)
    check_length(_limited(None), 10_000, 10_000)


def test_generation_stops_at_the_models_context_length(llama):
    """The tiny llama reads 128 tokens: a 120-token prompt may get 8 new tokens, not 9."""
    prompt = torch.arange(1, 121)[None]
    lens = LogitLens(llama)
    assert generate_from_layer(llama, lens, prompt, layer=2, max_new_tokens=8).tokens.shape == (1, 8)
    with pytest.raises(GenerationError, match="generate at most 8 new tokens"):
        generate_from_layer(llama, lens, prompt, layer=2, max_new_tokens=9)


def test_the_full_rerun_asks_for_no_cache_through_a_bridge(tiny_tokenizer, tmp_path):
    """A transformer-lens bridge's attention leaves a requested key-value cache empty, which
    depthlens refuses (cached decoding would be wrong); ``use_cache=False`` must not request one,
    so it runs and gives the bridged model's own greedy tokens at the last layer."""
    bridge_module = pytest.importorskip("transformer_lens.model_bridge")
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    inner = tiny_model("llama", initializer_range=0.3)
    inner.set_attn_implementation("eager")
    expected = _greedy(inner, PROMPT, 4)
    inner.config.architectures = [type(inner).__name__]
    bridge = bridge_module.TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=inner, tokenizer=AutoTokenizer.from_pretrained(tmp_path), device="cpu"
    ).eval()
    ours = generate_from_layer(bridge, LogitLens(bridge), PROMPT, layer=3, max_new_tokens=4, use_cache=False)
    assert ours.tokens[0].tolist() == expected
