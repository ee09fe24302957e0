"""Data: embedded corpora, user files, tokenizers, batching.

    from fastdiss.data import load_pairs, load_tokenizer, encode_pairs, TokenBatchSampler, collate
    pairs = load_pairs("kjv2web", "train")            # or read_pairs("my.tsv") for your own data
    tok = load_tokenizer("kjv2web")                   # or Tokenizer.train(texts, vocab_size=8000)
"""
from fastdiss.data.batching import TokenBatchSampler, collate, encode_pairs
from fastdiss.data.corpus import DEFAULT_TASK, SPLITS, TASKS, describe, load_pairs, load_tokenizer
from fastdiss.data.loader import DataError, read_pairs
from fastdiss.data.tokenizer import Tokenizer

__all__ = ["TASKS", "SPLITS", "DEFAULT_TASK", "load_pairs", "load_tokenizer", "describe", "read_pairs", "DataError",
           "Tokenizer", "encode_pairs", "collate", "TokenBatchSampler"]
