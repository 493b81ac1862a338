"""model.METHODS: every row builds its model, trains under plain DDP on 2 gloo ranks (a head its loss does not use
stops the second step) and resumes; SigLIP with CLIP 🚀's views trains on the demo; a row's columns are what
config, model and train read, its params its flags."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import config
import model as model_lib
import train

ROOT = Path(__file__).resolve().parents[1]
HANG = 1200  # seconds: a guard far above any run here, never a speed limit
TINY = dict(vision_layers=1, text_layers=1, vision_width=32, text_width=32, image_size=32, local_crop_size=32,
            patch_size=16, embed_dim=16, mlp_hidden_dim=32, barlip_hidden_dim=32, barlip_proj_dim=32,
            siamlip_hidden_dim=32, siamlip_proj_dim=16, batch_size=4, workers=0, eval_every=0)
VOCAB, B, L = 100, 4, 16


def method_cfg(method, **flags):
    return config.resolve({k: str(v) for k, v in {**TINY, 'method': method, **flags}.items()}, verbose=False)


def batch(cfg, seed):
    """One rank's synthetic batch (weak images, tokens, strong images), the same for every method."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (B, 1 + cfg.num_augs, L), generator=g)
    strong = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(cfg.num_augs)]
    return torch.randn(B, 3, 32, 32, generator=g), tokens, strong


def step(cfg, ddp, model, momentum, optimizer, inputs):
    out = ddp(*inputs)
    target = None
    if momentum is not None:
        with torch.no_grad():
            target = momentum(*inputs)
    loss = model_lib.compute_loss(out, cfg, target)['loss']
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if momentum is not None:
        train.ema_update(momentum, model, cfg.momentum_tau)
    return loss.item()


def run_method(method, rank, world, path):
    """Two steps, the state saved, then a third step continued in place and from a freshly built, loaded copy."""
    cfg = method_cfg(method, lr='1e-3')
    device = torch.device('cpu')
    model, momentum, optimizer, _ = train.build_training(cfg, VOCAB, device, rank, world)
    ddp = train.wrap_model(model, cfg, device, world)  # plain DDP: no unused-parameter search
    losses = [step(cfg, ddp, model, momentum, optimizer, batch(cfg, 10 * s + rank)) for s in range(2)]
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'momentum': momentum.state_dict() if momentum is not None else None}
    torch.save(state, path)
    losses.append(step(cfg, ddp, model, momentum, optimizer, batch(cfg, 20 + rank)))
    resumed, r_momentum, r_optimizer, _ = train.build_training(cfg, VOCAB, device, rank, world)
    state = torch.load(path, weights_only=True)
    resumed.load_state_dict(state['model'])  # strict: exactly the row's heads
    r_optimizer.load_state_dict(state['optimizer'])
    if r_momentum is not None:
        r_momentum.load_state_dict(state['momentum'])
    r_ddp = train.wrap_model(resumed, cfg, device, world)
    again = step(cfg, r_ddp, resumed, r_momentum, r_optimizer, batch(cfg, 20 + rank))
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    return losses, again, same


def _worker(rank, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    res = {m: run_method(m, rank, 2, f'{results}.{m}.{rank}.pt') for m in config.METHODS}
    torch.save(res, f'{results}.{rank}')
    dist.destroy_process_group()


def test_every_method_trains_under_plain_ddp_and_resumes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'res')), nprocs=2)
    for rank in range(2):
        res = torch.load(tmp_path / f'res.{rank}', weights_only=False)
        assert list(res) == list(config.METHODS)
        for method, (losses, again, same) in res.items():
            assert all(map(math.isfinite, losses)), method
            assert again == losses[2] and same, method  # the loaded copy continues exactly


@pytest.mark.slow
@pytest.mark.parametrize('method', list(config.METHODS))
def test_every_method_resumes_through_torchrun(tmp_path, method):
    """train.py under torchrun, 2 gloo ranks, 2 steps; then --resume=auto to a third step."""
    flags = [f'--{k}={v}' for k, v in {**TINY, 'demo_train_size': 32, 'log_every': 1}.items()] + [
        f'--method={method}', f'--output_dir={tmp_path}']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone', str(ROOT / 'train.py')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    for more in (['--max_steps=2'], ['--max_steps=3', '--resume=auto']):
        r = subprocess.run(cmd + flags + more, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG)
        assert r.returncode == 0, r.stdout + r.stderr
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['step'] == 3


def test_rocket_siglip_trains_on_the_demo(tmp_path):
    """SigLIP as CLIP 🚀's pair term, with the weak and strong views: the demo loss falls within 16 steps."""
    train.main([f'--{k}={v}' for k, v in {**TINY, 'batch_size': 8, 'demo_train_size': 64, 'log_every': 1}.items()]
               + ['--method=rocket_siglip', '--lr=2e-3', '--warmup_epochs=0.25', '--max_steps=16',
                  f'--output_dir={tmp_path}'])
    records = train_records(tmp_path)
    losses = [r['loss'] for r in records]
    assert len(losses) == 16 and all(map(math.isfinite, losses))
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert 'local_loss' in records[0] and records[0]['logit_bias'] != records[-1]['logit_bias']


def train_records(out):
    return [r for r in map(json.loads, (Path(out) / 'log.jsonl').read_text().splitlines()) if r['type'] == 'train']


# --- the table's columns ---
def test_siglip_rows_preset_and_refuse():
    plain = config.resolve({'method': 'siglip'}, verbose=False)
    assert (plain.num_augs, plain.remove_stopwords_prob, plain.text_augment, plain.label_smoothing) == (0, 0, False, 0)
    assert plain.logit_scale_init == pytest.approx(math.log(10)) and plain.logit_bias_init == -10
    views = config.resolve({'method': 'rocket_siglip'}, verbose=False)
    assert views.num_augs == 2 and views.l2l_logit_scale_init == pytest.approx(math.log(10))
    with pytest.raises(config.ConfigError, match='rocket_siglip needs --label_smoothing=0'):
        config.resolve({'method': 'rocket_siglip', 'label_smoothing': '0.1'}, verbose=False)


def test_a_new_row_is_all_a_method_needs(monkeypatch):
    """A row that is not clip or rocket may still train without strong views, and gets only the heads it lists."""
    monkeypatch.setitem(config.METHODS, 'plain_siglip', model_lib.Method(model_lib.siglip_term, heads=('bias',),
                                                                         views=None))
    cfg = config.resolve({**{k: str(v) for k, v in TINY.items()}, 'method': 'plain_siglip'}, verbose=False)
    assert cfg.num_augs == 0  # the plain settings of a row without views
    net = model_lib.build_model(cfg, VOCAB, verbose=False)
    assert net.heads == ('z',) and hasattr(net, 'logit_bias') and not hasattr(net, 'l2l_logit_scale')
    out = net(*batch(cfg, 0))
    assert set(out) == {'z_image', 'z_text', 'logit_scale', 'logit_bias'}
    model_lib.compute_loss(out, cfg)['loss'].backward()
    assert all(p.grad is not None for p in net.parameters())


def test_every_row_holds_its_terms_and_its_params_are_bounded_flags():
    """A row's terms are functions; each param is a Config field and a --flag with its default and help, refused
    outside its bound."""
    cfg, text = config.Config(), config.help_text()
    for name, method in config.METHODS.items():
        assert callable(method.loss) and (method.extra is None or callable(method.extra)), name
        assert not method.weight or hasattr(cfg, method.weight), name
        assert set(method.heads) <= {'h', 'bias', 'slip', 'barlip', 'siam'}, name
        for p in method.params:
            assert getattr(cfg, p.name) == p.default and config.PARAMS[p.name] == p, p
            assert f'--{p.name}' in text and p.help in text, p
            low, high = map(float, p.bound[1:-1].split(','))
            if math.isinf(low) and math.isinf(high):
                continue
            outside = str(type(p.default)(low - 1 if math.isfinite(low) else high + 1))
            with pytest.raises(config.ConfigError, match=rf'--{p.name}=\S+: must be in {re.escape(p.bound)}'):
                config.resolve({'method': name, p.name: outside}, verbose=False)


def test_rows_without_views_train_plain_and_refuse_strong_views():
    """A row that never looks at strong views gets the plain settings over a recipe's A = 2, stopword removal and
    label smoothing (its own preset on top); --num_augs > 0 is refused, as views nothing would encode."""
    for name, method in config.METHODS.items():
        cfg = config.resolve({'method': name, 'dataset': 'cc3m'}, verbose=False)
        if method.views is None:
            expected = {**config.PLAIN, **method.preset, **method.fixed}
            assert {k: getattr(cfg, k) for k in config.PLAIN} == {k: expected[k] for k in config.PLAIN}, name
            with pytest.raises(config.ConfigError, match=f'--method={name} never encodes strong views'):
                config.resolve({'method': name, 'num_augs': '2'}, verbose=False)
        else:
            assert cfg.num_augs == 2 and cfg.remove_stopwords_prob > 0 and cfg.text_augment, name
