"""Linear-probe time (evaluate.linear_probe) on CIFAR-10-sized generated features, on the CPU.

python -m bench.probe [--n=50000] [--test=10000] [--dim=512] [--classes=10] [--threads=1]
Seeded Gaussian features shaped like an encoder's: 10 class means in a 64-dim subspace, a decaying spectrum of
nuisance directions and a common offset. Prints the whole probe (sweep, refit, test): wall and CPU time, the
L-BFGS iterations of each fit (the coarse grid strongest first, the refinement, the refit).
"""
import sys
import time

import torch

import evaluate
from evaluate import linear_probe


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


def main(argv):
    args = {'n': 50000, 'test': 10000, 'dim': 512, 'classes': 10, 'threads': 1}
    args.update({k: int(v) for k, v in (a[2:].split('=') for a in argv)})
    torch.set_num_threads(args['threads'])
    x, y = features(args['n'], args['dim'], args['classes'], 0)
    tx, ty = features(args['test'], args['dim'], args['classes'], 1)
    fits, solve = [], evaluate.fit_logistic

    def counted(*a, **k):
        out = solve(*a, **k)
        fits.append(out[2])
        return out

    evaluate.fit_logistic = counted
    start, cpu = time.perf_counter(), time.process_time()
    out = linear_probe(x, y, tx, ty, args['classes'], 'acc')
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu  # CPU time: less sensitive to a busy machine
    evaluate.fit_logistic = solve
    print(f"probe {args['n']} x {args['dim']} train, {args['test']} test, {args['classes']} classes, "
          f"{torch.get_num_threads()} thread(s): {seconds:.1f} s ({cpu:.1f} s CPU), {len(fits)} fits, {sum(fits)} L-BFGS iterations "
          f"({fits}); top-1 {out['acc1_trunk']:.2f}, l2 {out['l2_trunk']:.1e}", flush=True)
    print(f"{seconds / sum(fits):.3f} s per iteration")


if __name__ == '__main__':
    main(sys.argv[1:])
