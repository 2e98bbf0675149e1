"""Lossless byte encodings of one array: bit-packed dense, or bitmask + non-zero values.

An array becomes a ``uint8`` payload:

* ``"dense"``: the elements' bits back to back (little-endian). Sub-byte dtypes are packed
  (``int4``/``uint4``/``float4_e2m1fn``: two per byte; ``int2``/``uint2``: four per byte; ``bool``:
  eight per byte), so the payload is the true stored size.
* ``"sparse"``: ``ceil(size / 8)`` bytes of bitmask (element ``i`` is kept when its *bits* are
  non-zero, so ``-0.0`` and NaN payloads survive) followed by the dense encoding of the kept
  elements in order. Chosen only when strictly smaller than ``"dense"``.

Both are exact: decoding returns the same dtype, shape and bits.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "int2": 2, "uint2": 2, "bool": 1}


def element_bits(dtype: np.dtype) -> int:
    """Bits one element of ``dtype`` occupies when packed (``int4``: 4, ``bool``: 1).

    >>> element_bits(np.dtype("float32")), element_bits(np.dtype(bool))
    (32, 1)
    """
    dtype = np.dtype(dtype)
    return _SUB_BYTE_BITS.get(dtype.name, dtype.itemsize * 8)


def _pack_bits(small: np.ndarray, bits: int) -> np.ndarray:
    """``small``: uint8 values below ``2**bits`` -> packed bytes, lowest bits first."""
    per = 8 // bits
    n = small.size
    padded = np.zeros(-(-n // per) * per, np.uint8)
    padded[:n] = small
    groups = padded.reshape(-1, per)
    out = np.zeros(groups.shape[0], np.uint8)
    for j in range(per):
        out |= groups[:, j] << np.uint8(j * bits)
    return out


def _unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    cols = [(packed >> np.uint8(j * bits)) & mask for j in range(per)]
    return np.stack(cols, axis=1).reshape(-1)[:n]


def dense_bytes(flat: np.ndarray) -> np.ndarray:
    """The dense encoding of a 1-D array (see the module docstring)."""
    bits = element_bits(flat.dtype)
    if flat.dtype == np.bool_:
        return np.packbits(flat, bitorder="little")
    if bits < 8:
        return _pack_bits(flat.view(np.uint8) & np.uint8((1 << bits) - 1), bits)
    return np.ascontiguousarray(flat).view(np.uint8).reshape(-1)


def from_dense_bytes(payload: np.ndarray, dtype: np.dtype, n: int) -> np.ndarray:
    """Inverse of :func:`dense_bytes`: ``n`` elements of ``dtype``."""
    dtype = np.dtype(dtype)
    bits = element_bits(dtype)
    if dtype == np.bool_:
        return np.unpackbits(payload, count=n, bitorder="little").astype(bool)
    if bits < 8:
        return _unpack_bits(payload, bits, n).view(dtype)
    need = n * dtype.itemsize
    if payload.size != need:
        raise ValueError(f"expected {need} bytes of {dtype.name}, found {payload.size}")
    return payload.view(dtype).copy()


def nonzero_mask(flat: np.ndarray) -> np.ndarray:
    """Which elements have non-zero bits (1-D bool)."""
    if flat.dtype == np.bool_:
        return flat.copy()
    bits = element_bits(flat.dtype)
    if bits < 8:
        return (flat.view(np.uint8) & np.uint8((1 << bits) - 1)) != 0
    size = flat.dtype.itemsize
    if size in (1, 2, 4, 8):
        return flat.view(f"<u{size}") != 0
    return flat.view(np.uint8).reshape(flat.size, size).any(axis=1)


class Encoded(NamedTuple):
    """A payload and how to read it back."""

    encoding: str  # "dense" or "sparse"
    payload: np.ndarray  # 1-D uint8
    nnz: int | None  # kept elements ("sparse" only)


def sizes(x: np.ndarray) -> tuple[int, int | None, int]:
    """``(dense_bytes, sparse_bytes or None, nnz)`` of an array without building payloads."""
    bits = element_bits(x.dtype)
    n = x.size
    dense = -(-n * bits // 8)
    if x.dtype == np.bool_ or n == 0:
        return dense, None, n
    nnz = int(np.count_nonzero(nonzero_mask(x.reshape(-1))))
    return dense, -(-n // 8) + -(-nnz * bits // 8), nnz


def encode(x: np.ndarray) -> Encoded:
    """The smaller of the dense and sparse encodings of ``x`` (dense on ties).

    >>> e = encode(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0], np.float32))
    >>> e.encoding, e.payload.size  # 1 byte of mask + one float32
    ('sparse', 5)
    >>> decode(e.encoding, e.payload, np.dtype("float32"), (8,), e.nnz)[-1]
    np.float32(2.0)
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    dense, sparse, nnz = sizes(x)
    if sparse is not None and sparse < dense:
        mask = nonzero_mask(flat)
        payload = np.concatenate([np.packbits(mask, bitorder="little"), dense_bytes(flat[mask])])
        return Encoded("sparse", payload, nnz)
    return Encoded("dense", dense_bytes(flat), None)


def decode(
    encoding: str, payload: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], nnz: int | None
) -> np.ndarray:
    """Inverse of :func:`encode`."""
    n = int(np.prod(shape, dtype=np.int64))
    if encoding == "dense":
        return from_dense_bytes(payload, dtype, n).reshape(shape)
    if encoding == "sparse":
        mbytes = -(-n // 8)
        mask = np.unpackbits(payload[:mbytes], count=n, bitorder="little").astype(bool)
        if int(mask.sum()) != nnz:
            raise ValueError(f"sparse mask has {int(mask.sum())} set bits, expected {nnz}")
        out = np.zeros(n, dtype)
        out[mask] = from_dense_bytes(payload[mbytes:], dtype, int(nnz))
        return out.reshape(shape)
    raise ValueError(f"unknown encoding {encoding!r}")


def crc32(payload: np.ndarray) -> int:
    """CRC-32 of a payload, stored next to it to detect corruption."""
    return zlib.crc32(memoryview(np.ascontiguousarray(payload)).cast("B"))
