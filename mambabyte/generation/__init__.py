"""Byte generation for MambaByte models: sampling, prefill, decode loop, CUDA graphs, streaming UTF-8,
stop strings, batches and speculative decoding.

The ladder (gpt-fast style), each a small function:

* :func:`~mambabyte.generation.sampling.sample` -- logits -> bytes (no host sync)
* :func:`~mambabyte.generation.decode.prefill` -- prompts -> (next-byte logits, state)
* :func:`~mambabyte.generation.decode.decode_one` -- one sampled byte fed back through the step
* :func:`~mambabyte.generation.decode.decode_n` -- n steps, eager or CUDA-graph replay
* :func:`~mambabyte.generation.speculative.speculative_generate` -- draft, verify in one scan, roll back
* :func:`generate` -- the user-facing entry point (also ``model.generate`` and ``mambabyte.generate``)

Imports only the core (ops, state, model); never training or analysis.
"""

from .core import GenerationResult, GenerationStats, generate
from .decode import decode_n, decode_one, prefill
from .sampling import SamplingParams, logits_to_probs, sample
from .text import StopMatcher, Utf8Stream

__all__ = [
    "generate",
    "GenerationResult",
    "GenerationStats",
    "SamplingParams",
    "sample",
    "logits_to_probs",
    "prefill",
    "decode_one",
    "decode_n",
    "StopMatcher",
    "Utf8Stream",
]
