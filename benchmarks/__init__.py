"""Benchmarks for fastdiss: kernel speed against PyTorch, hardware ceilings, sampler latency.

Each benchmark is a module with a `main(argv)` entry point (`python -m benchmarks.<name>`) that
writes one JSON file to benchmarks/results/<name>-<device-tag>.json (see benchmarks.common).
"""
