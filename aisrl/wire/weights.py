"""Policy weights as a stream of `WeightChunk` messages, and back, verified.

Invariant: a state dict that comes out of `WeightsAssembler.finish()` is byte-for-byte the one
that went into `iter_weight_chunks`, or an error says what is wrong (`WeightsIntegrityError`),
never a partial or silently altered dict. The stream order is fixed: tensors in ascending name
order, each tensor's bytes in order, in chunks of at most `max_chunk_bytes`; the first chunk of a
tensor carries its name, dtype, shape and byte size, later chunks only data and offset; the last
chunk of the stream has `last` set and the sha256 over every payload byte in that order (the
same digest `weights_digest` returns, which the version notice announces). Payloads are the
tensors' raw little-endian bytes, as in safetensors; every safetensors dtype torch has is
supported, bfloat16 and float8 included.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from aisrl.v1 import weights_pb2

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 64 << 20


class WeightsIntegrityError(ValueError):
    """A weight stream that does not describe exactly one consistent, complete state dict."""


@dataclass(frozen=True)
class WeightsDigest:
    """What a version notice announces about a state dict."""

    sha256: str
    total_bytes: int
    num_tensors: int


def chunk_size(requested: int) -> int:
    """The chunk size served for a request: 0 means the default; otherwise clamped to [MIN, MAX]."""
    if requested <= 0:
        return DEFAULT_CHUNK_BYTES
    return max(MIN_CHUNK_BYTES, min(int(requested), MAX_CHUNK_BYTES))


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WeightsIntegrityError(f"dtype {dtype} cannot travel as weights (supported: {sorted(DTYPES)})") from None


def tensor_payload(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes, little-endian, C order (a view when the tensor is already contiguous on the CPU)."""
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise RuntimeError("weight payloads are little-endian; this host is big-endian")
    dtype_name(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def weight_order(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The fetch order: ascending tensor names, so that every producer hashes the same byte sequence."""
    return sorted(state)


def weights_digest(state: Mapping[str, torch.Tensor]) -> WeightsDigest:
    """sha256 over the payloads in fetch order, total payload bytes and tensor count."""
    digest = hashlib.sha256()
    total = 0
    for name in weight_order(state):
        payload = tensor_payload(state[name])
        digest.update(payload)
        total += len(payload)
    return WeightsDigest(digest.hexdigest(), total, len(state))


def iter_weight_chunks(
    state: Mapping[str, torch.Tensor], version: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[weights_pb2.WeightChunk]:
    """The chunks of one version (see the module invariant); an empty state dict is one empty `last` chunk."""
    size = chunk_size(max_chunk_bytes)
    digest = hashlib.sha256()
    names = weight_order(state)
    if not names:
        yield weights_pb2.WeightChunk(version=version, last=True, sha256=digest.hexdigest())
        return
    for index, name in enumerate(names):
        tensor = state[name]
        payload = tensor_payload(tensor)
        final_tensor = index == len(names) - 1
        offsets = range(0, len(payload), size) if len(payload) else range(1)
        for offset in offsets:
            data = bytes(payload[offset : offset + size])
            digest.update(data)
            chunk = weights_pb2.WeightChunk(version=version, offset=offset, data=data)
            if offset == 0:
                chunk.tensor_name = name
                chunk.dtype = dtype_name(tensor.dtype)
                chunk.shape.extend(tensor.shape)
                chunk.tensor_bytes = len(payload)
            if final_tensor and offset + size >= len(payload):
                chunk.last = True
                chunk.sha256 = digest.hexdigest()
            yield chunk


@dataclass
class _Partial:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: bytearray
    received: int = 0

    @property
    def complete(self) -> bool:
        return self.received == len(self.buffer)

    def tensor(self) -> torch.Tensor:
        if not self.buffer:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(self.buffer, dtype=torch.uint8).view(self.dtype).reshape(self.shape)


class WeightsAssembler:
    """Rebuilds a state dict chunk by chunk, checking everything the module invariant promises.

    Expected values (from the version notice) are checked when given: the version of every
    chunk, the sha256, the total payload bytes and the tensor count.
    """

    def __init__(
        self,
        expected_version: int | None = None,
        expected_sha256: str | None = None,
        expected_total_bytes: int | None = None,
        expected_num_tensors: int | None = None,
    ) -> None:
        self.expected_version = expected_version
        self.expected_sha256 = expected_sha256 or None
        self.expected_total_bytes = expected_total_bytes
        self.expected_num_tensors = expected_num_tensors
        self._digest = hashlib.sha256()
        self._tensors: dict[str, torch.Tensor] = {}
        self._current: _Partial | None = None
        self._version: int | None = None
        self._chunks = 0
        self._total = 0
        self._done = False

    def _fail(self, message: str) -> WeightsIntegrityError:
        return WeightsIntegrityError(f"weight chunk {self._chunks}: {message}")

    def add(self, chunk: weights_pb2.WeightChunk) -> None:
        if self._done:
            raise self._fail("chunk after the last chunk")
        self._check_version(chunk.version)
        if chunk.tensor_name and (self._current is None or self._current.complete):
            self._start_tensor(chunk)
        elif chunk.data or chunk.tensor_name:
            self._continue_tensor(chunk)
        self._write(chunk)
        self._chunks += 1
        if chunk.last:
            self._finish_stream(chunk)

    def _check_version(self, version: int) -> None:
        if self.expected_version is not None and version != self.expected_version:
            raise self._fail(f"version {version}, expected {self.expected_version}")
        if self._version is not None and version != self._version:
            raise self._fail(f"version {version} in a stream of version {self._version}")
        self._version = version

    def _start_tensor(self, chunk: weights_pb2.WeightChunk) -> None:
        name = chunk.tensor_name
        previous = self._current.name if self._current else None
        if previous is not None and name <= previous:
            raise self._fail(f"tensor {name!r} after {previous!r}: tensors must come in ascending name order")
        if chunk.offset != 0:
            raise self._fail(f"tensor {name!r} starts at offset {chunk.offset}, not 0")
        if chunk.dtype not in DTYPES:
            raise self._fail(f"tensor {name!r} has unsupported dtype {chunk.dtype!r} (supported: {sorted(DTYPES)})")
        shape = tuple(int(d) for d in chunk.shape)
        if any(d < 0 for d in shape):
            raise self._fail(f"tensor {name!r} has a negative dimension in shape {list(shape)}")
        dtype = DTYPES[chunk.dtype]
        size = math.prod(shape) * dtype.itemsize
        if chunk.tensor_bytes != size:
            raise self._fail(
                f"tensor {name!r} announces {chunk.tensor_bytes} bytes, but shape {list(shape)} of {chunk.dtype} "
                f"needs {size}"
            )
        self._current = _Partial(name, dtype, shape, bytearray(size))

    def _continue_tensor(self, chunk: weights_pb2.WeightChunk) -> None:
        current = self._current
        if current is None or current.complete:
            raise self._fail("data without a tensor header (name, dtype, shape)")
        if chunk.tensor_name and chunk.tensor_name != current.name:
            raise self._fail(f"chunk names tensor {chunk.tensor_name!r} while {current.name!r} is incomplete")
        if chunk.offset != current.received:
            raise self._fail(f"tensor {current.name!r}: offset {chunk.offset}, expected {current.received}")

    def _write(self, chunk: weights_pb2.WeightChunk) -> None:
        data = chunk.data
        if not data and self._current is None:
            return
        current = self._current
        if current is None:  # data without header is caught in _continue_tensor; kept for type narrowing
            raise self._fail("data without a tensor header")
        end = current.received + len(data)
        if end > len(current.buffer):
            raise self._fail(f"tensor {current.name!r}: {end} bytes received, {len(current.buffer)} announced")
        current.buffer[current.received : end] = data
        current.received = end
        self._digest.update(data)
        self._total += len(data)
        if current.complete and current.name not in self._tensors:
            self._tensors[current.name] = current.tensor()

    def _finish_stream(self, chunk: weights_pb2.WeightChunk) -> None:
        if self._current is not None and not self._current.complete:
            c = self._current
            raise self._fail(f"last chunk arrived with tensor {c.name!r} at {c.received} of {len(c.buffer)} bytes")
        computed = self._digest.hexdigest()
        if not chunk.sha256:
            raise self._fail("the last chunk carries no sha256; the stream cannot be verified")
        if chunk.sha256 != computed:
            raise self._fail(f"sha256 mismatch: computed {computed}, the stream says {chunk.sha256}")
        if self.expected_sha256 is not None and self.expected_sha256 != computed:
            raise self._fail(f"sha256 mismatch: computed {computed}, the notice says {self.expected_sha256}")
        if self.expected_total_bytes is not None and self._total != self.expected_total_bytes:
            raise self._fail(f"{self._total} payload bytes, the notice says {self.expected_total_bytes}")
        if self.expected_num_tensors is not None and len(self._tensors) != self.expected_num_tensors:
            raise self._fail(f"{len(self._tensors)} tensors, the notice says {self.expected_num_tensors}")
        self._done = True

    @property
    def done(self) -> bool:
        return self._done

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def finish(self) -> dict[str, torch.Tensor]:
        """The verified state dict; an error when the stream ended before its last chunk."""
        if not self._done:
            raise WeightsIntegrityError(f"weight stream ended after {self._chunks} chunks without its last chunk")
        return dict(self._tensors)


def assemble_weights(
    chunks: Iterable[weights_pb2.WeightChunk],
    expected_version: int | None = None,
    expected_sha256: str | None = None,
    expected_total_bytes: int | None = None,
    expected_num_tensors: int | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of a complete chunk stream (see WeightsAssembler)."""
    assembler = WeightsAssembler(expected_version, expected_sha256, expected_total_bytes, expected_num_tensors)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
