"""Data: embedded corpora, user files, tokenizers, batching."""
