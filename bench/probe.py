"""Linear-probe time (evaluate.linear_probe) on CIFAR-10-sized generated features, on the CPU.

python -m bench.probe [--n=50000] [--test=10000] [--dim=512] [--classes=10] [--threads=1] [--reference=1]
Seeded Gaussian features shaped like an encoder's: 10 class means in a 64-dim subspace, a decaying spectrum of
nuisance directions and a common offset. Prints the whole probe (sweep, refit, test): wall and CPU time, the
L-BFGS iterations of each fit (the coarse grid strongest first, the refinement, the refit); with --reference=1
the same protocol with its sweep in float64 as well, and the ratio.
"""
import sys
import time

import torch

import evaluate
from bench import exit_on_help


def features(n, dim, classes, seed, signal=64):
    """(x (n, dim) float32, labels (n,)); the class means and the embedding are the same for every seed."""
    g, shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(1234)
    y = torch.randint(classes, (n,), generator=g)
    means = torch.randn(classes, signal, generator=shared) * 0.5
    embed = torch.linalg.qr(torch.randn(dim, dim, generator=shared))[0]
    spectrum = torch.cat([torch.ones(signal), 0.3 * torch.arange(1, dim - signal + 1) ** -0.7])
    latent = torch.randn(n, dim, generator=g) * spectrum
    latent[:, :signal] += means[y]
    return latent @ embed.T + 1.0, y


def timed_probe(x, y, tx, ty, classes, sweep_dtype):
    """(wall s, CPU s, iterations of each fit, metrics) of one linear_probe run."""
    fits, solve = [], evaluate.fit_logistic

    def counted(*a, **k):
        out = solve(*a, **k)
        fits.append(out[2])
        return out

    evaluate.fit_logistic = counted
    start, cpu = time.perf_counter(), time.process_time()
    try:
        out = evaluate.linear_probe(x, y, tx, ty, classes, 'acc', sweep_dtype=sweep_dtype)
    finally:
        evaluate.fit_logistic = solve
    return time.perf_counter() - start, time.process_time() - cpu, fits, out  # CPU time: steadier on a busy machine


def main(argv):
    exit_on_help(argv, __doc__)
    args = {'n': 50000, 'test': 10000, 'dim': 512, 'classes': 10, 'threads': 1, 'reference': 1}
    args.update({k: int(v) for k, v in (a[2:].split('=') for a in argv)})
    torch.set_num_threads(args['threads'])
    x, y = features(args['n'], args['dim'], args['classes'], 0)
    tx, ty = features(args['test'], args['dim'], args['classes'], 1)
    print(f"probe {args['n']} x {args['dim']} train, {args['test']} test, {args['classes']} classes, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows = [torch.float32] + ([torch.float64] if args['reference'] else [])
    seconds = {}
    for dtype in rows:
        seconds[dtype], cpu, fits, out = timed_probe(x, y, tx, ty, args['classes'], dtype)
        print(f"  sweep in {str(dtype)[6:]}: {seconds[dtype]:.1f} s ({cpu:.1f} s CPU), {len(fits)} fits, "
              f"{sum(fits)} L-BFGS iterations {fits}, {seconds[dtype] / sum(fits):.3f} s each; "
              f"top-1 {out['acc1_trunk']:.2f}, l2 {out['l2_trunk']:.1e}", flush=True)
    if args['reference']:
        print(f"  float32 sweep: {seconds[torch.float64] / seconds[torch.float32]:.2f}x faster than float64")


if __name__ == '__main__':
    main(sys.argv[1:])
