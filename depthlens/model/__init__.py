"""Load a model, discover its parts, and read or write its forward pass through hooks."""
