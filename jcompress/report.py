"""What a (compressed) parameter tree costs: per-leaf and total sizes, sparsity, bits.

``summarize(tree, reference=None)`` measures, for every array leaf (a compressed leaf counts as
one leaf):

* ``sparsity``: the fraction of elements equal to zero (a ``QArray`` counts values equal to its
  zero point, i.e. weights that dequantize to exactly 0);
* ``bits``: bits per stored value (``32`` for float32, ``QArray.bits`` for quantized leaves);
* ``memory_bytes``: the true in-memory size, sub-byte values packed (``QArray.nbytes``; an
  ``int4`` array counts 4 bits per element, not NumPy's one byte);
* ``encoded_bytes``: the payload :func:`jcompress.checkpoint.save` writes for it (packed, and
  bitmask + non-zero values where that is smaller), before orbax's zstd and metadata;
* ``reference_bytes``: the in-memory size of the leaf at the same path in ``reference``.

The result renders as a rich table (``rich.print(summary)``, ``str(summary)``) and converts to
plain data with ``to_dict()`` / ``to_json()``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import tree as jtree
from jcompress.checkpoint import _encode, _registry
from jcompress.checkpoint._io import encoded_nbytes

__all__ = ["LeafReport", "Summary", "summarize"]


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf's row of a :class:`Summary` (sizes in bytes)."""

    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    bits: float
    sparsity: float
    memory_bytes: int
    encoded_bytes: int
    reference_bytes: int | None = None

    @property
    def ratio(self) -> float | None:
        """``reference_bytes / memory_bytes`` (``None`` without a reference)."""
        if self.reference_bytes is None or self.memory_bytes == 0:
            return None
        return self.reference_bytes / self.memory_bytes


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-leaf :class:`LeafReport` rows and their totals."""

    leaves: tuple[LeafReport, ...]

    @property
    def size(self) -> int:
        """Number of elements over all leaves."""
        return sum(int(np.prod(r.shape, dtype=np.int64)) for r in self.leaves)

    @property
    def memory_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.leaves)

    @property
    def encoded_bytes(self) -> int:
        return sum(r.encoded_bytes for r in self.leaves)

    @property
    def reference_bytes(self) -> int | None:
        if any(r.reference_bytes is None for r in self.leaves):
            return None
        return sum(r.reference_bytes for r in self.leaves)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all elements."""
        size = self.size
        zeros = sum(r.sparsity * np.prod(r.shape, dtype=np.int64) for r in self.leaves)
        return float(zeros / size) if size else 0.0

    @property
    def ratio(self) -> float | None:
        """Reference bytes over in-memory bytes."""
        ref = self.reference_bytes
        return None if ref is None or not self.memory_bytes else ref / self.memory_bytes

    @property
    def encoded_ratio(self) -> float | None:
        """Reference bytes over encoded bytes."""
        ref = self.reference_bytes
        return None if ref is None or not self.encoded_bytes else ref / self.encoded_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"leaves": [...], "total": {...}}``."""
        leaves = []
        for r in self.leaves:
            d = dataclasses.asdict(r)
            d["shape"] = list(r.shape)
            d["ratio"] = r.ratio
            leaves.append(d)
        total = {
            "size": self.size,
            "sparsity": self.sparsity,
            "memory_bytes": self.memory_bytes,
            "encoded_bytes": self.encoded_bytes,
            "reference_bytes": self.reference_bytes,
            "ratio": self.ratio,
            "encoded_ratio": self.encoded_ratio,
        }
        return {"leaves": leaves, "total": total}

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict(), **kwargs)``."""
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, title: str | None = None):
        """A ``rich.table.Table`` of the rows and the total."""
        from rich.table import Table

        has_ref = self.reference_bytes is not None
        t = Table(title=title, show_footer=False)
        for name, justify in [
            ("path", "left"),
            ("kind", "left"),
            ("shape", "left"),
            ("bits", "right"),
            ("sparsity", "right"),
            ("memory", "right"),
            ("encoded", "right"),
        ] + ([("ratio", "right")] if has_ref else []):
            t.add_column(name, justify=justify, overflow="fold")
        for r in self.leaves:
            row = [
                r.path,
                r.kind,
                "x".join(map(str, r.shape)) or "()",
                f"{r.bits:g}",
                f"{r.sparsity:.1%}",
                format_bytes(r.memory_bytes),
                format_bytes(r.encoded_bytes),
            ]
            if has_ref:
                row.append(f"{r.ratio:.1f}x" if r.ratio is not None else "-")
            t.add_row(*row)
        t.add_section()
        total = [
            "total",
            "",
            f"{self.size:,} values",
            "",
            f"{self.sparsity:.1%}",
            format_bytes(self.memory_bytes),
            format_bytes(self.encoded_bytes),
        ]
        if has_ref:
            total.append(f"{self.ratio:.1f}x" if self.ratio is not None else "-")
        t.add_row(*total, style="bold")
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        return console.export_text().rstrip()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def format_bytes(n: int | float) -> str:
    """``1536 -> '1.5 KiB'``.

    >>> format_bytes(1536), format_bytes(12)
    ('1.5 KiB', '12 B')
    """
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _count_nonzero(x: Any) -> int:
    """Non-zero values; sharded arrays are counted where they live (no gathering)."""
    if isinstance(x, jax.Array):
        return int(jnp.count_nonzero(x))
    return int(np.count_nonzero(x))


def _array_report(path: str, x: Any) -> LeafReport:
    dtype = np.dtype(x.dtype)
    bits = _encode.element_bits(dtype)
    size = int(np.prod(x.shape, dtype=np.int64))
    zeros = size - _count_nonzero(x)
    return LeafReport(
        path=path,
        kind="array",
        shape=tuple(int(s) for s in x.shape),
        dtype=dtype.name,
        bits=float(bits),
        sparsity=zeros / size if size else 0.0,
        memory_bytes=-(-size * bits // 8),
        encoded_bytes=encoded_nbytes(x),
    )


def _encoded_bytes(x: Any) -> int:
    """What a checkpoint writes for a compressed leaf: its stored children, wrapped leaves'
    children included (``nbytes`` for a kind that is not registered)."""
    kind = _registry.kind_of(x)
    if kind is None:
        return int(x.nbytes)
    total = 0
    for a in kind.arrays:
        child = getattr(x, a)
        if jtree.is_compressed(child):
            total += _encoded_bytes(child)
        elif child is not None:
            total += encoded_nbytes(child)
    return total


def _compressed_report(path: str, x: Any) -> LeafReport:
    size = int(np.prod(x.shape, dtype=np.int64))
    # A pruned weight dequantizes to exactly 0 (a QArray stores it as its zero point).
    zeros = size - _count_nonzero(x.dequantize())
    bits = getattr(x, "bits", None)
    kind = _registry.kind_of(x)
    encoded = _encoded_bytes(x.stored())
    return LeafReport(
        path=path,
        kind=kind.name if kind is not None else type(x).__name__,
        shape=tuple(int(s) for s in x.shape),
        dtype=np.dtype(x.dtype).name,
        bits=float(bits) if bits is not None else 8.0 * x.nbytes / max(size, 1),
        sparsity=zeros / size if size else 0.0,
        memory_bytes=int(x.nbytes),
        encoded_bytes=encoded,
    )


def _leaf_report(path: str, x: Any) -> LeafReport | None:
    if jtree.is_compressed(x):
        return _compressed_report(path, x)
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return None
        return _array_report(path, x)
    return None


def summarize(tree: jtree.Params, *, reference: jtree.Params | None = None) -> Summary:
    """Per-leaf and total sizes, sparsity and bits of a parameter tree.

    Args:
      tree: any parameter tree; compressed leaves (``QArray``) count as one leaf each.
        Non-array leaves (Python scalars, strings, PRNG keys) are skipped.
      reference: an optional tree with the same array paths (typically the float model), whose
        in-memory sizes give each row's and the total ``ratio``.

    Returns:
      A :class:`Summary`.

    Raises:
      ValueError: ``reference`` lacks paths that ``tree`` has (the nearest paths are named).

    >>> import numpy as np
    >>> w = np.zeros((4, 8), np.float32); w[0, :2] = 1.0  # 30 of 32 values are zero
    >>> s = summarize({"w": w})
    >>> s.leaves[0].sparsity, s.memory_bytes, s.encoded_bytes  # 4 bytes mask + 2 floats
    (0.9375, 128, 12)
    """
    rows = []
    for path, x in jtree.leaves_with_paths(tree):
        r = _leaf_report(path, x)
        if r is not None:
            rows.append(r)
    if reference is not None:
        refs = jtree.match_by_path(tree, reference, name="reference")
        out = []
        for r in rows:
            ref = _leaf_report(r.path, refs[r.path])
            out.append(
                r if ref is None else dataclasses.replace(r, reference_bytes=ref.memory_bytes)
            )
        rows = out
    return Summary(tuple(rows))
