"""Corpora to token blocks: the bundled Austen/KJV texts, document-level splits, packed blocks, chapters as units; ``tasks/``, the offline lm-eval tasks and their choice items."""
