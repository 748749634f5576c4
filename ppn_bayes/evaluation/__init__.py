"""Measuring models: perplexity targets (a model, an export, a run at a size), the offline lm-eval bridge, speed and memory, self-speculative decoding."""
