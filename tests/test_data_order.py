"""The training data order (DataLoader): the unshuffled order is the file order it always was, the shuffled
one visits every block once per epoch in an order set by (seed, epoch) alone, any world size sees the
micro-batches one process sees, and a saved position continues exactly. References are brute force."""
import io

import numpy as np
import pytest
import torch

import train_gpt2 as tg

B, T = 2, 8


@pytest.fixture
def shards():
    # token = 1000 * shard + position, so a row's first token says where it was read
    return [(1000 * i + np.arange(n)).astype(np.uint16) for i, n in enumerate((40, 95, 17, 70))]


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def where(x):
    """(shard, start) of each row of a micro-batch."""
    return [(int(r[0]) // 1000, int(r[0]) % 1000) for r in x]


def test_unshuffled_is_consecutive_tokens_in_file_order(shards):
    expected = []  # brute force: B*T+1 consecutive tokens, shard after shard, as long as they fit
    for _ in range(3):
        for s in shards:
            for pos in range(0, len(s) - B * T, B * T):
                expected.append(s[pos: pos + B * T + 1].astype(np.int64))
    got = batches(tg.DataLoader(shards, B, T), len(expected))
    for buf, (x, y) in zip(expected, got):
        assert torch.equal(x, torch.from_numpy(buf[:-1]).view(B, T))
        assert torch.equal(y, torch.from_numpy(buf[1:]).view(B, T))


def epoch_rows(loader, shards):
    per_epoch = sum((len(s) - 1) // T // B for s in shards)
    return [r for x, _ in batches(loader, per_epoch) for r in where(x)]


def test_shuffled_epochs_visit_every_block_once_in_a_new_order(shards):
    loader = tg.DataLoader(shards, B, T, shuffle=True, seed=5)
    epochs = [epoch_rows(loader, shards) for _ in range(3)]
    for rows in epochs:
        assert len(set(rows)) == len(rows)  # no block twice
        order = [s for i, (s, _) in enumerate(rows) if i == 0 or rows[i - 1][0] != s]
        assert sorted(order) == [0, 1, 2, 3]  # each shard read once, in one stretch
        for s, shard in enumerate(shards):
            starts = sorted(p for t, p in rows if t == s)
            n_blocks = (len(shard) - 1) // T
            assert len(starts) == n_blocks // B * B and all(p % T == 0 and p + T < len(shard) for p in starts)
    assert epochs[0] != epochs[1] != epochs[2]
    again = tg.DataLoader(shards, B, T, shuffle=True, seed=5)
    assert [epoch_rows(again, shards) for _ in range(3)] == epochs  # the seed and the epoch set the order
    assert epoch_rows(tg.DataLoader(shards, B, T, shuffle=True, seed=6), shards) != epochs[0]
    for x, y in batches(tg.DataLoader(shards, B, T, shuffle=True, seed=5), 20):
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)  # targets: next token


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_see_what_one_process_sees(shards, shuffle, world_size):
    one = batches(tg.DataLoader(shards, B, T, shuffle=shuffle, seed=1), 12 * world_size)
    ranks = [batches(tg.DataLoader(shards, B, T, r, world_size, shuffle, 1), 12) for r in range(world_size)]
    for j, (x, y) in enumerate(one):
        xr, yr = ranks[j % world_size][j // world_size]
        assert torch.equal(x, xr) and torch.equal(y, yr)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_saved_position_continues_exactly(shards, shuffle):
    full = batches(tg.DataLoader(shards, B, T, shuffle=shuffle, seed=3), 40)
    for k in range(0, 40, 3):  # stop anywhere, including at epoch ends
        loader = tg.DataLoader(shards, B, T, shuffle=shuffle, seed=3)
        batches(loader, k)
        f = io.BytesIO()
        torch.save(loader.state_dict(), f)
        f.seek(0)
        resumed = tg.DataLoader(shards, B, T, 1, 2, shuffle=not shuffle, seed=99)  # the state sets order and seed
        resumed.load_state_dict(torch.load(f, weights_only=True))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(full[k + 1::2], batches(resumed, (40 - k) // 2)))


def test_a_position_from_before_shuffling_continues_in_file_order(shards):
    full = batches(tg.DataLoader(shards, B, T), 20)
    loader = tg.DataLoader(shards, B, T)
    batches(loader, 7)
    old = {"shard": loader.shard, "pos": loader.pos}  # what checkpoints held before --shuffle
    resumed = tg.DataLoader(shards, B, T, shuffle=True, seed=1)
    resumed.load_state_dict(old)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[7:], batches(resumed, 13)))
