"""Readable labels for tokens: visible whitespace, decoded bytes, shortened long pieces."""

from __future__ import annotations

import unicodedata

from transformers import PreTrainedTokenizerBase

_VISIBLE = str.maketrans({" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽", "\x7f": "␡"})


def _visible(char: str) -> str:
    """``char`` itself, or a visible stand-in for a control or invisible formatting character:
    the Unicode control picture for C0 controls (``\\x00`` → ``␀``), an escape such as
    ``\\u200b`` for the others."""
    if char < " ":
        return chr(0x2400 + ord(char))
    if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") or (char.isspace() and char != " "):
        return f"\\u{ord(char):04x}"
    return char


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int, max_chars: int = 10) -> str:
    """A short, printable label for one token.

    Byte-level pieces are decoded to text; a piece that is only part of a UTF-8 character is shown
    as its raw token string. Spaces, newlines, tabs and no-break spaces become ``·``, ``⏎``, ``⇥``
    and ``⍽``; other control and invisible characters become control pictures (``␀``) or escapes
    (``\\u200b``). Labels longer than ``max_chars`` are cut with ``…``.
    """
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" in text or text == "":
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    text = "".join(_visible(char) for char in text.translate(_VISIBLE))
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
