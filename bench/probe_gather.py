"""Peak memory of the linear probe: its feature extraction on 1 rank and on 2 gloo ranks, and its fit.

python -m bench.probe_gather [--n=100000] [--dim=1024] [--fit_n=40000] [--fit_dim=512]
n features of dim (float32) from a linear encoder over a tensor dataset, through evaluate.embeddings as the probe
calls it (each rank encodes its slice, the slices are gathered to rank 0 alone) and, for reference, with the
all-gather to every rank that zero-shot and retrieval use. Each rank's peak resident memory (max RSS) above what
it held before the extraction, in MiB, next to the size of the whole feature set; 1 rank, then 2. Then the fit
(evaluate.linear_probe, bench.probe's features, 10 classes) in a fresh process: its peak above the features, in
float64 copies of the (fit_n, fit_dim) train features (evaluate.PROBE_COPIES is the bound that fit_probes uses).
"""
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import evaluate
from bench import exit_on_help
from config import Config


class Encoder(nn.Module):
    """The probe's view of a model: .visual maps a batch to its features."""

    def __init__(self, dim):
        super().__init__()
        self.visual = nn.Linear(12, dim)


def resident_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def extract(rank, world, n, dim, to_first, out):
    """One rank: the features gathered as the probe does (to_first) or to every rank; writes its peak above start."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group('gloo', init_method=f'file://{out}.rendezvous', rank=rank, world_size=world)
    dataset = TensorDataset(torch.randn(n, 12, generator=torch.Generator().manual_seed(0)), torch.zeros(n).long())
    model, cfg = Encoder(dim), Config(eval_batch_size=4096, workers=0)
    start = resident_mib()
    with torch.no_grad():
        features, _, _ = evaluate.embeddings(model, cfg, dataset, ['trunk'], lambda x: {'trunk': model.visual(x)},
                                             rank, world, to_first)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start  # Linux: KiB
    held = 'none' if features['trunk'] is None else f"{tuple(features['trunk'].shape)}"
    Path(f'{out}.{rank}').write_text(f'{peak:.0f} {held}')
    if world > 1:
        dist.destroy_process_group()


def fit(rank, n, dim, out):
    """The probe's fit on n x dim features; writes its peak RSS above the features in float64 copies of them."""
    from bench.probe import features
    torch.set_num_threads(1)
    x, y = features(n, dim, 10, 0)
    tx, ty = features(n // 10, dim, 10, 1)
    start = resident_mib()
    evaluate.linear_probe(x, y, tx, ty, 10, 'acc')
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start
    Path(out).write_text(f'{peak * 2**20 / (n * dim * 8):.2f} {peak:.0f}')


def main(argv):
    exit_on_help(argv, __doc__)
    args = {'n': 100_000, 'dim': 1024, 'fit_n': 40_000, 'fit_dim': 512,
            **{k[2:]: int(v) for k, v in (a.split('=') for a in argv)}}
    n, dim = args['n'], args['dim']
    print(f"probe features: {n} x {dim} float32 = {n * dim * 4 / 2**20:,.0f} MiB in all; peak RSS above the start "
          f"of the extraction, per rank (MiB):")
    with tempfile.TemporaryDirectory() as tmp:
        for label, world, to_first in (('1 rank', 1, True), ('2 ranks, gathered to rank 0', 2, True),
                                       ('2 ranks, all-gathered (reference)', 2, False)):
            out = f'{tmp}/{world}{to_first}'
            torch.multiprocessing.spawn(extract, args=(world, n, dim, to_first, out), nprocs=world)
            cells = [Path(f'{out}.{r}').read_text().split(' ', 1) for r in range(world)]
            print(f"  {label:34s} " + ', '.join(f"rank {r}: {peak} (holds {held})" for r, (peak, held)
                                                in enumerate(cells)), flush=True)
        torch.multiprocessing.spawn(fit, args=(args['fit_n'], args['fit_dim'], f'{tmp}/fit'), nprocs=1)
        copies, peak = Path(f'{tmp}/fit').read_text().split()
        print(f"fit on {args['fit_n']} x {args['fit_dim']} (+ {args['fit_n'] // 10} test): peak {peak} MiB above the "
              f"features = {copies} float64 copies of the train features (bound used: {evaluate.PROBE_COPIES})")


if __name__ == '__main__':
    main(sys.argv[1:])
