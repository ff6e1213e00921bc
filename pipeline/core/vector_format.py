"""How vectors are stored: the ``embedding_vector`` column's type (float32 or float16)
and optional compact columns beside it (docs/schema.md, "Smaller vectors").

- ``float16`` halves the bytes of every vector; readers give float32 back.
- ``binary``: ``embedding_binary``, the sign bits of each vector packed eight to a byte
  (dimension ÷ 8 bytes), for candidates by Hamming distance that are then rescored on
  the full vectors (``pipeline.output.search``).
- ``int8``: ``embedding_int8``, each value times ``127 / int8_range``, rounded and
  clipped to ±127. The range is one number for the whole output (recorded in every
  shard as ``int8_range``), so int8 dot products compare across shards; it follows
  from the dimension alone, because a unit vector's values shrink as 1/√dimension.

The format is recorded in every shard (``vector_dtype``, ``compact_columns``) and is one
of the settings an output's shards must share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pyarrow as pa

VECTOR_DTYPES = ("float32", "float16")
COMPACT_COLUMNS = ("binary", "int8")
BINARY_COLUMN, INT8_COLUMN = "embedding_binary", "embedding_int8"
# A unit vector's values have a spread of about 1/√dimension; int8 covers this many of
# those either side of zero, and clips values beyond (none on the shared corpus's
# minilm vectors, docs/performance.md).
INT8_SPREADS = 8.0


def int8_range(dimension: int) -> float:
    """The magnitude that int8's ±127 stands for, at this dimension."""
    return min(1.0, INT8_SPREADS / math.sqrt(dimension))


@dataclass(frozen=True)
class VectorFormat:
    """The vector column's type and the compact columns beside it."""

    dtype: str = "float32"
    compact: tuple[str, ...] = ()

    @classmethod
    def parse(cls, dtype: str, compact_columns: str) -> "VectorFormat":
        """From ``--vector-dtype`` and ``--compact-columns`` (comma-separated), with
        one clear line for a value not known."""
        if dtype not in VECTOR_DTYPES:
            raise PipelineError(f"unknown vector dtype {dtype!r}; choose one of {', '.join(VECTOR_DTYPES)}")
        names = [name.strip() for name in compact_columns.split(",") if name.strip()]
        unknown = [name for name in names if name not in COMPACT_COLUMNS]
        if unknown:
            raise PipelineError(f"unknown compact column {unknown[0]!r}; choose from {', '.join(COMPACT_COLUMNS)}")
        return cls(dtype, tuple(name for name in COMPACT_COLUMNS if name in names))

    @classmethod
    def of(cls, settings: dict[str, str]) -> "VectorFormat":
        """The format a shard's settings record (shards from before it was recorded:
        float32 and no compact columns)."""
        return cls.parse(settings.get("vector_dtype", "float32"), settings.get("compact_columns", ""))

    def settings(self, dimension: int) -> dict[str, str]:
        recorded = {"vector_dtype": self.dtype, "compact_columns": ",".join(self.compact)}
        if "int8" in self.compact:
            recorded["int8_range"] = repr(int8_range(dimension))
        return recorded

    def check(self, dimension: int) -> None:
        if "binary" in self.compact and dimension % 8:
            raise PipelineError(f"the binary column packs 8 dimensions a byte; {dimension} is not a multiple of 8")

    def fields(self, dimension: int) -> list["pa.Field"]:
        """The vector column and the compact columns, in the order a shard holds them."""
        import pyarrow as pa

        value = pa.float16() if self.dtype == "float16" else pa.float32()
        fields = [pa.field("embedding_vector", pa.list_(value, dimension), nullable=False)]
        if "binary" in self.compact:
            fields.append(pa.field(BINARY_COLUMN, pa.binary(dimension // 8), nullable=False))
        if "int8" in self.compact:
            fields.append(pa.field(INT8_COLUMN, pa.list_(pa.int8(), dimension), nullable=False))
        return fields

    def column_names(self) -> list[str]:
        """The compact columns' names."""
        return [{"binary": BINARY_COLUMN, "int8": INT8_COLUMN}[name] for name in self.compact]

    def mismatches(self, batch: "pa.RecordBatch", vectors: np.ndarray) -> dict[str, np.ndarray]:
        """Rows whose compact columns do not follow from their vectors (``verify``):
        another sign, or an int8 value off by more than its rounding."""
        wrong = {}
        if "binary" in self.compact:
            wrong["binary column not the vectors' signs"] = (binary_rows(batch.column(BINARY_COLUMN)) != pack_signs(vectors)).any(axis=1)
        if "int8" in self.compact:
            stored = list_rows(batch.column(INT8_COLUMN)).astype(np.int16)
            wrong["int8 column not the vectors rounded"] = (np.abs(stored - quantize_int8(vectors)) > 1).any(axis=1)
        return wrong

    def arrays(self, vectors: np.ndarray) -> list["pa.Array"]:
        """The arrays of ``fields`` for float32 unit vectors ``[n, dimension]``."""
        import pyarrow as pa

        n, dimension = vectors.shape
        stored = np.ascontiguousarray(vectors, dtype=np.float16 if self.dtype == "float16" else np.float32)
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), dimension)]
        if "binary" in self.compact:  # from the values as stored, so a reader finds the same
            packed = np.ascontiguousarray(pack_signs(stored))
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(pa.binary(dimension // 8), n, [None, pa.py_buffer(packed)]))
        if "int8" in self.compact:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(quantize_int8(stored).reshape(-1), pa.int8()), dimension))
        return arrays


def list_rows(column: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    """A fixed-size list column (vectors, int8 values) as ``[n, size]``, in its stored type."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)


def stored_vectors(column: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    """An ``embedding_vector`` column as float32 ``[n, dimension]``, whatever it stores."""
    return list_rows(column).astype(np.float32, copy=False)


def pack_signs(vectors: np.ndarray) -> np.ndarray:
    """``[n, dimension / 8]`` bytes: bit set where a value is above zero, first value in
    the highest bit (numpy's packbits order, as most vector stores take it)."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def binary_rows(column: "pa.Array | pa.ChunkedArray") -> np.ndarray:
    """A binary column's values as ``[n, bytes]`` uint8, without a copy per row."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.byte_width
    data = np.frombuffer(array.buffers()[1], np.uint8)
    return data[array.offset * width:(array.offset + len(array)) * width].reshape(len(array), width)


def hamming_distances(packed: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Differing bits between each row of ``packed`` ``[n, bytes]`` and a packed query."""
    return np.unpackbits(np.bitwise_xor(packed, query[None, :]), axis=1).sum(axis=1, dtype=np.int32)


def quantize_int8(vectors: np.ndarray) -> np.ndarray:
    scale = 127.0 / int8_range(vectors.shape[1])
    return np.clip(np.rint(np.asarray(vectors, dtype=np.float32) * scale), -127, 127).astype(np.int8)


def dequantize_int8(values: np.ndarray, value_range: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32) * np.float32(value_range / 127.0)
