"""The data of a distributed run (pilot.data.sharding), without starting any process: the ranks' batches put
together are the single-process batches, and the evaluation shards cover each example once."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from pilot.data import DatasetBundle, make_loaders
from pilot.data.sharding import ShardedBatchSampler, shard_bounds


def bundle(train: int, test: int = 10) -> DatasetBundle:
    return DatasetBundle(train=TensorDataset(torch.arange(train)), test=TensorDataset(torch.arange(test)),
                         num_classes=2, in_channels=1, image_size=1)


@pytest.mark.parametrize("size, batch, world", [(100, 10, 2), (103, 12, 3), (97, 8, 4), (101, 20, 2), (33, 4, 2)])
def test_the_ranks_batches_together_are_the_single_process_batches(size: int, batch: int, world: int) -> None:
    single, _ = make_loaders(bundle(size), batch, seed=3)
    ranks = [make_loaders(bundle(size), batch, seed=3, rank=rank, world_size=world)[0] for rank in range(world)]
    for epoch in range(3):  # the generator moves on from epoch to epoch alike
        expected = [b[0].tolist() for b in single]
        shards = [[b[0].tolist() for b in loader] for loader in ranks]
        final = size % batch
        if 0 < final < 2 * world:  # too small for every rank to get two examples: dropped
            expected = expected[:-1] if final > 1 else expected
        assert all(len(s) == len(expected) == len(loader) for s, loader in zip(shards, ranks)), epoch
        for step, whole in enumerate(expected):
            assert sum((s[step] for s in shards), []) == whole
            assert ranks[0].batch_sampler.global_size(step) == len(whole)
            assert min(len(s[step]) for s in shards) >= 2
        assert single.generator.get_state().equal(ranks[1].generator.get_state())


def test_evaluation_shards_cover_each_example_once() -> None:
    for size, world in ((10, 3), (7, 7), (120, 2), (5, 2)):
        bounds = [shard_bounds(size, rank, world) for rank in range(world)]
        assert [start for start, _ in bounds] == [0] + [end for _, end in bounds[:-1]]
        assert bounds[-1][1] == size and max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    loaders = [make_loaders(bundle(40, test=11), 9, rank=rank, world_size=3)[1] for rank in range(3)]
    assert sorted(x for loader in loaders for batch in loader for x in batch[0].tolist()) == list(range(11))
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        make_loaders(bundle(40, test=2), 9, rank=2, world_size=3)


def test_the_global_batch_must_split_evenly() -> None:
    with pytest.raises(ValueError, match="not divisible by the 4 ranks"):
        ShardedBatchSampler(100, 10, rank=0, world_size=4, generator=torch.Generator())
