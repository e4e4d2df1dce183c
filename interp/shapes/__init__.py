"""The shapes world: scenes with exact ground truth, and the model organisms trained on it."""
