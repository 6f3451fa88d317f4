"""Readable labels for tokens: visible whitespace, decoded bytes, shortened long pieces."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_VISIBLE = str.maketrans({" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍"})


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int, max_chars: int = 10) -> str:
    """A short, printable label for one token.

    Byte-level pieces are decoded to text; a piece that is only part of a UTF-8 character is shown
    as its raw token string. Spaces, newlines and tabs become ``·``, ``⏎`` and ``⇥``; labels longer
    than ``max_chars`` are cut with ``…``.
    """
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" in text or text == "":
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    text = text.translate(_VISIBLE)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
