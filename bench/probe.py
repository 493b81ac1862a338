"""Linear-probe time (evaluate.linear_probe) on CIFAR-10-sized generated features, on the CPU.

python -m bench.probe [--n=50000] [--test=10000] [--dim=512] [--classes=10] [--threads=1]
Seeded Gaussian features shaped like an encoder's: 10 class means in a 64-dim subspace, a decaying spectrum of
nuisance directions and a common offset. Prints the whole probe (sweep, refit, test) with its number of fits and
L-BFGS iterations per fit, then single fits with and without the probe's preconditioning (same process): at the
chosen strength and at a weak one (1e-5), where the Hessian's conditioning follows the feature spectrum's.
"""
import sys
import time

import torch

import evaluate
from evaluate import fit_logistic, linear_probe, probe_basis


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
    start = time.perf_counter()
    out = linear_probe(x, y, tx, ty, args['classes'], 'acc')
    seconds = time.perf_counter() - start
    evaluate.fit_logistic = solve
    print(f"probe {args['n']} x {args['dim']} train, {args['test']} test, {args['classes']} classes, "
          f"{torch.get_num_threads()} thread(s): {seconds:.1f} s, {len(fits)} fits, {sum(fits)} L-BFGS iterations "
          f"({fits}); top-1 {out['acc1_trunk']:.2f}, l2 {out['l2_trunk']:.1e}", flush=True)

    xd = x.double()
    mean, rotation, variances = probe_basis(xd)
    z, c = (xd - mean) @ rotation, args['classes']
    for l2 in (out['l2_trunk'], 1e-5):
        seconds = {}
        for name, scale in (('preconditioned', 1 / (variances / c + l2).sqrt()), ('plain', None)):
            start = time.perf_counter()
            _, _, iterations = fit_logistic(z, y, l2, c, scale)
            seconds[name] = time.perf_counter() - start
            print(f"one fit at l2 {l2:.1e}, {name}: {seconds[name]:.1f} s, {iterations} iterations", flush=True)
        print(f"plain / preconditioned time at l2 {l2:.1e}: {seconds['plain'] / seconds['preconditioned']:.1f}x")


if __name__ == '__main__':
    main(sys.argv[1:])
