"""Linear probe (evaluate.py --linear_probe): the L-BFGS solver against an independent float64 Newton's method,
the strength sweep on problems with a known answer, the feature cache, data-parallel extraction, and the CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

evaluate = pytest.importorskip('evaluate', exc_type=ImportError)  # needs model.py / data.py / augment.py
from config import Config  # noqa: E402
from evaluate import (PROBE_GRID, PROBE_REFINE, fit_logistic, image_features, linear_probe, main,  # noqa: E402
                      probe_features, probe_settings, select_strength, standardise)

ROOT = Path(__file__).resolve().parents[1]


# --- Reference: Newton's method in float64 ---
def objective(x, y, l2, w, b):
    """mean cross-entropy(x w + b, y) + l2 / 2 ||w||^2, written directly."""
    logits = x @ w + b
    return (logits.logsumexp(1) - logits[torch.arange(len(y)), y]).mean() + l2 / 2 * (w ** 2).sum()


def newton(x, y, l2, c, steps=100):
    """The optimum by Newton's method on theta = [W; b] ((D + 1, C)) with the explicit Hessian, halving steps
    until the objective decreases; the pseudo-inverse skips the null direction (b + t * ones) of the loss."""
    n, d = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)  # (n, D + 1)
    penalty = torch.cat([torch.full((d,), l2, dtype=x.dtype), torch.zeros(1, dtype=x.dtype)])
    theta = torch.zeros(d + 1, c, dtype=x.dtype)
    f = lambda t: objective(x, y, l2, t[:d], t[d])  # noqa: E731
    for _ in range(steps):
        p = torch.softmax(xa @ theta, 1)  # (n, C)
        grad = xa.T @ (p - torch.eye(c, dtype=x.dtype)[y]) / n + penalty[:, None] * theta
        if grad.abs().max() < 1e-13:
            break
        curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, C, C)
        outer = xa[:, :, None] * xa[:, None, :]  # (n, D + 1, D + 1)
        hess = torch.einsum('ijl,ikm->jkml', outer, curv) / n  # (D + 1, C, C, D + 1)
        hess = hess.permute(0, 1, 3, 2).reshape((d + 1) * c, (d + 1) * c) + torch.diag(penalty.repeat_interleave(c))
        step = (torch.linalg.pinv(hess, hermitian=True) @ grad.reshape(-1)).reshape(d + 1, c)
        t = 1.0
        while f(theta - t * step) > f(theta) and t > 1e-8:
            t /= 2
        theta = theta - t * step
    return theta[:d], theta[d]


def problem(seed, n=80, d=5, c=4, shift=1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(c, (n,), generator=g)
    means = torch.randn(c, d, generator=g, dtype=torch.float64) * 1.5
    x = means[y] + torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d, dtype=torch.float64)
    return x + shift, y


@pytest.mark.parametrize('seed,c,l2', [(0, 4, 1e-1), (1, 4, 1e-3), (2, 2, 1e-2)])
def test_solver_reaches_newton_optimum(seed, c, l2):
    """Raw, uncentred features (the probe centres them)."""
    x, y = problem(seed, c=c)
    w_ref, b_ref = newton(x, y, l2, c)
    loss_ref = objective(x, y, l2, w_ref, b_ref).item()
    w, b, _ = fit_logistic(x, y, l2, c, tol=1e-11, max_iter=5000)
    assert objective(x, y, l2, w, b).item() == pytest.approx(loss_ref, abs=1e-10)
    assert torch.allclose(w, w_ref, atol=1e-6, rtol=0)
    assert torch.allclose(b - b.mean(), b_ref - b_ref.mean(), atol=1e-6, rtol=0)  # b is defined up to a shift
    # the default tolerance: the objective to 1e-6 (the weights are then within ~1e-3)
    w, b, _ = fit_logistic(x, y, l2, c)
    assert objective(x, y, l2, w, b).item() == pytest.approx(loss_ref, abs=1e-6)


@pytest.mark.parametrize('seed,c,l2', [(0, 4, 1e-1), (1, 4, 1e-3), (2, 2, 1e-2), (3, 7, 1e-4)])
def test_solver_on_standardised_features_reaches_newton_optimum(seed, c, l2):
    """The probe's features (centred, unit total variance), down to a weak l2 (weights ~20: 1e-6 absolute
    plus 1e-6 relative)."""
    x, y = problem(seed, c=c)
    z, = standardise(x)
    assert torch.allclose(z.mean(0), torch.zeros(z.shape[1], dtype=z.dtype), atol=1e-12)
    assert z.square().sum(1).mean().item() == pytest.approx(1, abs=1e-12)
    w, b, _ = fit_logistic(z, y, l2, c, tol=1e-11, max_iter=5000)
    w_ref, b_ref = newton(z, y, l2, c)
    assert objective(z, y, l2, w, b).item() == pytest.approx(objective(z, y, l2, w_ref, b_ref).item(), abs=1e-10)
    assert torch.allclose(w, w_ref, atol=1e-6, rtol=1e-6)
    assert torch.allclose(b - b.mean(), b_ref - b_ref.mean(), atol=1e-6, rtol=1e-6)


# --- The strength sweep ---
def test_sweep_known_answer():
    calls = []

    def peaked(l2, init):  # validation score peaked at log10(l2) = -2.3
        calls.append(l2)
        return -(math.log10(l2) + 2.3) ** 2, l2

    best, scores, solution = select_strength(peaked)
    assert best == pytest.approx(10 ** -2.25) and solution == best  # the refine grid point nearest -2.3
    coarse = calls[:len(calls) - len(PROBE_REFINE)]
    assert coarse == list(PROBE_GRID)
    assert sorted(calls[len(coarse):]) == pytest.approx(sorted(1e-2 * 10 ** s for s in PROBE_REFINE))
    assert max(scores.values()) == scores[best]

    calls.clear()
    flat = lambda l2, init: (calls.append(l2), (50.0, None))[1]  # noqa: E731
    assert select_strength(flat)[0] == pytest.approx(10 ** max(PROBE_REFINE))  # ties: the strongest
    assert calls[:len(PROBE_GRID)] == list(PROBE_GRID)  # a plateau does not stop the sweep


def test_probe_on_known_problems():
    g = torch.Generator().manual_seed(0)
    # labels independent of the features, 75% one class: the best classifier is the prior, which the strongest
    # regularisation gives; weaker ones fit the noise of 300 samples in 40 dimensions
    y = (torch.rand(400, generator=g) < 0.25).long()
    x = torch.randn(400, 40, generator=g)
    out = linear_probe(x[:300], y[:300], x[300:], y[300:], 2, 'acc')
    assert out['l2_trunk'] == pytest.approx(10 ** max(PROBE_REFINE))
    assert out['acc1_trunk'] == pytest.approx(100 * (y[300:] == 0).double().mean().item())
    # separable classes along a low-variance direction (a weak signal next to large nuisance dimensions): the
    # probe needs weak regularisation and reaches 100%; mean per class is reported for a 'mean_per_class' set
    y = torch.randint(3, (600,), generator=g)
    x = torch.randn(600, 20, generator=g) * 10
    x[:, 0] = y.float() * 0.5 + 0.05 * torch.randn(600, generator=g)
    out = linear_probe(x[:400], y[:400], x[400:], y[400:], 3, 'mean_per_class')
    assert out['acc1_trunk'] == out['mean_per_class_trunk'] == 100
    assert out['l2_trunk'] < 1e-2 and out['val_trunk'] == 100


def test_absent_class_and_determinism():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(3, (200,), generator=g) * 2  # classes 0, 2, 4 of 6
    x = torch.randn(200, 8, generator=g) + torch.nn.functional.one_hot(y, 8).float() * 3
    first = linear_probe(x[:150], y[:150], x[150:], y[150:], 6, 'mean_per_class', seed=3)
    assert first == linear_probe(x[:150], y[:150], x[150:], y[150:], 6, 'mean_per_class', seed=3)
    assert all(math.isfinite(v) for v in first.values()) and first['acc1_trunk'] > 90


def test_float32_sweep_matches_float64_and_refit_is_the_optimum():
    """The sweep's float32 fits pick what float64 fits pick, and the scores are those of the float64 optimum at
    the chosen strength (the refit, started from the float32 solution)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(4, (600,), generator=g)
    x = torch.randn(600, 60, generator=g) + torch.randn(4, 60, generator=g)[y] * 0.3  # 200 train: l2 matters
    args = (x[:200], y[:200], x[200:], y[200:], 4, 'acc')
    out = linear_probe(*args)
    assert out == linear_probe(*args, sweep_dtype=torch.float64)
    assert 1e-4 < out['l2_trunk'] < 1e-1  # an interior strength
    z, tz = standardise(x[:200].double(), x[200:].double())
    w, b, _ = fit_logistic(z, y[:200], out['l2_trunk'], 4, tol=1e-11, max_iter=5000)
    assert out['acc1_trunk'] == pytest.approx(100 * ((tz @ w + b).argmax(1) == y[200:]).double().mean().item())

# --- Features: stand-in model, cache, data parallel ---
class Encoder(nn.Module):
    """visual: flatten + linear; one head z; counts the images it encodes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
        self.image_heads = nn.ModuleDict({'z': nn.Linear(6, 3)})
        self.heads, self.seen = ('z',), 0
        self.visual.register_forward_hook(lambda m, i, o: setattr(self, 'seen', self.seen + len(o)))


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 2, 2, generator=g), torch.arange(n) % 3)


def cfg_for_tests(**kw):
    return Config(**{'eval_batch_size': 4, 'workers': 0, **kw})


def test_features_cached_and_invalidated(tmp_path):
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(b'weights v1')
    model, cfg, train, test = Encoder(), cfg_for_tests(), images(10, 0), images(7, 1)
    encoded = []

    def run(heads=False):  # images encoded by one probe_features call
        seen, settings = model.seen, probe_settings(ckpt, {'linear_probe': 'true', 'probe_heads': str(heads)}, 'cpu')
        job = probe_features(model, cfg, 'set', train, test, ['a', 'b', 'c'], 'acc', settings)
        encoded.append(model.seen - seen)
        return job

    job = run()
    saved = torch.load(job['paths']['train'], weights_only=True)
    with torch.no_grad():
        assert torch.equal(saved['features']['trunk'], model.visual(train.tensors[0]))
    assert torch.equal(saved['labels'], train.tensors[1]) and job['paths']['train'].parent == tmp_path / 'ckpt_features'
    run()  # cached
    ckpt.write_bytes(b'weights v2')  # same size, new content: a new key
    run()
    run(heads=True)  # other features kept: a new key
    assert set(torch.load(job['paths']['test'], weights_only=True)['features']) == {'trunk', 'z'}
    job['paths']['test'].write_bytes(b'truncated')  # an unreadable cache file is recomputed
    run(heads=True)
    assert encoded == [17, 0, 17, 17, 7]


def _distributed_worker(rank, world_size, tmp):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank, world_size=world_size)
    features, labels = image_features(Encoder(), cfg_for_tests(eval_batch_size=2), images(3, 0), True, rank, world_size)
    torch.save({'features': features, 'labels': labels}, Path(tmp) / f'rank{rank}.pt')
    dist.destroy_process_group()


def test_data_parallel_features_are_exact(tmp_path):  # two spawned processes: 7 s, 30-45 s on a busy 2-core CPU
    # 3 images on 2 ranks: padding would show as a 4th row
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2)
    single = image_features(Encoder(), cfg_for_tests(), images(3, 0), True)
    got = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    assert torch.equal(got['labels'], single[1]) and got['features'].keys() == single[0].keys()
    assert all(torch.allclose(got['features'][k], single[0][k]) for k in single[0])
    got = torch.load(tmp_path / 'rank1.pt', weights_only=True)  # gathered to rank 0 alone
    assert got['labels'] is None and all(v is None for v in got['features'].values())
    # a rank with an empty slice sends a 1-D empty tensor, which the concatenation of the gathers skips
    assert torch.cat([torch.zeros(0), single[0]['trunk']]).shape == single[0]['trunk'].shape


# --- CLI ---
@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny model's checkpoint (16 px, 24 demo images per split)."""
    if not (ROOT / 'assets' / 'demo_bpe.txt.gz').exists():
        pytest.skip('the demo vocabulary assets/demo_bpe.txt.gz is not built yet')
    cfg = Config(vision_width=32, vision_layers=1, vision_heads=2, patch_size=8, text_width=32, text_heads=2,
                 text_layers=1, embed_dim=16, mlp_hidden_dim=32, image_size=16, local_crop_size=16,
                 eval_batch_size=8, workers=0, demo_val_size=24)
    model = evaluate.build_model(cfg, evaluate.build_tokenizer(cfg).vocab_size)
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt.pt'
    torch.save({'format': 'rocket-clip/1', 'config': cfg.to_dict(), 'model': model.state_dict(), 'epoch': 1,
                'step': 5}, path)
    return path


def test_cli_demo_probe(tiny_checkpoint, capsys):
    records = main([str(tiny_checkpoint), '--datasets=demo', '--linear_probe', '--probe_heads'])
    out = capsys.readouterr().out
    saved = json.loads(tiny_checkpoint.with_name('ckpt_probe.json').read_text())
    assert saved == json.loads(json.dumps(records[0])) and saved['linear_probe']['seed'] == 0
    assert set(saved['results']) == {'demo_shape', 'demo_colour', 'demo_colour_shape_unseen'}  # no retrieval
    for metrics in saved['results'].values():
        assert set(metrics) == {f'{m}_{k}' for m in ('acc1', 'l2', 'val') for k in ('trunk', 'z', 'h')}
    header = next(line for line in out.splitlines() if line.startswith('checkpoint'))
    assert 'demo_shape' in header and 'demo_shape l2' in header
    assert len(list(tiny_checkpoint.with_name('ckpt_features').glob('*.pt'))) == 6


def save_images(folder, count, colour):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new('RGB', (20, 20), tuple((c + 9 * i) % 256 for c in colour)).save(folder / f'{i}.png')


def test_cli_image_folder_train_split(tiny_checkpoint, tmp_path, capsys):
    """pets (mean per class) has train/ and test/; dtd has no train/: it fails with its reason (exit 1), and the
    pets results are still written."""
    for split, n in (('train', 6), ('test', 3)):
        save_images(tmp_path / 'pets' / split / 'cat', n, (200, 30, 30))
        save_images(tmp_path / 'pets' / split / 'dog', n, (30, 30, 200))
    save_images(tmp_path / 'dtd' / 'test' / 'woven', 2, (90, 90, 90))
    (tmp_path / 'labels.json').write_text(json.dumps({'pets': ['cat', 'dog'], 'dtd': ['woven']}))
    (tmp_path / 'templates.json').write_text(json.dumps({'pets': ['a {}.'], 'dtd': ['a {}.']}))
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main([str(ckpt), f'--data_root={tmp_path}', f'--labels={tmp_path / "labels.json"}',
              f'--templates={tmp_path / "templates.json"}', '--datasets=pets,dtd', '--linear_probe'])
    assert exit_info.value.code == 1
    assert f"dtd: failed: expected {tmp_path / 'dtd' / 'train'}/" in capsys.readouterr().out
    results = json.loads((tmp_path / 'ckpt_probe.json').read_text())['results']
    assert set(results) == {'pets', 'dtd'} and 'error' in results['dtd']
    assert set(results['pets']) == {'acc1_trunk', 'mean_per_class_trunk', 'l2_trunk', 'val_trunk'}
    assert results['pets']['mean_per_class_trunk'] == 100  # two flat colours


@pytest.mark.parametrize('argv,message', [(['--probe_heads'], 'add --linear_probe'),
                                          (['--linear_probe=maybe'], 'expected true or false'),
                                          (['--linear_probe', '--probe_seed=-1'], 'non-negative integer')])
def test_cli_bad_probe_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['x.pt', *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_probe_beats_zero_shot_on_demo_shape(tmp_path):
    """A briefly trained tiny model: the probe on the trunk classifies shape at least as well as zero-shot."""
    out = tmp_path / 'run'
    subprocess.run([sys.executable, 'train.py', '--max_steps=60', '--eval_every=0', '--demo_val_size=300',
                    f'--output_dir={out}'], cwd=ROOT, check=True, capture_output=True, text=True, timeout=1200)
    ckpt = str(out / 'checkpoint.pt')
    zero_shot = main([ckpt, '--datasets=demo', '--device=cpu'])[0]['results']['demo_shape']['acc1_z']
    probe = main([ckpt, '--datasets=demo', '--device=cpu', '--linear_probe'])[0]['results']['demo_shape']
    assert probe['acc1_trunk'] >= zero_shot > 100 / 6
