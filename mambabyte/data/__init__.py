"""Byte datasets: sources (files, folders, globs, prepared shards, Hugging Face), shard preparation,
and the deterministic, resumable window samplers used by the trainer."""

from .dataset import ByteData, StreamSampler, WindowSampler, load_byte_data, split_tail
from .prepare import count_words, prepare_data, read_meta
from .sources import Source, is_prepared_dir, parse_hf_spec, parse_separator, resolve_sources, sha256_file

__all__ = [
    "ByteData",
    "WindowSampler",
    "StreamSampler",
    "load_byte_data",
    "split_tail",
    "prepare_data",
    "read_meta",
    "count_words",
    "Source",
    "resolve_sources",
    "is_prepared_dir",
    "parse_hf_spec",
    "parse_separator",
    "sha256_file",
]
