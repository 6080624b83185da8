"""The varint index encoding: exact round trips, size, and errors for malformed streams."""

import pytest
import torch

from mist_peft.sparse_io import decode_indices, encode_indices


@pytest.mark.parametrize("indices", [[], [0], [5], [0, 1, 2], [127, 128, 16383, 16384, 2**31 + 7, 2**40]])
def test_round_trip(indices):
    idx = torch.tensor(indices, dtype=torch.int64)
    assert torch.equal(decode_indices(encode_indices(idx)), idx)


def test_random_selection_round_trip_costs_about_one_byte_per_index():
    g = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randperm(1_000_000, generator=g)[:50_000]).values
    encoded = encode_indices(idx)
    assert encoded.dtype == torch.uint8
    assert torch.equal(decode_indices(encoded), idx)
    assert encoded.numel() / idx.numel() < 1.05  # gaps average 20 < 128


def test_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_indices(torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="truncated"):
        decode_indices(torch.tensor([0x85], dtype=torch.uint8))
    with pytest.raises(ValueError, match="duplicated"):
        decode_indices(torch.tensor([5, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match="duplicates"):
        decode_indices(torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="integer"):
        decode_indices(torch.tensor([1.0]))
