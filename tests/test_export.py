"""evaluate.py --export: our checkpoints in open_clip's local-dir layout, loaded by open_clip (a test-only dependency)
with none of our code, give our embeddings and our zero-shot results."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
from augment import eval_transform
from config import MODELS, Config
from data import Tokenizer, checkpoint_merges
from model import FORMAT, CLIPModel, _rename, _timm_name

open_clip = pytest.importorskip('open_clip', reason='open_clip_torch (a test-only dependency) is not installed')
CLIP_BPE = Path(__file__).resolve().parents[2] / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
SMALL = dict(text_width=64, text_heads=2, text_layers=2, embed_dim=32, mlp_hidden_dim=32, context_length=32)
KINDS = {  # the towers open_clip can hold: its own ViT (both styles) and its timm tower (timm's ViT shapes, ResNet-50)
    'openai_vit': dict(vit_style='openai', vision_act='quickgelu', text_act='quickgelu', vision_width=64,
                       vision_layers=2, vision_heads=2, patch_size=8, image_size=32, local_crop_size=32),
    'timm_vit_own': dict(vision_act='gelu', text_act='gelu', vision_width=64, vision_layers=2, vision_heads=4,
                         patch_size=8, image_size=32, local_crop_size=32),
    'timm_vit_tower': dict(vision_width=192, vision_layers=12, vision_heads=3, patch_size=16, image_size=224,
                           local_crop_size=224),  # our default activations: GELU image, QuickGELU text
    'resnet50': dict(vision='resnet50', image_size=64, local_crop_size=64),
    'tiny': MODELS['tiny'],  # the quick start's model (python train.py): one activation, GELU, in both towers
}
TEXTS = ['a photo of a dog.', 'red square', 'Hello World!! zebra', 'a b c']


def checkpoint(tmp_path, name, bpe_path='', **arch):
    """A checkpoint as train.py writes it, of a model with every tensor redrawn (no identity blocks, no zero bias)."""
    cfg = dataclasses.replace(Config(), **{**SMALL, **arch}, bpe_path=str(bpe_path))
    merges = checkpoint_merges(cfg.bpe_path)
    torch.manual_seed(0)
    model = CLIPModel(cfg, Tokenizer(merges).vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.3) + (p.dim() == 1))
        for key, b in model.named_buffers():
            if key.endswith(('running_mean', 'running_var')):
                b.copy_(torch.rand_like(b) + 0.5 if key.endswith('var') else 0.1 * torch.randn_like(b))
    path = tmp_path / f'{name}.pt'
    torch.save({'format': FORMAT, 'config': cfg.to_dict(), 'model': model.state_dict(), 'epoch': 1,
                'bpe_merges': merges}, path)
    return path, cfg, model, Tokenizer(merges, cfg.context_length)


def export(path, out, capsys):
    capsys.readouterr()
    evaluate.main(['--export', str(path), '--out', str(out)])
    return capsys.readouterr().out


@pytest.mark.parametrize('kind', KINDS)
def test_open_clip_loads_the_export_with_our_embeddings(tmp_path, capsys, kind):
    bpe = CLIP_BPE if kind == 'openai_vit' else ''  # CLIP's vocabulary is open_clip's default; others travel
    path, cfg, ours, tokenizer = checkpoint(tmp_path, kind, bpe, **KINDS[kind])
    line = export(path, tmp_path / 'oc', capsys)
    assert 'not exported, open_clip\'s CLIP has no place for them: image_heads.h, l2l_logit_scale, text_heads.h' in line
    assert ('bpe_merges.txt.gz' in line) == (bpe == '')
    theirs, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{tmp_path / "oc"}')
    theirs.eval()
    their_tokenizer = open_clip.get_tokenizer(f'local-dir:{tmp_path / "oc"}')
    assert torch.equal(their_tokenizer(TEXTS), tokenizer(TEXTS))
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mine, other in ((ours.encode_image(images), theirs.encode_image(images)),
                            (ours.encode_text(tokenizer(TEXTS)), theirs.encode_text(tokenizer(TEXTS)))):
            torch.testing.assert_close(other, mine, rtol=0, atol=1e-5 * max(1.0, mine.abs().max().item()))
        assert torch.allclose(theirs.logit_scale, ours.logit_scale)
    config = json.loads((tmp_path / 'oc' / 'open_clip_config.json').read_text())['preprocess_cfg']
    assert (config['size'], config['mean'], config['std']) == (cfg.image_size, cfg.image_mean, cfg.image_std)
    assert preprocess.transforms[-1].mean == cfg.image_mean


def test_timm_names_are_the_import_renames_run_backwards():
    """One table both ways: every exported timm ViT name imports back to the key it came from."""
    keys = CLIPModel(dataclasses.replace(Config(), vision_layers=1), 600).state_dict()
    visual = [k for k in keys if k.startswith('visual.')]
    assert all(_rename(_timm_name(k)) == k for k in visual)
    assert {_timm_name(k) for k in visual} >= {'visual.cls_token', 'visual.pos_embed', 'visual.blocks.0.attn.qkv.weight',
                                               'visual.blocks.0.mlp.fc2.bias', 'visual.norm.weight'}


def test_zero_shot_through_open_clip_equals_ours(tmp_path, capsys):
    """The same images, our preprocessing, open_clip's model and tokenizer: the same predictions as evaluate.py."""
    path, cfg, ours, tokenizer = checkpoint(tmp_path, 'openai_vit', CLIP_BPE, **KINDS['openai_vit'])
    export(path, tmp_path / 'oc', capsys)
    theirs = open_clip.create_model_and_transforms(f'local-dir:{tmp_path / "oc"}')[0].eval()
    their_tokenizer = open_clip.get_tokenizer(f'local-dir:{tmp_path / "oc"}')
    g = torch.Generator().manual_seed(3)
    files, labels = [], []
    for i in range(24):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        files.append(tmp_path / f'{i}.png')
        Image.fromarray(pixels).save(files[-1])
        labels.append(i % 4)
    classnames, templates = ['cat', 'dog', 'red car', 'tree'], ['a photo of a {}.', 'a {}.']
    transform = eval_transform(cfg)
    dataset = evaluate.ImageList([str(f) for f in files], labels, transform)
    cfg.workers, cfg.eval_batch_size = 0, 8
    mine = evaluate.zero_shot(ours, tokenizer, cfg, dataset, classnames, templates, 'acc')
    with torch.no_grad():  # open_clip's zero-shot recipe: normalised prompt embeddings, averaged, renormalised
        classes = torch.stack([torch.nn.functional.normalize(torch.nn.functional.normalize(
            theirs.encode_text(their_tokenizer([t.format(c) for t in templates])), dim=-1).mean(0), dim=0)
            for c in classnames])
        logits = theirs.encode_image(torch.stack([transform(Image.open(f)) for f in files]), normalize=True) @ classes.T
    top1 = 100 * (logits.argmax(1) == torch.tensor(labels)).double().mean().item()
    assert mine['acc1_z'] == top1 and mine['images'] == 24
    assert 0 < top1 < 100  # a random model: an equality that could have failed either way


def test_what_open_clip_cannot_hold_is_one_line(tmp_path, capsys):
    mixed = dict(KINDS['openai_vit'], vision_act='gelu')  # open_clip's own ViT takes the text tower's activation
    path = checkpoint(tmp_path, 'mixed', **mixed)[0]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(['--export', str(path), '--out', str(tmp_path / 'oc')])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count('\n') == 1
    assert re.match(r"error: .*open_clip cannot represent this model exactly \(--vision_act=gelu with "
                    r"--text_act=quickgelu", err), err
    assert not (tmp_path / 'oc').exists() and not (tmp_path / 'oc.tmp').exists()
    (tmp_path / 'taken').mkdir()
    for argv, code, message in ((['--export', str(path), '--out', str(tmp_path / 'taken')], 1, 'already exists'),
                                (['--export', str(path)], 2, 'usage: python evaluate.py --export')):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        assert exit_info.value.code == code and message in capsys.readouterr().err
