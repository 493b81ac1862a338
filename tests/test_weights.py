"""Importing released checkpoints: SLIP, CLIP 🚀 (fixtures made by the official classes, outside the project in
../shared/fixtures) and open_clip OpenAI-architecture ViTs (a random open_clip model, when it is installed)."""
import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import model as model_module
import train
from config import Config, ConfigError, UserError
from evaluate import main, read_checkpoint
from data import load_merges, save_merges
from model import CLIPModel, ResNet50, convert_weights

FIXTURES = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures'
CLIP_BPE = FIXTURES.parent / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
needs_fixtures = pytest.mark.skipif(not (FIXTURES / 'slip_vit.pt').is_file(),
                                    reason=f'importer fixtures not found in {FIXTURES}')
# the fixtures are small: their head counts are not the official builders' (fixtures README, section 1.5)
SMALL_HEADS = {'slip_vit': dict(vision_heads=3, text_heads=2), 'rocket_vit': dict(vision_heads=3, text_heads=2),
               'rocket_r50': dict(text_heads=2)}


class TinyResNet(ResNet50):
    """The R50 fixture's shrunk trunk: timm's ResNet with stage widths 8/16/32/64 and 2 blocks per stage."""

    def __init__(self):
        super().__init__(widths=(8, 16, 32, 64), depths=(2, 2, 2, 2))


def close(ours, theirs):
    """Equal to 1e-5 relative (to the largest entry of the reference)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def model_of(ckpt, **changes):
    """The model of an imported checkpoint's config, with its weights and its method heads where it has them."""
    cfg = dataclasses.replace(Config.from_dict(ckpt['config']), **changes)
    net = CLIPModel(cfg, ckpt['model']['text.token_embedding.weight'].shape[0])
    state = {**ckpt['model'], **ckpt['extra_heads']}
    missing, _ = net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()}, strict=False)
    return net.eval(), missing


@pytest.fixture
def fixture_model(monkeypatch):
    """name -> (model, stored io) of a fixture imported through evaluate.read_checkpoint."""
    def load(name, **changes):
        if name == 'rocket_r50':
            monkeypatch.setattr(model_module, 'ResNet50', TinyResNet)
        ckpt = read_checkpoint(FIXTURES / f'{name}.pt', SMALL_HEADS[name])
        net, missing = model_of(ckpt, **changes)
        assert missing == [] or changes
        return net, torch.load(FIXTURES / f'{name}_io.pt', weights_only=True)
    return load


@needs_fixtures
def test_slip_fixture_reproduces_the_official_outputs(fixture_model):
    net, io = fixture_model('slip_vit', method='slip', num_augs=0)  # a SLIP model: CLIP plus its SimCLR head
    out = io['outputs']
    with torch.no_grad():
        feats = net.visual(io['images'])
        close(feats, out['feats_image'])
        close(net.encode_image(io['images']), out['image_embed'])
        close(net.text(io['tokens']), out['feats_text'])
        close(net.encode_text(io['tokens']), out['text_embed'])
        close(net.slip_image(feats), out['image_mlp'])
    close(net.logit_scale.detach(), out['logit_scale_param'])


@needs_fixtures
@pytest.mark.parametrize('name', ['rocket_vit', 'rocket_r50'])
def test_rocket_fixtures_reproduce_the_official_outputs(fixture_model, name):
    """Both CL2L heads; the R50 through a ResNet50 with the fixture's stage widths and depths, so that trunk,
    heads and text tower are all checked (the full-size depths are covered by the key test below)."""
    net, io = fixture_model(name)
    out = io['outputs']
    with torch.no_grad():
        image, text = net.encode_image_heads(io['images']), net.encode_text_heads(io['tokens'])
        close(net.visual(io['images']), out['feats_image'])
        close(net.text(io['tokens']), out['feats_text'])
        for head in ('z', 'h'):
            close(image[head], out[f'{head}_image'])
            close(text[head], out[f'{head}_text'])
    close(net.logit_scale.detach(), out['logit_scale_param'])
    close(net.l2l_logit_scale.detach(), out['l2l_logit_scale_param'])


def full_size_models():
    if not (FIXTURES / 'official_full_size_keys.json').is_file():
        return []
    entries = json.loads((FIXTURES / 'official_full_size_keys.json').read_text())
    return [pytest.param(title, keys, id=f"{title.split(' ')[0]}-{re.search(r'[A-Z0-9]+_[A-Z0-9_]+', title)[0]}-{i}")
            for i, (title, keys) in enumerate(entries.items()) if not title.startswith('_')]


@needs_fixtures
@pytest.mark.parametrize('title,keys', full_size_models())
def test_full_size_official_keys_map_onto_the_model(title, keys):
    """Every key of the full-size official models maps onto a tensor of the same shape, and every tensor of the
    model built from the importer's config is covered (SLIP files: the CLIP model plus SLIP's SimCLR head)."""
    name = re.search(r'\b((?:CLIP|SLIP|CL2L)_[A-Z0-9_]+)', title)[1]
    shapes = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    imported = convert_weights({'state_dict': shapes, 'args': argparse.Namespace(model=name)})
    assert imported['ignored'] == []
    cfg = dataclasses.replace(Config(), **imported['arch'], bpe_path='')
    if imported['extra']:  # SLIP_*: build the SimCLR head without the local heads (unvalidated: test only)
        cfg = dataclasses.replace(cfg, method='slip', num_augs=0)
    with torch.device('meta'):
        net = CLIPModel(cfg, 49408)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in {**imported['state'], **imported['extra']}.items()}
    assert theirs == ours
    vision_heads, text_heads = {'VITS16': 12, 'VITB16': 12, 'VITL16': 16, 'VITS16MOCO': 12, 'R50': None}[
        name.split('_')[1]], 8
    assert (imported['arch'].get('vision_heads'), imported['arch']['text_heads']) == (vision_heads, text_heads)


# --- open_clip ---
def open_clip_model(quick_gelu):
    """A randomly initialised small OpenAI-architecture open_clip CLIP, every tensor redrawn (no zeros or ones)."""
    open_clip = pytest.importorskip('open_clip', reason='open_clip_torch (a test-only dependency) is not installed')
    torch.manual_seed(0)
    theirs = open_clip.CLIP(embed_dim=24, quick_gelu=quick_gelu,
                            vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=8),
                            text_cfg=dict(context_length=77, vocab_size=500, width=128, heads=2, layers=2)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3) + (p.dim() == 1))
    return theirs


def tokens():
    g = torch.Generator().manual_seed(1)
    t = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((5, 12, 75)):
        t[row, :n] = torch.randint(1, 498, (n,), generator=g)
        t[row, n] = 499  # EOT: the largest id
    return t


@pytest.mark.parametrize('quick_gelu', [True, False])
def test_open_clip_vit_imports_with_equal_embeddings(tmp_path, quick_gelu):
    theirs = open_clip_model(quick_gelu)
    torch.save(theirs.state_dict(), tmp_path / 'open_clip.pt')
    # no name, so no head counts: OpenAI's rule only when asked; LAION's GELU models need the activation flags
    acts = dict(guess_heads=True) if quick_gelu else dict(vision_act='gelu', text_act='gelu', vision_heads=2,
                                                          text_heads=2)
    ckpt = read_checkpoint(tmp_path / 'open_clip.pt', acts)
    cfg = Config.from_dict(ckpt['config'])
    assert (cfg.vit_style, cfg.vision_heads, cfg.text_heads, cfg.image_size) == ('openai', 2, 2, 32)
    ours, missing = model_of(ckpt)
    assert missing == []
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(ours.encode_image(images), theirs.encode_image(images))
        close(ours.encode_text(tokens()), theirs.encode_text(tokens()))
    # the wrong activation is a different model: the check above can fail
    wrong, _ = model_of(ckpt, vision_act='gelu' if quick_gelu else 'quickgelu')
    with torch.no_grad():
        assert not torch.allclose(wrong.encode_image(images), theirs.encode_image(images), rtol=1e-3, atol=1e-3)


def test_default_vit_is_unchanged_by_the_openai_options():
    """The OpenAI options add nothing to the default ViT: same tensors, no ln_pre, a biased patch conv."""
    vit = model_module.VisionTransformer(32, 8, 32, 1, 2)
    openai = model_module.VisionTransformer(32, 8, 32, 1, 2, 'openai', model_module.QuickGELU)
    assert isinstance(vit.ln_pre, torch.nn.Identity) and vit.conv1.bias is not None
    assert set(openai.state_dict()) - set(vit.state_dict()) == {'ln_pre.weight', 'ln_pre.bias'}
    assert set(vit.state_dict()) - set(openai.state_dict()) == {'conv1.bias'}
    assert openai.ln_post.eps == 1e-5 and vit.ln_post.eps == 1e-6


# --- bad files ---
def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ')  # one line
    return exit_info.value.code, err


@needs_fixtures
def test_bad_files_give_one_line(tmp_path, capsys):
    data = (FIXTURES / 'slip_vit.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(data[:len(data) // 2])
    torch.save({'weights': {'a': torch.zeros(2)}, 'step': 3}, tmp_path / 'unknown.pt')
    ckpt = model_module.load_weights_file(FIXTURES / 'slip_vit.pt')
    simclr = {k: v for k, v in ckpt['state_dict'].items() if k.startswith(('module.visual.', 'module.image_mlp.'))}
    torch.save({**ckpt, 'state_dict': simclr}, tmp_path / 'simclr.pt')
    rn50 = {'visual.attnpool.positional_embedding': torch.zeros(50, 8), 'token_embedding.weight': torch.zeros(4, 8)}
    torch.save(rn50, tmp_path / 'rn50.pt')
    cases = [('truncated', 'corrupt or unreadable'),
             ('unknown', "not a rocket-clip checkpoint: found a dict with keys"),
             ('simclr', 'SLIP SimCLR checkpoint: an image tower without text tower'),
             ('rn50', "modified ResNet-50 .attention pooling. is out of scope")]
    for name, message in cases:
        code, err = run_main([tmp_path / f'{name}.pt', '--datasets=cifar10'], capsys)
        assert code == 1 and re.search(message, err), err


@needs_fixtures
def test_heads_without_a_model_name_must_be_given(tmp_path):
    ckpt = model_module.load_weights_file(FIXTURES / 'rocket_vit.pt')
    torch.save(ckpt['state_dict'], tmp_path / 'raw.pt')  # a bare state_dict: no args.model
    with pytest.raises(UserError, match='head counts are unknown .* pass --text_heads=N --vision_heads=N'):
        read_checkpoint(tmp_path / 'raw.pt')
    assert Config.from_dict(read_checkpoint(tmp_path / 'raw.pt', SMALL_HEADS['rocket_vit'])['config']).vision_heads == 3


# --- evaluate.py --convert and train.py --init ---
def fixture_vocab(tmp_path):
    """A merges file of the fixtures' 1000-token vocabulary (CLIP's first 486 merges): converted files carry it."""
    save_merges(load_merges(CLIP_BPE)[:1000 - 514], tmp_path / 'vocab1000.txt.gz')
    return f"--bpe_path={tmp_path / 'vocab1000.txt.gz'}"


@needs_fixtures
def test_convert_writes_a_native_checkpoint(tmp_path, capsys):
    out = tmp_path / 'converted.pt'
    main(['--convert', str(FIXTURES / 'rocket_vit.pt'), '--out', str(out), '--vision_heads=3', '--text_heads=2',
          fixture_vocab(tmp_path)])
    ckpt = read_checkpoint(out)
    assert 'source' in ckpt and ckpt['epoch'] == 32
    net, missing = model_of(ckpt)
    io = torch.load(FIXTURES / 'rocket_vit_io.pt', weights_only=True)
    with torch.no_grad():
        close(net.encode_image(io['images'], 'h'), io['outputs']['h_image'])
    code, err = run_main(['--convert', FIXTURES / 'rocket_vit.pt', '--out', out], capsys)
    assert code == 1 and 'already exists' in err
    code, err = run_main(['--convert', FIXTURES / 'rocket_vit.pt'], capsys)
    assert code == 2 and 'usage' in err


@needs_fixtures
def test_init_loads_the_weights_and_lists_missing_heads(tmp_path, capsys):
    converted = tmp_path / 'slip.pt'
    main(['--convert', str(FIXTURES / 'slip_vit.pt'), '--out', str(converted), '--vision_heads=3', '--text_heads=2',
          fixture_vocab(tmp_path)])
    arch = dict(vision_width=48, vision_layers=2, vision_heads=3, patch_size=8, image_size=40, local_crop_size=40,
                text_width=32, text_layers=2, text_heads=2, embed_dim=32, mlp_hidden_dim=16)
    cfg = dataclasses.replace(Config(), **arch, method='rocket', init=str(converted))
    torch.manual_seed(0)
    net = CLIPModel(cfg, 1000)
    h_before = net.image_heads['h'][0].weight.clone()
    capsys.readouterr()
    train.maybe_init_weights(net, cfg, None, True)
    line = capsys.readouterr().out
    assert 'initialised here (not in the file): l2l_logit_scale, image_heads.h, text_heads.h;' in line
    assert 'not used by this model: slip_image' in line
    state = read_checkpoint(converted)['model']
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(net.image_heads['h'][0].weight, h_before)
    train.maybe_init_weights(net, dataclasses.replace(cfg, init=str(FIXTURES / 'nope.pt')), 'resuming', True)
    # the official name fixes 12 and 8 heads: a config with others is another model
    with pytest.raises(ConfigError, match='pass --vision_heads=12 --text_heads=8'):
        train.maybe_init_weights(net, dataclasses.replace(cfg, init=str(FIXTURES / 'slip_vit.pt')), None, True)


def test_init_names_the_flags_of_an_openai_vit(tmp_path):
    torch.save(open_clip_model(True).state_dict(), tmp_path / 'oc.pt')
    cfg = dataclasses.replace(Config(), vision_width=128, vision_layers=2, vision_heads=2, patch_size=8, image_size=32,
                              text_width=128, text_layers=2, text_heads=2, embed_dim=24, init=str(tmp_path / 'oc.pt'))
    net = CLIPModel(cfg, 500)
    with pytest.raises(ConfigError, match=r'pass --vit_style=openai --vision_act=quickgelu$'):
        train.maybe_init_weights(net, cfg, None, True)
    cfg = dataclasses.replace(cfg, vit_style='openai', vision_act='quickgelu')
    net = CLIPModel(cfg, 500)
    train.maybe_init_weights(net, cfg, None, True)
    assert torch.equal(net.visual.ln_pre.weight, open_clip_model(True).visual.ln_pre.weight)


@needs_fixtures
@pytest.mark.parametrize('method', ['barlip', 'siamlip'])
def test_rocket_noncontrastive_heads_are_kept(method):
    """CLIP 🚀's BarLIP / SiamLIP heads, laid out as its models.py builds them (the '_local' names are the same
    modules saved again), load into this model's heads and compute the same function."""
    torch.manual_seed(0)
    v, t, h, p = 48, 32, 24, 16
    bn = torch.nn.BatchNorm1d
    if method == 'barlip':
        official = {f'barlip_{m}_projector_global': torch.nn.Sequential(
            torch.nn.Linear(d, h), bn(h), torch.nn.ReLU(), torch.nn.Linear(h, h), bn(h), torch.nn.ReLU(),
            torch.nn.Linear(h, p), bn(p)) for m, d in (('image', v), ('text', t))}
        ours = {'image': 'barlip_image', 'text': 'barlip_text'}
        changes = dict(barlip_hidden_dim=h, barlip_proj_dim=p)
    else:
        official = {f'siamlip_{m}_projector_global': torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(d, h, bias=False), bn(h), torch.nn.ReLU(), torch.nn.Linear(h, p, bias=False)),
            bn(p, affine=False)) for m, d in (('image', v), ('text', t))}
        official.update({name: torch.nn.Sequential(torch.nn.Linear(p, h, bias=False), bn(h), torch.nn.ReLU(),
                                                    torch.nn.Linear(h, p))
                         for name in ('image_text_predictor_global', 'text_image_predictor_global')})
        ours = {'image': 'siam_proj_image', 'text': 'siam_proj_text'}
        changes = dict(siamlip_hidden_dim=h, siamlip_proj_dim=p)
    for name, module in official.items():  # non-trivial BN statistics, then eval mode
        width = p if 'predictor' in name else v if 'image' in name else t
        module.train()(torch.randn(64, width) * 2 + 1)
        module.eval()
    ckpt = model_module.load_weights_file(FIXTURES / 'rocket_vit.pt')
    state = dict(ckpt['state_dict'])
    for name, module in official.items():
        for key, value in module.state_dict().items():
            state[f'module.{name}.{key}'] = value
            state[f"module.{name.replace('_global', '_local')}.{key}"] = value  # the shared '_local' alias
    imported = convert_weights({**ckpt, 'state_dict': state})
    assert sorted({k.split('.')[0] for k in imported['ignored']}) == sorted(n.replace('_global', '_local')
                                                                           for n in official)
    cfg = dataclasses.replace(Config(), **{**imported['arch'], **changes, 'method': method, 'vision_heads': 3,
                                           'text_heads': 2})
    net = CLIPModel(cfg, 1000).eval()
    extra = {k: v for k, v in net.state_dict().items() if k.startswith(model_module._EXTRA)}
    assert {k: v.shape for k, v in imported['extra'].items()} == {k: v.shape for k, v in extra.items()}
    net.load_state_dict(imported['extra'], strict=False)
    x = {'image': torch.randn(5, v), 'text': torch.randn(5, t)}
    with torch.no_grad():
        for m in ('image', 'text'):
            close(getattr(net, ours[m])(x[m]), official[f'{method}_{m}_projector_global'](x[m]))
        if method == 'siamlip':
            z = torch.randn(5, p)
            close(net.siam_pred_image(z), official['image_text_predictor_global'](z))
            close(net.siam_pred_text(z), official['text_image_predictor_global'](z))


@needs_fixtures
def test_rocket_without_separate_projectors_keeps_the_global_head_once():
    """Without --separate-proj CLIP 🚀's local head is the global one, saved a second time under l2l_*."""
    ckpt = model_module.load_weights_file(FIXTURES / 'rocket_vit.pt')
    state = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('module.l2l_')}
    state['module.l2l_image_projector.weight'] = state['module.image_projector.weight']
    state['module.l2l_text_projector.weight'] = state['module.text_projector.weight']
    imported = convert_weights({**ckpt, 'state_dict': state})
    assert imported['arch']['method'] == 'clip' and not any('.h.' in k for k in imported['state'])
    assert sorted(imported['ignored']) == ['l2l_image_projector.weight', 'l2l_text_projector.weight']
