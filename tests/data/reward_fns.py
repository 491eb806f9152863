"""Reward functions for tests that need rewards to vary within a group whatever the model answers."""


def word_parity(response: str, ground_truth: str, **extras) -> float:
    """1 for a response with an even number of words: about half of any model's samples, so GRPO groups
    of a model that never answers right still have something to learn from."""
    return float(len(response.split()) % 2 == 0)
