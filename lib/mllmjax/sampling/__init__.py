"""Sampling: strategies (how a token is drawn) and the compiled decoder loop (`generate`, `stream`)."""

from mllmjax.sampling.buckets import bucket
from mllmjax.sampling.programs import compile_count
from mllmjax.sampling.sampler import Completion, StreamChunk, generate, generate_embeds, stream
from mllmjax.sampling.strategies import Greedy, Sample, Strategy, make_strategy

__all__ = [
    "Completion",
    "Greedy",
    "Sample",
    "Strategy",
    "StreamChunk",
    "bucket",
    "compile_count",
    "generate",
    "generate_embeds",
    "make_strategy",
    "stream",
]
