"""Load a model, discover its parts, and read or write its forward pass through hooks."""

DEFAULT_MODEL = "smollm2-135m"
"""The model every command and :func:`depthlens.model.load.load_model` use unless told otherwise.

Defined here, in a module that imports nothing, so the command line can show it without
importing torch."""
