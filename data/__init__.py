"""Dataset loading, prompt templates and the shipped evaluation sets."""
