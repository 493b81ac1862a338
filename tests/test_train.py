"""train.py: schedule, weight-decay groups, atomic checkpoints, exact resume, signals, DDP equivalence."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import config
import data
import model as model_lib
import train

ROOT = Path(__file__).resolve().parents[1]
# the tiny model made tinier: one block per encoder, 32 px images, 64 demo samples = 8 batches of 8
TINY = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=32',
        '--local_crop_size=32', '--patch_size=16', '--embed_dim=16', '--mlp_hidden_dim=32', '--demo_train_size=64',
        '--batch_size=8', '--workers=0', '--eval_every=0', '--log_every=1', '--epochs=4']
TINY_FLAGS = dict(f[2:].split('=') for f in TINY)
# a hang guard in seconds, far above what any run here takes on a slow, busy machine (never a speed limit)
HANG = 1200
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}  # one thread: bit-reproducible CPU maths


def run_train(out, *flags, wait=True):
    """train.py in a fresh process (its own interpreter, as a resumed job would be)."""
    cmd = [sys.executable, str(ROOT / 'train.py'), *TINY, f'--output_dir={out}', *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output = proc.communicate(timeout=HANG)[0]
        assert proc.returncode == 0, output
    return proc


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def log_records(out, kind='train'):
    lines = (Path(out) / 'log.jsonl').read_text().split('\n')[:-1]  # complete lines only: a run may be writing
    return [r for r in map(json.loads, lines) if r['type'] == kind]


# --- Schedule ---
def test_lr_schedule_matches_linspace_warmup_and_cosine():
    cfg = config.resolve({'epochs': '3', 'warmup_epochs': '1', 'lr': '3e-3', 'lr_start': '1e-6', 'lr_end': '1e-5'},
                         verbose=False)
    steps_per_epoch = 10
    lrs = [train.lr_schedule(t, cfg, steps_per_epoch) for t in range(30)]
    np.testing.assert_allclose(lrs[:10], np.linspace(1e-6, 3e-3, 10), rtol=1e-12)  # both endpoints included
    assert lrs[0] == pytest.approx(1e-6) and lrs[9] == pytest.approx(3e-3)
    assert lrs[10] == pytest.approx(3e-3)  # cosine starts at its peak, k = 0
    assert lrs[29] == pytest.approx(1e-5 + 0.5 * (3e-3 - 1e-5) * (1 + math.cos(math.pi * 19 / 20)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert train.lr_schedule(10_000, cfg, steps_per_epoch) == lrs[29]  # recipe §8.16: clamped past the end


# --- Parameter groups ---
def test_weight_decay_groups_follow_the_rule():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.conv = nn.Conv2d(3, 4, 3)
            self.ln = nn.LayerNorm(4)
            self.bn = nn.BatchNorm2d(4)
            self.token_embedding = nn.Embedding(10, 4)
            self.positional_embedding = nn.Parameter(torch.zeros(7, 4))
            self.class_embedding = nn.Parameter(torch.zeros(1, 1, 4))
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    toy = Toy()
    decay, no_decay = train.param_groups(toy, 0.1)
    names = {id(p): n for n, p in toy.named_parameters()}
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0.0
    assert sorted(names[id(p)] for p in decay['params']) == sorted(
        ['proj.weight', 'conv.weight', 'token_embedding.weight', 'positional_embedding', 'class_embedding'])
    assert sorted(names[id(p)] for p in no_decay['params']) == sorted(
        ['proj.bias', 'conv.bias', 'ln.weight', 'ln.bias', 'bn.weight', 'bn.bias', 'logit_scale'])


def test_weight_decay_groups_of_the_real_model():
    """On the real model, the ndim rule excludes exactly biases, norm affines and logit scales."""
    cfg = config.resolve(TINY_FLAGS, verbose=False)
    model = train.build_model(cfg, 1000)
    norm_params = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d))
                   for p in m.parameters(recurse=False)}
    expected_no_decay = {n for n, p in model.named_parameters()
                         if id(p) in norm_params or n.endswith('bias') or n.endswith('logit_scale')}
    decay, no_decay = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay['params']} == expected_no_decay
    assert 'visual.class_embedding' in {names[id(p)] for p in decay['params']}  # timm style: decayed, as officially
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


def test_openai_vit_class_token_takes_no_weight_decay():
    """OpenAI-style ViT: its class token is exempt (open_clip's 1-D token is); every other tensor by the ndim rule."""
    cfg = config.resolve({**TINY_FLAGS, 'vit_style': 'openai'}, verbose=False)
    model = train.build_model(cfg, 1000)
    decay, no_decay = train.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay['params']} == {
        n for n, p in model.named_parameters() if p.ndim < 2 or n == 'visual.class_embedding'}
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))


@pytest.mark.parametrize('method', config.METHODS)
def test_every_parameter_gets_a_gradient(method):
    """Plain DDP (no static_graph, no unused-parameter search) needs this of every method."""
    cfg = config.resolve({**TINY_FLAGS, 'method': method, 'barlip_hidden_dim': '32',
                          'barlip_proj_dim': '32', 'siamlip_hidden_dim': '32', 'siamlip_proj_dim': '16'}, verbose=False)
    model, A, B = train.build_model(cfg, 100), cfg.num_augs, 4
    tokens = torch.randint(1, 100, (B, 1 + A, cfg.context_length))
    inputs = (torch.randn(B, 3, 32, 32), tokens, [torch.randn(B, 3, 32, 32)] * A)
    with torch.no_grad():
        target = model(*inputs) if config.METHODS[method].momentum else None
    train.compute_loss(model(*inputs), cfg, target)['loss'].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# --- Checkpoints ---
def test_atomic_save_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    config.atomic_save({'step': 1, 'w': torch.arange(3)}, path)
    with pytest.raises(Exception):
        config.atomic_save({'step': 2, 'bad': lambda: 0}, path)  # pickling fails midway through the write
    assert load(path)['step'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pt']  # no temporary file left behind


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    cfg = config.resolve({'output_dir': str(tmp_path)}, verbose=False)
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(config.UserError, match='NaN'):
        train.save_checkpoint(cfg, model, optimizer, torch.amp.GradScaler('cpu', enabled=False), None, 1,
                              {'epoch': 0, 'batch': 1}, {}, 0, 1)
    assert not list(tmp_path.iterdir())


def test_foreign_output_dir_is_refused(tmp_path):
    config.save_json(config.resolve({**TINY_FLAGS, 'lr': '0.5', 'output_dir': str(tmp_path)}, verbose=False),
                     tmp_path / 'config.json')
    with pytest.raises(config.UserError, match=r'another config \(lr: 0.5 ->'):
        train.main([*TINY, f'--output_dir={tmp_path}'])


# --- Training runs ---
def test_demo_steps_lower_the_loss(tmp_path):
    train.main([*TINY, f'--output_dir={tmp_path}', '--lr=2e-3', '--warmup_epochs=0.25', '--max_steps=16',
                '--save_every=8'])
    losses = [r['loss'] for r in log_records(tmp_path)]
    assert len(losses) == 16 and all(map(math.isfinite, losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    ckpt = load(tmp_path / 'checkpoint.pt')  # weights_only=True: tensors and plain data only
    assert ckpt['format'] == model_lib.FORMAT and ckpt['step'] == 16
    assert data.load_merges(ckpt['bpe_merges']) == data.load_merges(data.DEMO_BPE_PATH)  # evaluates anywhere
    assert ckpt['data'] == {'epoch': 2, 'batch': 0, 'world_size': 1, 'batch_size': 8}
    assert sorted(p.name for p in tmp_path.glob('checkpoint_*.pt')) == ['checkpoint_00000008.pt',
                                                                        'checkpoint_00000016.pt']
    with pytest.raises(config.UserError, match='already holds checkpoint.pt; pass --resume=auto'):
        train.main([*TINY, f'--output_dir={tmp_path}', '--lr=2e-3', '--warmup_epochs=0.25', '--max_steps=16',
                    '--save_every=8'])


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which('c++') or shutil.which('g++')), reason='inductor on CPU needs a C++ compiler')
def test_compiled_training_matches_eager_on_cpu(tmp_path):
    """--compile (inductor; the CUDA path differs only in its kernels) logs the eager run's losses, and its
    checkpoint has the eager parameter names, so resume and evaluate.py read it."""
    run_train(tmp_path / 'eager', '--max_steps=6')
    run_train(tmp_path / 'compiled', '--max_steps=6', '--compile')
    eager, compiled = ([r['loss'] for r in log_records(tmp_path / d)] for d in ('eager', 'compiled'))
    assert len(eager) == 6 and compiled == pytest.approx(eager, rel=1e-4)
    weights = [load(tmp_path / d / 'checkpoint.pt')['model'] for d in ('eager', 'compiled')]
    assert weights[1].keys() == weights[0].keys()


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(train, 'compute_loss', lambda out, cfg, target=None: {
        'loss': out['z_image'].sum() * float('nan')})
    with pytest.raises(config.UserError, match='3 non-finite losses in a row'):
        train.main([*TINY, f'--output_dir={tmp_path}', '--max_nonfinite=3', '--save_every=1'])
    assert len(log_records(tmp_path, 'nonfinite')) == 3
    ckpt = load(tmp_path / 'checkpoint_00000002.pt')  # saved after two skipped steps: still the initial weights
    cfg = config.resolve(TINY_FLAGS, verbose=False)
    train.seed_everything(cfg.seed)
    initial = train.build_model(cfg, train.build_tokenizer(cfg).vocab_size)
    assert ckpt['optimizer']['state'] == {}
    for k, p in initial.named_parameters():  # parameters; BN running statistics do move in the forwards
        assert torch.equal(p, ckpt['model'][k]), k


@pytest.mark.parametrize('dropout', [['--text_dropout=0.1'],
                                     ['--patch_dropout_weak=0.25', '--patch_dropout_strong=0.5'],
                                     ['--chunk=4', '--text_dropout=0.1', '--patch_dropout_strong=0.5']],
                         ids=['text_dropout', 'patch_dropout', 'chunks'])
def test_resume_is_bit_identical(tmp_path, dropout):
    """6 steps straight == 3 steps, a new process, 3 more steps: mid-epoch and across an epoch end; the dropout
    masks come from the saved RNG state (gradient caching's too: it leaves the RNG where one pass would)."""
    flags = ['--demo_train_size=32', '--method=rocket', *dropout]  # 4 batches/epoch, random dropout
    run_train(tmp_path / 'straight', *flags, '--max_steps=6')
    run_train(tmp_path / 'resumed', *flags, '--max_steps=3')
    assert load(tmp_path / 'resumed' / 'checkpoint.pt')['data']['batch'] == 3
    run_train(tmp_path / 'resumed', *flags, '--max_steps=6', '--resume=auto')
    a, b = load(tmp_path / 'straight' / 'checkpoint.pt'), load(tmp_path / 'resumed' / 'checkpoint.pt')
    assert a['step'] == b['step'] == 6
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert torch.equal(a['rng'][0]['torch'], b['rng'][0]['torch'])
    assert [r['loss'] for r in log_records(tmp_path / 'straight')] == \
        [r['loss'] for r in log_records(tmp_path / 'resumed')]


@pytest.mark.parametrize('vision', ['vit', 'resnet50'])
def test_small_local_crops_train(tmp_path, monkeypatch, vision):
    """Strong views at 16 px under 32 px weak views: one training step of either encoder (the ViT interpolates its
    position embedding to the 1x1 grid, with patch dropout on the weak view)."""
    sizes = []

    def build(cfg, vocab_size, verbose=True):
        model = model_lib.build_model(cfg, vocab_size, verbose)
        model.visual.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape)))
        return model
    monkeypatch.setattr(train, 'build_model', build)
    drop = ['--patch_dropout_weak=0.5'] if vision == 'vit' else []
    train.main([*TINY, f'--output_dir={tmp_path}', f'--vision={vision}', '--local_crop_size=16', '--max_steps=1',
                '--batch_size=4', *drop])
    assert math.isfinite(log_records(tmp_path)[0]['loss'])
    strong = [(4, 3, 16, 16)] * 2 if vision == 'resnet50' else [(8, 3, 16, 16)]  # the ViT takes both at once
    assert sizes[:len(strong) + 1] == [(4, 3, 32, 32), *strong]


def test_resume_across_precisions(tmp_path):
    """An fp32 checkpoint (its GradScaler disabled, its state empty) resumes under fp16's enabled scaler, and
    the fp16 checkpoint back under fp32."""
    run_train(tmp_path, '--max_steps=2')
    run_train(tmp_path, '--max_steps=4', '--resume=auto', '--precision=fp16', '--overwrite')
    assert load(tmp_path / 'checkpoint.pt')['scaler']  # the enabled scaler saved its scale
    run_train(tmp_path, '--max_steps=6', '--resume=auto', '--precision=fp32', '--overwrite')
    assert load(tmp_path / 'checkpoint.pt')['step'] == 6


def wait_for(predicate, proc, timeout=HANG):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < end, 'timed out'
        time.sleep(0.1)


def test_sigterm_saves_and_kill9_keeps_the_last_checkpoint(tmp_path):
    proc = run_train(tmp_path, '--epochs=1000', '--save_every=3', wait=False)
    wait_for(lambda: (tmp_path / 'log.jsonl').exists() and len(log_records(tmp_path)) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=HANG)[0]
    assert proc.returncode == 0, output
    stopped = load(tmp_path / 'checkpoint.pt')
    assert stopped['step'] == log_records(tmp_path)[-1]['step'] >= 4  # saved at the step boundary it stopped on

    proc = run_train(tmp_path, '--epochs=1000', '--save_every=1', '--resume=auto', wait=False)
    wait_for(lambda: len(log_records(tmp_path)) >= stopped['step'] + 3, proc)
    proc.kill()  # SIGKILL: no handler runs, possibly mid-write
    proc.communicate()
    ckpt = load(tmp_path / 'checkpoint.pt')
    assert ckpt['step'] > stopped['step']
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """gloo DDP with gathered, gradient-carrying embeddings == one process with the whole batch (no BN)."""
    flags = ['--method=clip', '--gather_with_grad=true', '--max_steps=3', '--lr=1e-3', '--warmup_epochs=0.25']
    run_train(tmp_path / 'one', *flags)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
           str(ROOT / 'train.py'), *TINY, *flags, '--batch_size=4', f'--output_dir={tmp_path / "two"}']
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = load(tmp_path / 'one' / 'checkpoint.pt'), load(tmp_path / 'two' / 'checkpoint.pt')
    assert two['data']['world_size'] == 2 and len(two['rng']) == 2
    assert not torch.equal(two['rng'][0]['torch'], two['rng'][1]['torch'])  # seed + rank
    for k in one['model']:
        a, b = one['model'][k], two['model'][k]
        if k.endswith('attn.in_proj.bias'):  # the key bias has a zero gradient in exact maths: Adam rescales noise
            a, b = a.view(3, -1)[[0, 2]], b.view(3, -1)[[0, 2]]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
