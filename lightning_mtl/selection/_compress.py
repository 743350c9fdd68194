"""Compressed lengths for ZIP-FIT: the backends, the exact pair sizes and the worker-process set-up.

Every backend returns the length of exactly the bytes the reference implementation measures:
``gzip.compress(data, level)`` (a 10-byte header, a raw deflate stream, an 8-byte trailer),
``zlib.compress(data, level)`` (2 + deflate + 4), ``lz4.frame.compress(data, compression_level=level)`` and
``zstandard.ZstdCompressor(level=level).compress(data)``. For the two deflate backends the size of
``source + target`` is computed from a compressor that has already consumed ``source``: deflate with no
flush emits the same stream however its input is split, so ``copy()`` of that state, fed the target and
finished, yields the one-shot length while compressing the source only once per source (zlib processes a
position only once it has the same lookahead a one-shot call has; the tests compare against one-shot calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import zlib
from collections.abc import Callable, Sequence

BACKENDS = ("gzip", "zlib", "lz4", "zstd")
# bytes that a backend adds around the raw deflate stream (header + trailer)
_DEFLATE_FRAME = {"gzip": 18, "zlib": 6}
_EXTRA_HINT = 'the {backend!r} backend needs the optional `{module}` package: pip install "lightning-mtl[selection]"'
# a source at least this long is compressed once and its compressor state copied per target; below it a
# one-shot compression of the concatenation is cheaper than copying the ~256 KiB deflate state (measured
# at level 9 on code: copying is 0.9x at 1 KiB sources, 1.3x at 2 KiB, 1.7x at 4 KiB, 5x at 16 KiB)
COPY_THRESHOLD = 1536


def check_backend(backend: str, level: int) -> None:
    """Refuse an unknown backend, a missing optional package and a deflate level that compresses nothing.

    Raises:
        ValueError: unknown backend, or gzip/zlib at level 0 (stored blocks: every text's size is its
            length plus a constant, and the distance no longer measures shared content).
        ImportError: lz4 or zstd without their package, naming the extra.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown compression backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in _DEFLATE_FRAME:
        if not 1 <= level <= 9:
            raise ValueError(
                f"{backend} level must be 1..9 (got {level}); level 0 stores the text uncompressed, so every "
                "distance degenerates (the official package's default): use level=9, the paper's choice"
            )
        return
    module = "lz4" if backend == "lz4" else "zstandard"
    try:
        __import__("lz4.frame" if backend == "lz4" else module)
    except ImportError as error:
        raise ImportError(_EXTRA_HINT.format(backend=backend, module=module)) from error


def size_function(backend: str, level: int) -> Callable[[bytes], int]:
    """The compressed length of one byte string, as the reference call measures it."""
    if backend in _DEFLATE_FRAME:
        extra = _DEFLATE_FRAME[backend] - _DEFLATE_FRAME["zlib"]
        return lambda data: extra + len(zlib.compress(data, level))
    if backend == "lz4":
        import lz4.frame  # type: ignore[import-untyped]  # ships no stubs

        return lambda data: len(lz4.frame.compress(data, compression_level=level))
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level)  # reusable: one-shot output does not depend on history
    return lambda data: len(compressor.compress(data))


def pair_sizes(source: bytes, targets: Sequence[bytes], backend: str, level: int) -> tuple[int, list[int]]:
    """``C(source)`` and ``C(source + target)`` for every target, equal to compressing each from scratch."""
    if backend not in _DEFLATE_FRAME:
        size = size_function(backend, level)
        return size(source), [size(source + target) for target in targets]
    frame = _DEFLATE_FRAME[backend]
    if len(source) < COPY_THRESHOLD:
        # zlib.compress wraps the same deflate stream in 6 bytes (its wbits argument is Python 3.11+)
        extra = frame - _DEFLATE_FRAME["zlib"]
        return extra + len(zlib.compress(source, level)), [
            extra + len(zlib.compress(source + target, level)) for target in targets
        ]
    prefix = zlib.compressobj(level, zlib.DEFLATED, -15)
    head = frame + len(prefix.compress(source))
    sizes = []
    for target in targets:
        state = prefix.copy()
        sizes.append(head + len(state.compress(target)) + len(state.flush()))
    return head + len(prefix.flush()), sizes  # the source alone: finish the state the copies came from


def keep_heap_mapped() -> None:
    """Stop glibc from returning the heap top to the kernel after every compression (for worker processes).

    Each deflate call allocates and frees ~256 KiB; with glibc's default trim threshold (128 KiB) every
    free gives the pages back and the next call faults them in again, which costs more than compressing a
    short text. Raising the threshold in a process we own keeps them. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD = -1: trim only past 256 MiB of free heap top
    except (OSError, AttributeError):
        return
