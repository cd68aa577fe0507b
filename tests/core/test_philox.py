"""The random stream: Philox-4x32-10 known answers, chunk and batch invariance, Gaussian statistics."""

import math

import pytest
import torch

from localvol_fast.core.philox import gaussian_chunks, gaussian_directions, philox4x32, philox_bits, seed_to_key


def _words(*values):
    return tuple(torch.tensor([v], dtype=torch.int64) for v in values)


# Known-answer vectors of Philox-4x32-10 published with Random123 (Salmon et al., SC'11).
@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(_words(*counter), key)
    assert tuple(int(o) for o in out) == expected


def test_bits_follow_the_counter_layout():
    seed, index = (7 << 32) + 3, (5 << 32) + 11
    bits = philox_bits(seed, [index], 12)
    for block in range(3):
        words = philox4x32(_words(block, 0, index & 0xFFFFFFFF, index >> 32), seed_to_key(seed))
        assert bits[0, 4 * block : 4 * block + 4].tolist() == [int(w) for w in words]


def test_direction_depends_only_on_seed_index_and_element():
    whole = gaussian_directions(3, range(10), 37)
    for batch in (1, 3, 7):
        parts = torch.cat([gaussian_directions(3, range(i, min(i + batch, 10)), 37) for i in range(0, 10, batch)])
        assert torch.equal(parts, whole)
    assert torch.equal(gaussian_directions(3, [4, 9], 37), whole[[4, 9]])
    for start in (0, 1, 5, 13, 36):
        assert torch.equal(gaussian_directions(3, [6], 37 - start, start=start)[0], whole[6, start:])
    chunked = torch.cat([values for _, values in gaussian_chunks(3, 6, 37, chunk=5)])
    assert torch.equal(chunked, whole[6])


def test_seeds_and_indices_give_different_vectors():
    a = gaussian_directions(0, [0, 1], 64)
    b = gaussian_directions(1, [0, 1], 64)
    big = gaussian_directions(2**40 + 1, [2**33], 64)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, b)
    assert torch.isfinite(big).all()


def test_gaussian_statistics():
    g = gaussian_directions(12345, range(64), 4096).double().reshape(-1)
    n = g.numel()
    assert abs(float(g.mean())) < 5 / math.sqrt(n)
    assert abs(float(g.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((g**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    assert abs(float((g.abs() < 1).double().mean()) - 0.6826894921370859) < 5 * math.sqrt(0.25 / n)
    assert g.dtype == torch.float64 and torch.isfinite(g).all()


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="seed"):
        gaussian_directions(-1, [0], 4)
    with pytest.raises(ValueError, match="seed"):
        gaussian_directions(2**64, [0], 4)
    with pytest.raises(ValueError, match="indices"):
        gaussian_directions(0, [-3], 4)
    with pytest.raises(ValueError, match="dim"):
        gaussian_directions(0, [0], -1)
