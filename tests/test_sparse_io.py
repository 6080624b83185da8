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


def test_long_stream_decodes_exactly_across_pieces():
    g = torch.Generator().manual_seed(1)
    gaps = torch.randint(1, 300, (1_500_000,), generator=g)  # one- and two-byte varints, about 2.9 MB
    idx = torch.cumsum(gaps, 0)
    encoded = encode_indices(idx)
    assert encoded.numel() > 2 * (1 << 20)  # decoded in several 1 MiB pieces
    assert torch.equal(decode_indices(encoded, (int(idx[-1]) + 1,), idx.numel()), idx)


def test_untrusted_stream_is_bounded_by_the_weight_and_the_values():
    stream = encode_indices(torch.tensor([3, 70, 900]))
    assert torch.equal(decode_indices(stream, (30, 31), 3), torch.tensor([3, 70, 900]))
    with pytest.raises(ValueError, match=r"5 values for a weight of shape \(2, 2\) \(4 entries\)"):
        decode_indices(stream, (2, 2), 5)
    with pytest.raises(ValueError, match="bytes for 1 values"):
        decode_indices(torch.full((10,), 0x81, dtype=torch.uint8).index_fill_(0, torch.tensor([9]), 1), (100,), 1)
    with pytest.raises(ValueError, match="2 values for 3 indices"):
        decode_indices(stream, (30, 31), 2)
    with pytest.raises(ValueError, match=r"index 900 is out of range for a weight of shape \(10, 10\)"):
        decode_indices(stream, (10, 10), 3)
    with pytest.raises(ValueError, match=r"index 900 is out of range"):
        decode_indices(torch.tensor([3, 70, 900]), (10, 10), 3)


def test_gaps_that_wrap_around_int64_are_caught():
    big = encode_indices(torch.tensor([2**62]))  # 9 bytes
    stream = torch.cat([big, big, big])  # indices 2**62, 2**63 (wraps), ...
    with pytest.raises(ValueError, match="overflow int64"):
        decode_indices(stream)
    with pytest.raises(ValueError, match="overflow int64|out of range"):
        decode_indices(stream, (2**62, 4), 3)


MEMORY_SCRIPT = r"""
import resource, torch
from mist_peft.sparse_io import decode_indices, encode_indices
MB = 20 * 2**20
cases = {
    "small weight": (torch.full((MB,), 0xFF, dtype=torch.uint8).index_fill_(0, torch.tensor([MB - 1]), 1),
                     (1024, 1024), 1000),
    "one terminator": (torch.full((MB,), 0xFF, dtype=torch.uint8).index_fill_(0, torch.tensor([MB - 1]), 1),
                       (2**40,), MB // 9 + 1),
    "gaps leave the weight": (torch.full((MB,), 0x7F, dtype=torch.uint8), (30_000_000,), MB),
    "gaps wrap around int64": (torch.cat([encode_indices(torch.tensor([2**62]))] * (MB // 9)), (2**62, 4), MB // 9),
}
decode_indices(encode_indices(torch.arange(0, 5000, 7)), (5000,), 715)  # warm up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, (stream, shape, count) in cases.items():
    try:
        decode_indices(stream, shape, count)
        print("ACCEPTED", name)
    except ValueError as err:
        print("REJECTED", name, "|", err)
print("EXTRA_MIB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_hostile_20mb_streams_cost_under_100_mib():
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("REJECTED") for line in lines) == 4, out.stdout
    extra = float(lines[-1].split()[-1])
    assert extra < 100, out.stdout  # peak RSS growth while decoding (the streams themselves exist before)
