"""Compact on-disk encoding of the selected entries: sorted flat indices as LEB128 varint gaps.

At density 0.05 the gap between selected entries averages 20, so almost every index costs one byte
(0.05 bytes per targeted weight) instead of four for int32. Decoding is vectorised in torch. Every
malformed input (truncation, duplicates, out-of-range entries) raises `ValueError` saying what is wrong.
"""

from __future__ import annotations

import math

import torch


def encode_indices(indices: torch.Tensor) -> torch.Tensor:
    """Encode strictly increasing flat indices as a uint8 varint stream of gaps (the first gap is the first index)."""
    idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    gaps = torch.diff(idx, prepend=idx.new_zeros(1))
    if gaps.numel() > 1 and int(gaps[1:].min()) <= 0:
        raise ValueError("indices must be strictly increasing (sorted, no duplicates) to be encoded")
    if int(gaps[0]) < 0:
        raise ValueError("indices must be non-negative")
    # Number of 7-bit groups per gap (at least one).
    nbytes = torch.ones_like(gaps)
    rest = gaps >> 7
    while bool((rest > 0).any()):
        nbytes += (rest > 0).long()
        rest = rest >> 7
    total = int(nbytes.sum())
    owner = torch.repeat_interleave(torch.arange(gaps.numel()), nbytes)
    starts = torch.cumsum(nbytes, 0) - nbytes
    position = torch.arange(total) - starts[owner]
    groups = (gaps[owner] >> (7 * position)) & 0x7F
    is_last = position == (nbytes[owner] - 1)
    return (groups | (~is_last).long() << 7).to(torch.uint8)


MAX_VARINT_BYTES = 9  # 9 groups of 7 bits hold any gap below 2**63
_CHUNK_BYTES = 1 << 20  # decode in pieces so temporaries stay small for any stream size


def decode_indices(encoded: torch.Tensor, shape: tuple[int, ...] | None = None,
                   count: int | None = None) -> torch.Tensor:
    """Inverse of `encode_indices`; returns int64 indices. Also accepts plain integer index tensors.

    With `shape` (the target weight's) and `count` (the number of values), an untrusted stream is bounded
    before anything is decoded: `count` fits the weight, the stream holds at most 9 bytes per index and
    exactly `count` terminating bytes. Decoding then runs in 1 MiB pieces, so its temporaries stay a few
    MiB whatever the stream's size; gaps that overflow int64 or leave the weight raise `ValueError`.
    """
    numel = math.prod(shape) if shape is not None else None
    if count is not None and numel is not None and count > numel:
        raise ValueError(f"{count} values for a weight of shape {tuple(shape)} ({numel} entries)")
    if encoded.dtype != torch.uint8:
        if encoded.dtype.is_floating_point or encoded.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, found dtype {encoded.dtype}")
        if count is not None and encoded.numel() != count:
            raise ValueError(f"{count} values for {encoded.numel()} indices")
        idx = encoded.to(torch.int64).reshape(-1)
        check_strictly_increasing(idx)
        _check_in_range(idx, shape, numel)
        return idx
    data = encoded.to("cpu").reshape(-1)
    if data.numel() and int(data[-1]) >= 0x80:
        raise ValueError("the index stream is truncated (its last varint is unterminated)")
    if count is not None:
        if data.numel() > MAX_VARINT_BYTES * count:
            raise ValueError(f"the index stream has {data.numel()} bytes for {count} values (at most "
                             f"{MAX_VARINT_BYTES} bytes per index)")
        terminators = sum(int((data[i:i + _CHUNK_BYTES] < 0x80).sum()) for i in range(0, data.numel(), _CHUNK_BYTES))
        if terminators != count:
            raise ValueError(f"{count} values for {terminators} indices in the index stream")
    if data.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    pieces, offset, start = [], 0, 0
    while start < data.numel():
        window = data[start:start + _CHUNK_BYTES]
        ends = torch.nonzero(window < 0x80).reshape(-1)
        if ends.numel() == 0:
            raise ValueError("the index stream is corrupted (a gap longer than 63 bits)")
        piece = window[: int(ends[-1]) + 1]
        gaps = _decode_gaps(piece)
        later = gaps if pieces else gaps[1:]  # only the very first index may be 0
        if later.numel() and int(later.min()) == 0:
            raise ValueError("the index stream holds duplicated indices")
        idx = torch.cumsum(gaps, 0) + offset
        if int(idx.min()) < 0:
            raise ValueError("the index stream is corrupted (its gaps overflow int64)")
        _check_in_range(idx[-1:], shape, numel)
        offset = int(idx[-1])
        pieces.append(idx)
        start += piece.numel()
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _decode_gaps(piece: torch.Tensor) -> torch.Tensor:
    """Gaps of a piece of the stream that ends with a terminating byte."""
    data = piece.long()
    is_last = data < 0x80
    owner = torch.cumsum(is_last.long(), 0) - is_last.long()
    n = int(is_last.sum())
    starts = torch.zeros(n, dtype=torch.int64)
    ends = torch.nonzero(is_last).reshape(-1)
    starts[1:] = ends[:-1] + 1
    position = torch.arange(data.numel()) - starts[owner]
    if int(position.max()) >= MAX_VARINT_BYTES:
        raise ValueError("the index stream is corrupted (a gap longer than 63 bits)")
    return torch.zeros(n, dtype=torch.int64).index_add_(0, owner, (data & 0x7F) << (7 * position))


def _check_in_range(idx: torch.Tensor, shape: tuple[int, ...] | None, numel: int | None) -> None:
    if numel is not None and idx.numel() and int(idx.max()) >= numel:
        raise ValueError(f"index {int(idx.max())} is out of range for a weight of shape {tuple(shape)} "
                         f"({numel} entries)")


def check_strictly_increasing(idx: torch.Tensor) -> None:
    """Raise `ValueError` for duplicated or unsorted indices (a selection is a set, stored sorted)."""
    if idx.numel() > 1:
        steps = torch.diff(idx)
        if bool((steps == 0).any()):
            raise ValueError("the indices contain duplicates")
        if bool((steps < 0).any()):
            raise ValueError("the indices are not sorted")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("the indices contain negative entries")
