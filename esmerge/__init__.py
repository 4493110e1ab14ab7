"""esmerge: a reproducible companion to *ES-Merging: Biological MLLM Merging via Embedding Space Signals*."""

__version__ = "0.1.0"
