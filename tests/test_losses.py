"""Objectives of recipe §2 against loop references, closed forms, and 2 ranks vs 1 rank."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import config
from config import Config

from model import (all_reduce_mean, barlip_loss, cl2l_siglip_loss, clip_loss, compute_loss, gather, rocket_loss,
                   siglip_loss, sinkhorn, siamlip_loss, slip_loss, swalip_loss)

METHODS = tuple(config.METHODS)


# --- independent references: loops over rows and pairs, explicit log-softmax, float64 ---
def unit(x):
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def log_softmax(row):
    return row - torch.log(torch.exp(row - row.max()).sum()) - row.max()


def ref_ce(row, label, eps=0.0):
    """Cross-entropy toward (1 - eps) onehot + eps/N uniform (PyTorch's label smoothing)."""
    logp = log_softmax(row)
    return -(1 - eps) * logp[label] - eps * logp.mean()


def ref_info_nce(anchors, candidates, scale, eps=0.0, offset=0):
    """mean_r CE(scale * a_r . C^T, offset + r)."""
    a, c = unit(anchors), unit(candidates)
    return sum(ref_ce(scale * torch.stack([a[r] @ c[n] for n in range(len(c))]), offset + r, eps)
               for r in range(len(a))) / len(a)


def ref_rocket(z_i, z_t, h_i, h_t, s, s_h, eps, reduction, candidates=lambda x: x, rows=None, offset=0):
    """recipe §2.3 term by term; rows/offset/candidates describe one rank of the paper's detached gather."""
    rows = slice(None) if rows is None else rows
    g_i = ref_info_nce(z_i[rows], candidates(z_t), s, 0.0, offset)
    g_t = ref_info_nce(z_t[rows], candidates(z_i), s, 0.0, offset)
    A = len(h_i)
    l_i = sum(ref_info_nce(h_i[a][rows], candidates(h_t[b]), s_h, eps, offset) for a in range(A) for b in range(A))
    l_t = sum(ref_info_nce(h_t[a][rows], candidates(h_i[b]), s_h, eps, offset) for a in range(A) for b in range(A))
    c_i = (g_i + A * l_i / A ** 2) / (1 + A)
    c_t = (g_t + A * l_t / A ** 2) / (1 + A)
    return (c_i + c_t) / 2 * (2 if reduction == 'sum' else 1)


def ref_sinkhorn(scores, eps, iters):
    """The official non-log Sinkhorn-Knopp, float64, one process."""
    q = torch.exp(scores.double() / eps).t()  # (K, B)
    K, B = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / K
        q = q / q.sum(0, keepdim=True) / B
    return (q * B).t()


def ref_swalip(h_i, h_t, s_h, eps, iters):
    A = len(h_i)
    total = 0
    for anchors, protos in ((h_i, h_t), (h_t, h_i)):
        scores = [[unit(anchors[a]) @ unit(protos[b]).t() for b in range(A)] for a in range(A)]
        for a in range(A):
            for b in range(A):
                q = ref_sinkhorn(scores[(a + 1) % A][(b + 1) % A].detach(), eps, iters)
                logits = s_h * scores[a][b]
                total = total - sum((q[r] * log_softmax(logits[r])).sum() for r in range(len(q))) / len(q) / 2
    return total / A ** 2


def ref_simclr(x1, x2, temperature):
    q1, q2 = unit(x1), unit(x2)
    B, total = len(q1), 0
    for own, other in ((q1, q2), (q2, q1)):
        for r in range(B):
            row = [own[r] @ other[n] / temperature for n in range(B)]
            row += [own[r] @ own[n] / temperature for n in range(B) if n != r]
            total = total + ref_ce(torch.stack(row), r)
    return total / (2 * B)


def ref_siglip(x, y, t, b):
    """Σ_r Σ_n log(1 + exp(-label_rn (t x_r . y_n + b))) / B, label +1 on the diagonal and -1 elsewhere."""
    x, y = unit(x), unit(y)
    pairs = [(1.0 if r == n else -1.0) * (t * (x[r] @ y[n]) + b) for r in range(len(x)) for n in range(len(y))]
    return sum(torch.log1p(torch.exp(-z)) for z in pairs) / len(x)


def ref_barlow(x, y, lambd):
    B, D = x.shape
    c = [[sum(x[r, i].double() * y[r, j].double() for r in range(B)) / B for j in range(D)] for i in range(D)]
    return sum((1 - c[i][j]) ** 2 if i == j else lambd * c[i][j] ** 2 for i in range(D) for j in range(D))


def ref_neg_cosine(p, v):
    p, v = p.double(), v.detach().double()
    return 2 - 2 * sum(p[r] @ v[r] / (p[r].norm() * v[r].norm()) for r in range(len(p))) / len(p)


def assert_same_value_and_grad(ours, ref, inputs):
    assert torch.allclose(ours.double(), ref.double(), atol=1e-5, rtol=1e-5), (ours.item(), ref.item())
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        assert torch.allclose(g_ours, g_ref.to(g_ours.dtype), atol=1e-5, rtol=1e-4)


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


# --- each loss against its reference ---
@pytest.mark.parametrize('eps,reduction', [(0.0, 'avg'), (0.1, 'sum')])
def test_clip_matches_loops(eps, reduction):
    z_i, z_t = leaves((6, 5), (6, 5))
    s = torch.tensor(7.0, requires_grad=True)
    ours = clip_loss(z_i, z_t, s, eps, reduction)['loss']
    ref = (ref_info_nce(z_i, z_t, s, eps) + ref_info_nce(z_t, z_i, s, eps)) / 2 * (2 if reduction == 'sum' else 1)
    assert_same_value_and_grad(ours, ref, [z_i, z_t, s])


@pytest.mark.parametrize('reduction', ['avg', 'sum'])
def test_rocket_matches_loops(reduction):
    z_i, z_t, h_i1, h_i2, h_t1, h_t2 = leaves(*[(5, 4)] * 6, seed=1)
    s, s_h = torch.tensor(9.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    ours = rocket_loss(z_i, z_t, [h_i1, h_i2], [h_t1, h_t2], s, s_h, 0.1, reduction)
    ref = ref_rocket(z_i, z_t, [h_i1, h_i2], [h_t1, h_t2], s, s_h, 0.1, reduction)
    assert_same_value_and_grad(ours['loss'], ref, [z_i, z_t, h_i1, h_i2, h_t1, h_t2, s, s_h])
    # the global term is unsmoothed, the local term smoothed (recipe §8.2)
    g = (ref_info_nce(z_i, z_t, s) + ref_info_nce(z_t, z_i, s)) / 2 * (2 if reduction == 'sum' else 1)
    assert torch.allclose(ours['global_loss'].double(), g, atol=1e-5)


def test_rocket_without_views_is_clip():
    z_i, z_t = leaves((6, 5), (6, 5), seed=2)
    s = torch.tensor(5.0)
    for reduction in ('avg', 'sum'):
        rocket = rocket_loss(z_i, z_t, [], [], s, None, label_smoothing=0.3, reduction=reduction)['loss']
        assert torch.equal(rocket, clip_loss(z_i, z_t, s, 0.0, reduction)['loss'])


def test_siglip_matches_loops():
    z_i, z_t = leaves((6, 5), (6, 5), seed=7)
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    assert_same_value_and_grad(siglip_loss(z_i, z_t, t, b)['loss'], ref_siglip(z_i, z_t, t, b), [z_i, z_t, t, b])
    t, b = torch.tensor(3.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)  # where every pair matters
    assert_same_value_and_grad(siglip_loss(z_i, z_t, t, b)['loss'], ref_siglip(z_i, z_t, t, b), [z_i, z_t, t, b])


def test_cl2l_siglip_matches_loops():
    z_i, z_t, h_i1, h_i2, h_t1, h_t2 = leaves(*[(5, 4)] * 6, seed=8)
    s, s_h, b, b_h = (torch.tensor(v, requires_grad=True) for v in (4.0, 2.0, -1.0, 0.5))
    ours = cl2l_siglip_loss(z_i, z_t, [h_i1, h_i2], [h_t1, h_t2], s, s_h, b, b_h)['loss']
    local = sum(ref_siglip(h_i, h_t, s_h, b_h) for h_i in (h_i1, h_i2) for h_t in (h_t1, h_t2)) / 4
    ref = (ref_siglip(z_i, z_t, s, b) + 2 * local) / 3
    assert_same_value_and_grad(ours, ref, [z_i, z_t, h_i1, h_i2, h_t1, h_t2, s, s_h, b, b_h])
    assert torch.equal(cl2l_siglip_loss(z_i, z_t, [], [], s, None, b, None)['loss'],
                       siglip_loss(z_i, z_t, s, b)['loss'])


def test_slip_matches_loops():
    x1, x2 = leaves((5, 4), (5, 4), seed=3)
    out = slip_loss(x1, x2, temperature=0.1)
    assert_same_value_and_grad(out['loss'], ref_simclr(x1, x2, 0.1), [x1, x2])


def test_barlip_matches_loops():
    views_i, views_t = leaves(*[(4, 6)] * 3, seed=4), leaves(*[(4, 6)] * 3, seed=5)
    ours = barlip_loss(views_i, views_t, lambd=0.05, scale=0.025)['loss']
    pairs = [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    ref = 0.025 * sum(ref_barlow(views_i[a], views_t[b], 0.05) for a, b in pairs) / 5
    assert_same_value_and_grad(ours, ref, views_i + views_t)


def test_barlow_correlation_stays_fp32_under_autocast():
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = barlip_loss([x], [y], lambd=1.0, scale=1.0)['loss']
    # a bf16 correlation would be off by about 1e-3 relative
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, barlip_loss([x], [y], 1.0, 1.0)['loss'], rtol=1e-6)


def test_siamlip_matches_loops_and_stops_target_gradient():
    p_i, p_t, v_i, v_t = [leaves(*[(4, 3)] * 3, seed=k) for k in range(6, 10)]
    ours = siamlip_loss(p_i, p_t, v_i, v_t)['loss']
    pairs = [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    ref = sum(ref_neg_cosine(p_i[a], v_t[b]) + ref_neg_cosine(p_t[a], v_i[b]) for a, b in pairs) / 10
    assert_same_value_and_grad(ours, ref, p_i + p_t)
    assert all(g is None for g in torch.autograd.grad(ours, v_i + v_t, allow_unused=True))


@pytest.mark.parametrize('A', [2, 3])
def test_swalip_matches_loops(A):
    h_i, h_t = leaves(*[(5, 4)] * A, seed=10), leaves(*[(5, 4)] * A, seed=11)
    s_h = torch.tensor(10.0, requires_grad=True)
    ours = swalip_loss(h_i, h_t, s_h, epsilon=0.05, iters=3)['loss']
    assert_same_value_and_grad(ours, ref_swalip(h_i, h_t, s_h, 0.05, 3), h_i + h_t + [s_h])


# --- known cases ---
def test_aligned_orthogonal_embeddings_give_zero_loss():
    z = torch.eye(8)[:6] * 3  # raw scale is irrelevant: the losses normalise
    out = rocket_loss(z, z.clone(), [z, z], [z, z], torch.tensor(100.0), torch.tensor(100.0), 0.0)
    assert out['loss'] < 1e-6 and out['global_acc'] == 100 and out['local_acc'] == 100


def test_identical_embeddings_give_log_n():
    z = torch.ones(6, 4)
    for eps in (0.0, 0.2):  # a uniform prediction costs log N whatever the smoothing
        out = rocket_loss(z, z, [z, z], [z, z], torch.tensor(20.0), torch.tensor(10.0), eps)
        assert torch.allclose(out['loss'], torch.tensor(math.log(6)))


def test_label_smoothing_closed_form():
    N, s, eps = 5, 6.0, 0.1
    z = torch.eye(N)
    # logits: s on the positive, 0 elsewhere: CE_eps = log(e^s + N - 1) - (1 - eps) s - eps s / N
    expected = math.log(math.exp(s) + N - 1) - (1 - eps) * s - eps * s / N
    assert math.isclose(clip_loss(z, z, torch.tensor(s), eps)['loss'].item(), expected, rel_tol=1e-6)


# --- Sinkhorn ---
def test_sinkhorn_marginals_and_official_steps():
    scores = torch.randn(2, 6, 4).clamp(-1, 1)  # (..., B, K) with B != K
    q = sinkhorn(scores, epsilon=0.5, iters=200)
    assert torch.allclose(q.sum(-1), torch.ones(2, 6), atol=1e-5)
    assert torch.allclose(q.sum(-2), torch.full((2, 4), 6 / 4), atol=1e-4)
    q3 = sinkhorn(scores, epsilon=0.05, iters=3)
    assert torch.allclose(q3.sum(-1), torch.ones(2, 6), atol=1e-5)
    assert torch.allclose(q3[1].double(), ref_sinkhorn(scores[1], 0.05, 3), atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sinkhorn_large_logits(dtype):
    scores = (torch.randn(8, 8) * 100).to(dtype)
    q = sinkhorn(scores, epsilon=0.05, iters=3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert torch.allclose(q.sum(-1), torch.ones(8), atol=1e-5)


# --- dispatch ---
B, A, IN = 4, 2, 6


def toy_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {name: torch.randn(IN, dim, generator=g) / IN ** 0.5 for name, dim in
         [('z', 8), ('h', 8), ('barlip', 16), ('siam', 5), ('slip', 8)]}
    p['pred'] = torch.randn(5, 5, generator=g)
    p['logit_scale'], p['l2l_logit_scale'] = torch.tensor(math.log(10.0)), torch.tensor(math.log(5.0))
    p['logit_bias'], p['l2l_logit_bias'] = torch.tensor(-2.0), torch.tensor(-1.0)
    return {k: v.requires_grad_() for k, v in p.items()}


def toy_features(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1 + A, n, IN, generator=g)  # (modality, view, sample, in)


def toy_forward(p, feats):
    """A linear stand-in for the model: the forward output dict of the contract (no BatchNorm)."""
    img, txt = feats[0], feats[1]  # (1+A, n, IN)
    heads = lambda views, w: [x @ w for x in views]
    return {'z_image': img[0] @ p['z'], 'z_text': txt[0] @ p['z'] * 0.5,
            'h_image': heads(img[1:], p['h']), 'h_text': heads(txt[1:], -p['h']),
            'logit_scale': p['logit_scale'].exp(), 'l2l_logit_scale': p['l2l_logit_scale'].exp(),
            'logit_bias': p['logit_bias'], 'l2l_logit_bias': p['l2l_logit_bias'],
            'barlip_image': heads(img, p['barlip']), 'barlip_text': heads(txt, p['barlip'].flip(1)),
            'siam_proj_image': heads(img, p['siam']), 'siam_proj_text': heads(txt, p['siam'] * 2),
            'siam_pred_image': heads(img, p['siam'] @ p['pred']),
            'siam_pred_text': heads(txt, p['siam'] @ p['pred'].t()),
            'slip_image': heads(img[1:], p['slip'])}


def method_config(method, with_grad=True):
    return Config(method=method, num_augs=0 if config.METHODS[method].views is None else A, gather_with_grad=with_grad,
                  label_smoothing=config.METHODS[method].fixed.get('label_smoothing', 0.1), loss_reduction='sum',
                  slip_scale=0.5, swalip_weight=0.3)


def momentum_target(p, feats):
    with torch.no_grad():
        return toy_forward({k: v * 0.9 + 0.1 * v.mean() for k, v in p.items()}, feats)


def test_compute_loss_adds_each_extra_term_to_rocket():
    out = toy_forward(toy_params(), toy_features(B))
    extras = {
        'rocket': 0.0,
        'slip': 0.5 * slip_loss(*out['slip_image'], 0.1)['loss'],
        'barlip': barlip_loss(out['barlip_image'], out['barlip_text'])['loss'],
        'siamlip': siamlip_loss(out['siam_pred_image'], out['siam_pred_text'], out['siam_proj_image'],
                                out['siam_proj_text'])['loss'],
        'swalip': 0.3 * swalip_loss(out['h_image'], out['h_text'], out['l2l_logit_scale'])['loss'],
    }
    for method, extra in extras.items():
        losses = compute_loss(out, method_config(method))
        eps = 0.0 if method == 'swalip' else 0.1
        rocket = rocket_loss(out['z_image'], out['z_text'], out['h_image'], out['h_text'], out['logit_scale'],
                             out['l2l_logit_scale'], eps, 'sum')['loss']
        assert torch.allclose(losses['loss'], rocket + extra), method
        assert losses['loss'].requires_grad and not any(v.requires_grad for k, v in losses.items() if k != 'loss')


def test_byolip_targets_come_from_the_momentum_model():
    p, feats = toy_params(), toy_features(B)
    out, target = toy_forward(p, feats), momentum_target(p, feats)
    byol = compute_loss(out, method_config('byolip'), target)
    assert not torch.allclose(byol['byolip_loss'], compute_loss(out, method_config('siamlip'))['siamlip_loss'])
    expected = siamlip_loss(out['siam_pred_image'], out['siam_pred_text'], target['siam_proj_image'],
                            target['siam_proj_text'])['loss']
    assert torch.allclose(byol['byolip_loss'], expected)
    with pytest.raises(ValueError, match='momentum'):
        compute_loss(out, method_config('byolip'))


def test_single_process_collectives_are_identities():
    x = torch.randn(3, 2)
    assert gather(x, True) is x and gather(x, False) is x and all_reduce_mean(x, False) is x


# --- 2 ranks x B == 1 rank x 2B ---
def _loss_and_grads(method, feats, with_grad=True):
    p = toy_params()
    out = toy_forward(p, feats)
    loss = compute_loss(out, method_config(method, with_grad), momentum_target(p, feats))['loss']
    grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    return loss.detach(), [g for g in grads if g is not None]


def _worker(rank, init_file, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    feats = toy_features(2 * B)[:, :, rank * B:(rank + 1) * B]
    res = {m: _loss_and_grads(m, feats) for m in METHODS}
    res['rocket_paper'] = _loss_and_grads('rocket', feats, with_grad=False)
    for method in ('siglip', 'rocket_siglip'):  # SigLIP always gathers with gradient: exact either way
        res[f'{method}_paper'] = _loss_and_grads(method, feats, with_grad=False)
    x = toy_features(2 * B)[0, 0, rank * B:(rank + 1) * B].requires_grad_()
    for with_grad in (True, False):
        loss = barlip_loss([x], [x.flip(1)], with_grad=with_grad)['loss']
        res[f'barlip_input_grad_{with_grad}'] = torch.autograd.grad(loss, x)[0]
    torch.save(res, f'{results}.{rank}')
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'res')), nprocs=2)
    ranks = [torch.load(tmp_path / f'res.{r}') for r in range(2)]
    feats = toy_features(2 * B)
    for method in METHODS + ('siglip_paper', 'rocket_siglip_paper'):
        loss, grads = _loss_and_grads(method.removesuffix('_paper'), feats)
        # DDP averages the per-rank gradients; the logged loss is the per-rank mean
        assert torch.allclose((ranks[0][method][0] + ranks[1][method][0]) / 2, loss, atol=1e-5), method
        for g, g0, g1 in zip(grads, ranks[0][method][1], ranks[1][method][1], strict=True):
            assert torch.allclose((g0 + g1) / 2, g, atol=1e-5), method
    # gather_with_grad=False: each rank's gathered columns are constants (the paper's gradient)
    p = toy_params()
    out = toy_forward(p, feats)
    views = lambda key: [out[key][v] for v in range(A)]
    ref = sum(ref_rocket(out['z_image'], out['z_text'], views('h_image'), views('h_text'), out['logit_scale'],
                         out['l2l_logit_scale'], 0.1, 'sum', candidates=lambda x: x.detach(),
                         rows=slice(r * B, (r + 1) * B), offset=r * B) for r in range(2)) / 2
    ref_grads = [g for g in torch.autograd.grad(ref, list(p.values()), allow_unused=True) if g is not None]
    for g, g0, g1 in zip(ref_grads, ranks[0]['rocket_paper'][1], ranks[1]['rocket_paper'][1], strict=True):
        assert torch.allclose((g0 + g1) / 2, g.float(), atol=1e-5)
    # the paper's Barlow all-reduce: the gradient reaching the inputs is 1/W of the exact one
    for r in range(2):
        assert torch.allclose(ranks[r]['barlip_input_grad_False'] * 2, ranks[r]['barlip_input_grad_True'], atol=1e-6)
