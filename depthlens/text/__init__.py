"""Text: data sources, packed token chunks, readable token labels."""
