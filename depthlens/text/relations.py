"""Relations for the attribute lens: prompt templates and subject → object pairs.

A relation file is a small JSON object::

    {"name": "country-capital",
     "description": "country → its capital city",
     "templates": ["The capital of {} is"],
     "pairs": [["France", "Paris"], ["Japan", "Tokyo"], ...]}

Each template holds one ``{}`` where the subject goes; the object is the text the model should
continue with (its first token is the answer the attribute lens is scored on). A prompt is a few
in-context examples, one per line (``"The capital of France is Paris"``), then the template filled
with the query subject.

Built-in relations (:data:`BUILTIN_RELATIONS`) come from data shipped on PyPI, read offline:
``country-capital`` from *country-capitals* (Unlicense; 193 countries), ``country-language``,
``country-currency`` and ``country-region`` from *countryinfo* (MIT), with language and currency
names from *pycountry*. Install them with ``pip install 'depthlens[relations]'``.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from depthlens.errors import RelationError

_INSTALL = "install the relation data with: pip install 'depthlens[relations]' (country-capitals, countryinfo)"


@dataclass(frozen=True)
class Relation:
    """A relation: templates with one ``{}`` for the subject, and ``(subject, object)`` pairs."""

    name: str
    templates: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    description: str = ""
    source: str = ""
    separator: str = field(default="\n")
    """Between in-context examples."""

    def __post_init__(self) -> None:
        if not self.templates:
            raise RelationError(
                f'relation {self.name!r} has no templates: give at least one, e.g. "The capital of {{}} is"'
            )
        for template in self.templates:
            if template.count("{}") != 1:
                raise RelationError(
                    f"template {template!r} of relation {self.name!r} must hold exactly one {{}} for the subject"
                )
        if not self.pairs:
            raise RelationError(f"relation {self.name!r} has no subject–object pairs: give at least two")

    def prompt(self, subject: str, examples: Sequence[tuple[str, str]] = (), template: int = 0) -> str:
        """The in-context examples (``"<template(s)> <o>"``, one per line), then the template
        filled with ``subject``: the model's next token should be the object's first token."""
        filled = self.templates[template % len(self.templates)]
        lines = [f"{filled.format(s)} {o}" for s, o in examples]
        return self.separator.join([*lines, filled.format(subject)])

    def split(self, n_train: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """``n_train`` pairs to estimate with and the rest held out, after a seeded shuffle.

        Raises :class:`RelationError` unless at least one pair is left to hold out."""
        check_examples(self, n_train + 1, f"{n_train} to estimate with and at least 1 held out")
        pairs = list(self.pairs)
        random.Random(seed).shuffle(pairs)
        return pairs[:n_train], pairs[n_train:]

    def to_json(self) -> dict[str, object]:
        """The relation as the JSON object :func:`load_relation` reads."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "templates": list(self.templates),
            "pairs": [list(p) for p in self.pairs],
        }


def check_examples(relation: Relation, needed: int, why: str = "") -> None:
    """:class:`RelationError` unless ``relation`` has at least ``needed`` pairs."""
    if len(relation.pairs) < needed:
        reason = f" ({why})" if why else ""
        raise RelationError(
            f"relation {relation.name!r} has {len(relation.pairs)} subject–object pairs "
            f"but {needed} are needed{reason}: "
            "add pairs to the relation file or ask for fewer examples"
        )


def relation_from_json(document: object, where: str = "the relation") -> Relation:
    """A :class:`Relation` from a parsed JSON object; :class:`RelationError` naming the bad field."""
    if not isinstance(document, dict):
        raise RelationError(f'{where} must be a JSON object with "templates" and "pairs"')
    templates, pairs = document.get("templates"), document.get("pairs")
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise RelationError(f'{where}: "templates" must be a list of strings, each with one {{}}')
    if not isinstance(pairs, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) and x.strip() for x in p) for p in pairs
    ):
        raise RelationError(f'{where}: "pairs" must be a list of [subject, object] pairs of non-empty strings')
    return Relation(
        name=str(document.get("name") or Path(where).stem),
        templates=tuple(templates),
        pairs=tuple((s.strip(), o.strip()) for s, o in pairs),
        description=str(document.get("description", "")),
        source=str(document.get("source", where)),
    )


def load_relation(spec: str | os.PathLike) -> Relation:
    """A built-in relation by name (:data:`BUILTIN_RELATIONS`) or a relation JSON file."""
    name = os.fspath(spec)
    if name in BUILTIN_RELATIONS:
        return BUILTIN_RELATIONS[name]()
    path = Path(name).expanduser()
    if not path.is_file():
        raise RelationError(f"relation {name!r} is neither a built-in ({', '.join(BUILTIN_RELATIONS)}) nor a JSON file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RelationError(
            f"cannot read relation file {path}: {error}; write it as JSON (see docs/readouts.md)"
        ) from None
    return relation_from_json(document, str(path))


def subject_position(tokenizer: PreTrainedTokenizerBase, text: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(text)`` (its last occurrence).

    Raises :class:`RelationError` if ``subject`` does not occur in ``text``."""
    start = text.rfind(subject) if subject else -1
    if start < 0:
        raise RelationError(f"the subject {subject!r} does not occur in the prompt {text!r}: put it in the prompt")
    end = start + len(subject)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
        covering = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
        if covering:
            return max(i for i in covering if offsets[i][0] < end)
    return len(tokenizer(text[:end]).input_ids) - 1


def object_token(tokenizer: PreTrainedTokenizerBase, obj: str) -> int:
    """The first token of ``" " + obj`` (the object as it continues a prompt), without specials."""
    ids = tokenizer(" " + obj.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise RelationError(f"the object {obj!r} encodes to no tokens")
    return int(ids[0])


def _country_name(alpha3: str) -> str | None:
    import pycountry

    country = pycountry.countries.get(alpha_3=alpha3)
    if country is None:
        return None
    return getattr(country, "common_name", None) or country.name


def _country_capitals() -> Relation:
    try:
        with warnings.catch_warnings():  # the package's __init__ reads its file with a deprecated call
            warnings.filterwarnings("ignore", "open_text is deprecated", DeprecationWarning)
            text = resources.files("country_capitals").joinpath("capitals.json").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise RelationError(
            f"the built-in relation country-capital needs the country-capitals package: {_INSTALL}"
        ) from None
    pairs = {
        (name, capital.strip())
        for code, capital in json.loads(text).items()
        if capital and capital.strip() and (name := _country_name(code))
    }
    return Relation(
        "country-capital",
        ("The capital of {} is",),
        tuple(sorted(pairs)),
        "country → its capital city",
        "country-capitals (PyPI, Unlicense)",
    )


def _countryinfo(field_name: str) -> list[tuple[str, object]]:
    try:
        folder = resources.files("countryinfo").joinpath("data")
    except ModuleNotFoundError:
        raise RelationError(f"this built-in relation needs the countryinfo package: {_INSTALL}") from None
    rows = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            document = json.loads(entry.read_text(encoding="utf-8"))
            if document.get("name") and document.get(field_name):
                rows.append((str(document["name"]), document[field_name]))
    return rows


def _named(codes: object, lookup: Callable[[str], object]) -> str | None:
    code = codes[0] if isinstance(codes, list) and codes else None
    found = lookup(code) if isinstance(code, str) else None
    return getattr(found, "name", None) if found is not None else None


def _country_language() -> Relation:
    import pycountry

    pairs = [
        (c, name)
        for c, codes in _countryinfo("languages")
        if (name := _named(codes, lambda code: pycountry.languages.get(alpha_2=code)))
    ]
    return Relation(
        "country-language",
        ("The official language of {} is",),
        tuple(pairs),
        "country → its (first) official language",
        "countryinfo (PyPI, MIT) + pycountry",
    )


def _country_currency() -> Relation:
    import pycountry

    pairs = [
        (c, name)
        for c, codes in _countryinfo("currencies")
        if (name := _named(codes, lambda code: pycountry.currencies.get(alpha_3=code)))
    ]
    return Relation(
        "country-currency",
        ("The currency of {} is the",),
        tuple(pairs),
        "country → its currency",
        "countryinfo (PyPI, MIT) + pycountry",
    )


def _country_region() -> Relation:
    pairs = [(c, str(region)) for c, region in _countryinfo("region")]
    return Relation(
        "country-region",
        ("{} is a country in",),
        tuple(pairs),
        "country → its continent-level region",
        "countryinfo (PyPI, MIT)",
    )


BUILTIN_RELATIONS: dict[str, Callable[[], Relation]] = {
    "country-capital": _country_capitals,
    "country-language": _country_language,
    "country-currency": _country_currency,
    "country-region": _country_region,
}
"""Built-in relations by name; each reads its package's data when called."""

__all__ = [
    "BUILTIN_RELATIONS",
    "Relation",
    "check_examples",
    "load_relation",
    "object_token",
    "relation_from_json",
    "subject_position",
]
