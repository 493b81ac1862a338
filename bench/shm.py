"""Bytes of training batches in flight in /dev/shm per rank: loader workers x prefetched batches x batch bytes.

python -m bench.shm [--cores=224] [--gpus=8]
For the cc3m recipe and the demo on a node of --cores threads and --gpus GPUs, one rank per GPU: before (float32
views, the automatic cores - 1 workers per rank) and after (uint8 views, the automatic workers capped at
config.MAX_AUTO_WORKERS), per rank and per node, from data.batch_bytes. Checked first against a real batch of the
demo loader on this machine (its views' bytes as they are handed over today, the tokens trimmed to the batch).
"""
import sys
from unittest import mock

import torch

import config
import data
from bench import exit_on_help

FLOAT32 = 4


def measured_batch_bytes(cfg):
    """Bytes of the tensors of one real training batch (workers=0: the same collate as the workers')."""
    batch = next(iter(data.build_train_loader(cfg, data.build_tokenizer(cfg))))
    tensors = [v for v in batch.values() if torch.is_tensor(v)] + [t for v in batch.values() if isinstance(v, list)
                                                                   for t in v if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors), batch


def in_flight(cfg, workers, view_bytes):
    return data.PREFETCH * workers * data.batch_bytes(cfg, view_bytes)


def main(argv):
    exit_on_help(argv, __doc__)
    args = {'cores': 224, 'gpus': 8, **{k[2:]: int(v) for k, v in (a.split('=') for a in argv)}}
    demo = config.resolve({'workers': '0'}, verbose=False)
    measured, batch = measured_batch_bytes(demo)
    element = batch['weak'].element_size()  # the views as the workers hand them over today
    print(f"demo batch on this machine: {measured:,} bytes measured, {data.batch_bytes(demo, element):,} by "
          f"data.batch_bytes at {element} byte(s) a pixel channel (its tokens at the full {demo.context_length}; "
          f"the loader trims them to the batch's longest caption)")
    print(f"bytes in flight per rank (PREFETCH={data.PREFETCH} batches a worker), a node of {args['cores']} threads "
          f"and {args['gpus']} GPUs:")
    with mock.patch.object(config.os, 'sched_getaffinity', lambda pid: set(range(args['cores']))):
        capped = config.cpu_split(-1, 0, 'cuda', args['gpus'])[0]
    uncapped = args['cores'] // args['gpus'] - 1
    for name, batch in (('cc3m', '128'), ('demo', '64')):  # cc3m: the paper's 128 per GPU (its 4,096 on 32 GPUs)
        cfg = config.resolve({'dataset': name, 'batch_size': batch}, verbose=False)
        before, after = in_flight(cfg, uncapped, FLOAT32), in_flight(cfg, capped, data.VIEW_BYTES)
        print(f"  {name:5s} batch {cfg.batch_size} at {cfg.image_size}/{cfg.local_crop_size} px, A={cfg.num_augs}: "
              f"before {uncapped} workers x {data.batch_bytes(cfg, FLOAT32) / 2**20:.1f} MiB float32 = "
              f"{before / 2**20:,.0f} MiB ({args['gpus'] * before / 2**20:,.0f} MiB a node); after {capped} workers "
              f"x {data.batch_bytes(cfg) / 2**20:.1f} MiB uint8 = {after / 2**20:,.0f} MiB "
              f"({args['gpus'] * after / 2**20:,.0f} MiB a node): {before / after:.1f}x less")


if __name__ == '__main__':
    main(sys.argv[1:])
