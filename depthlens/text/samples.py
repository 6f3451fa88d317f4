"""Sample texts: what the command line and the app decode when they are given no text."""

SAMPLE_PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
"""A line of Hamlet: the default text of ``depthlens table`` and the text the app opens with."""

__all__ = ["SAMPLE_PROMPT"]
