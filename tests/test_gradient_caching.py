"""Gradient caching (--chunk, train.cached_forward_backward) and the global batch (--global_batch): chunks equal one
pass for every methods row (LayerNorm trunks), 1 rank in K chunks equals K gloo ranks (BatchNorm trunk), the second
pass replays the first one's random draws, one-line errors (a resumed chunked run: tests/test_train.py)."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import config
import model as model_lib
import train
from test_cli import assert_one_error_line, run
from test_train import ENV, HANG, ROOT, TINY as TRAIN_FLAGS, load

VOCAB, L = 100, 16
TINY = dict(vision_layers=1, text_layers=1, vision_width=32, text_width=32, image_size=32, local_crop_size=32,
            patch_size=16, embed_dim=16, mlp_hidden_dim=32, barlip_hidden_dim=32, barlip_proj_dim=32,
            siamlip_hidden_dim=32, siamlip_proj_dim=16, context_length=L, batch_size=8, workers=0, eval_every=0)
OFF = torch.autocast('cpu', enabled=False)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: many tiny kernels (chunks of 2) crawl when OpenMP threads wait for a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallResNet(model_lib.ResNet50):
    """The ResNet-50's family with one bottleneck of width 4 per stage (features: 16 wide), its BN included."""

    def __init__(self):
        super().__init__(widths=(4, 4, 4, 4), depths=(1, 1, 1, 1))


def cfg_of(method, **flags):
    return config.resolve({k: str(v) for k, v in {**TINY, 'method': method, **flags}.items()}, verbose=False)


def inputs_of(cfg, B=8, seed=1):
    """(weak, tokens, strong) of B random samples: images, and captions whose EOT (the largest id) ends each row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB - 1, (B, 1 + cfg.num_augs, L), generator=g)
    tokens[..., -1] = VOCAB - 1
    images = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(1 + cfg.num_augs)]
    return images[0], tokens, images[1:]


def build(cfg, monkeypatch=None):
    """(model, momentum copy or None), the same weights for the same cfg; the ResNet shrunk to SmallResNet."""
    if monkeypatch is not None:
        monkeypatch.setattr(model_lib, 'ResNet50', SmallResNet)
    torch.manual_seed(0)
    net = model_lib.build_model(cfg, VOCAB, verbose=False).train()
    with torch.no_grad():  # no zero-initialised BN scale: every branch of the ResNet gets a gradient
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    momentum = copy.deepcopy(net).requires_grad_(False) if config.METHODS[cfg.method].momentum else None
    return net, momentum


def step(cfg, net, momentum, inputs, scaler=None, autocast=OFF):
    """One micro-batch through train.forward_backward on copies: (loss, gradients, buffers of both models)."""
    net, momentum = copy.deepcopy(net), copy.deepcopy(momentum)
    scaler = scaler or torch.amp.GradScaler('cpu', enabled=False)
    loss = train.forward_backward(cfg, net, net, momentum, scaler, autocast, inputs, last_micro=True)['loss']
    return loss.detach(), grads_of(net), buffers_of(net, momentum)


def grads_of(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def buffers_of(net, momentum):
    models = {'': net, 'momentum.': momentum} if momentum is not None else {'': net}
    return {prefix + n: b.clone() for prefix, m in models.items() for n, b in m.named_buffers()}


def assert_same(a, b, tol=1e-5):
    """Same keys; each tensor within tol of its own largest magnitude, or of a millionth of the largest magnitude of
    all (gradients that vanish in exact arithmetic, such as a bias before a BatchNorm, are rounding noise)."""
    assert a.keys() == b.keys()
    scale = max((t.abs().max().item() for t in b.values() if t.is_floating_point()), default=0)
    for k in a:
        atol = tol * b[k].abs().max().item() + 1e-6 * scale if b[k].is_floating_point() else 0
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# --- Exactness ---
@pytest.mark.parametrize('method', config.METHODS)
def test_chunks_equal_one_pass(method):
    """ViT and text transformer (LayerNorm): a batch of 8 in chunks of 2 gives the loss, every parameter gradient
    and the heads' BN running statistics of one pass (BYOLIP's momentum model and SwALIP's Sinkhorn included)."""
    cfg = cfg_of(method)
    net, momentum = build(cfg)
    inputs = inputs_of(cfg)
    loss, grads, buffers = step(cfg, net, momentum, inputs)
    chunked = cfg_of(method, chunk=2)
    assert train.caches_gradients(chunked) and not train.caches_gradients(cfg)
    c_loss, c_grads, c_buffers = step(chunked, net, momentum, inputs)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=0)
    assert_same(c_grads, grads)
    assert_same(c_buffers, buffers)


def reference(cfg, net, momentum, inputs):
    """Gradient caching's definition without its mechanism: each chunk encoded once, with a graph, in the order of
    its first pass (the chunks, then the momentum model's), the heads and the loss on the whole batch, one backward."""
    net, momentum = copy.deepcopy(net), copy.deepcopy(momentum)
    rows = [slice(i, i + cfg.chunk) for i in range(0, len(inputs[0]), cfg.chunk)]
    chunks = [(inputs[0][r], inputs[1][r], [s[r] for s in inputs[2]]) for r in rows]
    features = train.join_chunks([net.trunks(*chunk) for chunk in chunks])
    target = None
    if momentum is not None:
        with torch.no_grad():
            target = momentum.project(*train.join_chunks([momentum.trunks(*chunk) for chunk in chunks]))
    loss = model_lib.compute_loss(net.project(*features), cfg, target)['loss']
    loss.backward()
    return loss.detach(), grads_of(net), buffers_of(net, momentum)


@pytest.mark.parametrize('vision', ['vit', 'resnet50'])
@pytest.mark.parametrize('method', config.METHODS)
def test_second_pass_replays_the_first(monkeypatch, method, vision):
    """With patch dropout and text dropout (ViT), or BatchNorm (ResNet, under gradient checkpointing too): the
    cached step equals encoding each chunk once with a graph under the same RNG, so its second pass drew what its
    first drew and the BN running statistics count each chunk once; the RNG ends where that reference's does."""
    drops = dict(text_dropout=0.3, patch_dropout_weak=0.25, patch_dropout_strong=0.5) if vision == 'vit' else {}
    cfg = cfg_of(method, vision=vision, chunk=2, **drops)
    net, momentum = build(cfg, monkeypatch)
    inputs = inputs_of(cfg)
    torch.manual_seed(5)
    ref = reference(cfg, net, momentum, inputs)
    after = torch.get_rng_state()
    for checkpointing in (False, True) if vision == 'resnet50' else (False,):
        net.set_grad_checkpointing(checkpointing)
        torch.manual_seed(5)
        cached = step(cfg, net, momentum, inputs)
        assert torch.equal(torch.get_rng_state(), after)
        torch.testing.assert_close(cached[0], ref[0], rtol=1e-6, atol=0)
        assert_same(cached[1], ref[1])
        assert_same(cached[2], ref[2])
    if vision == 'vit':  # the draws matter: another mask gives other gradients
        torch.manual_seed(6)
        assert not torch.allclose(step(cfg, net, momentum, inputs)[0], ref[0])


def test_gradient_scaling_happens_once():
    """fp16 (a GradScaler's loss scale, bf16 autocast here on the CPU): the cached feature gradients carry the scale
    into the trunks once; the scaled gradients equal one pass's."""
    cfg = cfg_of('rocket')
    net, momentum = build(cfg)
    inputs = inputs_of(cfg)
    scaled = []
    for chunk in (0, 2):
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
        autocast = torch.autocast('cpu', dtype=torch.bfloat16)
        scaled.append(step(cfg_of('rocket', chunk=chunk), net, momentum, inputs, scaler, autocast)[1])
    assert_same(scaled[1], scaled[0], tol=3e-2)


# --- 1 rank in K chunks = K ranks ---
def _ranks_worker(rank, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    model_lib.ResNet50 = SmallResNet  # spawned: no monkeypatch here
    out = {}
    for chunk in (0, 4):  # 2 ranks x 8: DDP in one pass; each rank in 2 chunks of 4, its gradients averaged
        cfg = cfg_of('clip', vision='resnet50', gather_with_grad=True, batch_size=8, chunk=chunk)
        net, _ = build(cfg)
        train_model = train.wrap_model(net, cfg, torch.device('cpu'), 2)
        assert isinstance(train_model, train.DDP) != train.caches_gradients(cfg)
        weak, tokens, strong = inputs_of(cfg, B=16)  # the global batch of 16, this rank's 8 rows
        mine = slice(8 * rank, 8 * rank + 8)
        scaler = torch.amp.GradScaler('cpu', enabled=False)
        loss = train.forward_backward(cfg, train_model, net, None, scaler, OFF, (weak[mine], tokens[mine], []), True)
        if train.caches_gradients(cfg):
            train.average_gradients(net, 2)
        out[chunk] = (loss['loss'].detach(), grads_of(net), dict(net.named_buffers()))
    torch.save(out, f'{results}.{rank}')
    dist.destroy_process_group()


def test_one_rank_in_chunks_equals_ranks_with_a_chunk_each(tmp_path, monkeypatch):
    """ResNet trunk with BatchNorm (per-rank BN on CPU): 1 rank with 16 in 2 chunks of 8 == 2 gloo ranks with 8 each
    (DDP), and 1 rank in 4 chunks of 4 == 2 ranks each in 2 chunks of 4 (the gradients averaged by one all-reduce,
    rank 0's BN statistics on both)."""
    mp.spawn(_ranks_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'res')), nprocs=2)
    ranks = [torch.load(tmp_path / f'res.{r}', weights_only=True) for r in range(2)]
    for rank_chunk, one_chunk in ((0, 8), (4, 4)):
        cfg = cfg_of('clip', vision='resnet50', gather_with_grad=True, batch_size=16, chunk=one_chunk)
        net, _ = build(cfg, monkeypatch)
        loss, grads, _ = step(cfg, net, None, inputs_of(cfg, B=16))
        torch.testing.assert_close((ranks[0][rank_chunk][0] + ranks[1][rank_chunk][0]) / 2, loss, rtol=1e-6, atol=0)
        for r in range(2):  # DDP's average, or ours, on every rank
            assert_same(ranks[r][rank_chunk][1], grads)
    for k, buffer in ranks[0][4][2].items():  # each rank's BN saw its own rows: ours, as DDP, keeps rank 0's
        torch.testing.assert_close(ranks[1][4][2][k], buffer, rtol=0, atol=0, msg=k)


# --- Training runs ---
def test_two_chunked_processes_match_one_on_the_same_global_batch(tmp_path):
    """torchrun, 2 gloo ranks: --global_batch=8 splits into 4 per rank, in chunks of 2, two micro-batches accumulated
    and the gradients averaged by train's own all-reduce (no DDP), and trains as one process with the 8 in chunks of 2
    (ViT: no BN)."""
    flags = [f for f in TRAIN_FLAGS if not f.startswith('--batch_size')] + [
        '--global_batch=8', '--chunk=2', '--update_freq=2', '--method=clip', '--gather_with_grad=true',
        '--max_steps=3', '--lr=1e-3', '--warmup_epochs=0.25']
    one = subprocess.run([sys.executable, 'train.py', *flags, f'--output_dir={tmp_path / "one"}'], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=HANG)
    assert one.returncode == 0, one.stdout + one.stderr
    assert 'global batch 8 = 1 x 8 per process, in chunks of 2 (gradient caching), 2 accumulated' in one.stdout
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
                          'train.py', *flags, f'--output_dir={tmp_path / "two"}'], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=HANG)
    assert two.returncode == 0, two.stdout + two.stderr
    assert 'global batch 8 = 2 x 4 per process, in chunks of 2 (gradient caching), 2 accumulated' in two.stdout
    one, two = load(tmp_path / 'one' / 'checkpoint.pt'), load(tmp_path / 'two' / 'checkpoint.pt')
    assert (two['data']['world_size'], two['data']['batch_size']) == (2, 4)
    for k in one['model']:
        a, b = one['model'][k], two['model'][k]
        if k.endswith('attn.in_proj.bias'):  # the key bias has a zero gradient in exact maths: Adam rescales noise
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


# --- The global batch on the command line ---
NO_BATCH = [f for f in TRAIN_FLAGS if not f.startswith('--batch_size')]


def test_a_global_batch_the_world_does_not_divide_is_one_line(tmp_path):
    """As torchrun starts each rank (WORLD_SIZE set): one line before any work, exit 2."""
    status, _, stderr = run(['train.py', *NO_BATCH, '--global_batch=64', f'--output_dir={tmp_path / "out"}'],
                            env={'WORLD_SIZE': '3'})
    assert status == 2
    assert_one_error_line(stderr, '--global_batch=64 does not split over 3 processes', '--global_batch=63')
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flags, world, parts', [
    (['--batch_size=8', '--chunk=3'], 1, ['--chunk=3 does not divide the per-process batch of 8: pass --chunk=2']),
    (['--global_batch=64', '--batch_size=8'], 2, ['--global_batch=64 and --batch_size=8 disagree on 2 process(es)']),
    (['--global_batch=16', '--chunk=2', '--compile'], 2,
     ['--compile does not combine with gradient caching', 'per-process batch of 8', '--chunk=0']),
], ids=['chunk', 'both', 'compile'])
def test_batch_errors_are_one_line(tmp_path, monkeypatch, capsys, flags, world, parts):
    monkeypatch.setenv('WORLD_SIZE', str(world))
    with pytest.raises(SystemExit) as exit_info:
        config.run_cli(train.main, [*NO_BATCH, *flags, f'--output_dir={tmp_path / "out"}'])
    assert exit_info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, *parts)
    assert not (tmp_path / 'out').exists()


def test_help_shows_the_per_process_batch_of_the_world_size(monkeypatch, capsys):
    monkeypatch.setenv('WORLD_SIZE', '8')
    with pytest.raises(SystemExit):
        config.parse_args(['--dataset=cc3m', '--help'])
    out = capsys.readouterr().out
    assert '8 process(es) (WORLD_SIZE)' in out
    flag = {line.split()[0]: line for line in out.splitlines() if line.startswith('  --')}
    assert flag['--global_batch'].endswith('(here: 4096)') and flag['--batch_size'].endswith('(here: 512)')
    assert flag['--chunk'].endswith('(here: 128)')


@pytest.mark.parametrize('world, flags, line, warns', [
    (1, {}, 'global batch 4096 = 1 x 4096 per process, in chunks of 128 (gradient caching)', False),
    (32, {}, 'global batch 4096 = 32 x 128 per process, in one pass', False),
    (8, {'batch_size': '128', 'update_freq': '4'}, 'global batch 1024 = 8 x 128 per process, in one pass, 4 '
                                                    'accumulated per step', True),
])
def test_start_line_says_the_batch_and_warns_off_the_papers(monkeypatch, capsys, world, flags, line, warns):
    monkeypatch.setenv('WORLD_SIZE', str(world))
    cfg = config.resolve({'dataset': 'cc3m', **flags}, verbose=False)
    train.announce(cfg, train.Loop(), 100, 3200, torch.float32, torch.device('cpu'), world)
    out = capsys.readouterr().out
    assert line in out
    assert ('global batch of 4096' in out) == warns
