"""Run by test_shards_stream.py under torchrun: each rank streams the train split with 2 workers and reports.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/shards/shards_dist_check.py SHARDS OUT
"""

import json
import sys

import torch.distributed as dist

from shards.stream import ShardStream


def main(shards: str, out: str):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    for tag, epoch in (("epoch0", 0), ("epoch0_again", 0), ("epoch1", 1)):
        stream = ShardStream(shards, "train", 2, rank=rank, world_size=world, num_workers=2, seed=5,
                             shuffle_buffer=8)
        stream.epoch = epoch
        keys = [batch["key"] for batch in stream]
        report[tag] = {"len": len(stream), "keys": keys, "dropped": stream.dropped_per_epoch,
                       "epoch_after": stream.epoch}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(reports, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
