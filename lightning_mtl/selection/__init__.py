"""Choosing what to train on: ZIP-FIT compression-based data selection and the corpus and tiny byte-level
language model of its recipe."""

from lightning_mtl.selection.byte_lm import ByteLM
from lightning_mtl.selection.stdlib_corpus import StdlibCorpus
from lightning_mtl.selection.zipfit import CompressionSelected, CompressionSelector, ncd

__all__ = ["ByteLM", "CompressionSelected", "CompressionSelector", "StdlibCorpus", "ncd"]
