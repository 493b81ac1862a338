"""bench.peer: open_clip's trainer and ours train on one export from one description, one evaluator scores both."""
import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import peer  # noqa: E402

pytest.importorskip('open_clip_train')
CLIP_BPE = ROOT.parent / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
DATA = dict(demo=True, csv='t.tsv', image_key='filepath', caption_key='title', root='', rows=12000, tsv='t.tsv',
            bpe=str(CLIP_BPE), bpe_gz=str(CLIP_BPE), vocab_size=49408, datasets=['demo'], retrieval='', data_root='',
            key='k')


def test_one_description_builds_both_sides():
    """The same widths, depths, heads, context and recipe reach open_clip's config and flags and our flags."""
    spec = peer.SPEC
    oc = peer.openclip_model_config(spec, DATA)
    assert oc['vision_cfg']['width'] // oc['vision_cfg']['head_width'] == spec['vision_heads']
    assert oc['text_cfg']['heads'] == spec['text_heads'] and oc['text_cfg']['context_length'] == spec['context_length']
    theirs = peer.openclip_argv(spec, 't.tsv', 'logs', 3)
    assert theirs[theirs.index('--warmup') + 1] == '56' and theirs[theirs.index('--seed') + 1] == '3'
    import config
    cfg = config.resolve(config._split_flags(peer.ours_argv(spec, DATA, 'out', 3)), verbose=False)
    steps = DATA['rows'] // spec['batch_size']
    assert int(cfg.warmup_epochs * steps) == spec['warmup_steps']
    assert (cfg.method, cfg.vit_style, cfg.image_size, cfg.local_crop_size, cfg.context_length, cfg.seed) == \
        ('clip', 'openai', 64, 64, 32, 3)


@pytest.mark.parametrize('scale', [None, 0.6])  # 0.6: neither side's own default, so both must read the spec
def test_one_training_crop_reaches_both_sides(scale):
    """open_clip's train transform and our weak view crop the same area range, bicubic, ratio 3/4-4/3; by default
    the demo recipe's range."""
    import config
    from augment import ImageViews
    from open_clip.transform import image_transform
    from open_clip_train.params import parse_args
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    spec = peer.SPEC if scale is None else dict(peer.SPEC, weak_min_scale=scale)
    want = (config.RECIPES['demo']['weak_min_scale'] if scale is None else scale, 1.0)
    theirs = parse_args(peer.openclip_argv(spec, 't.tsv', 'logs', 0))
    crop = image_transform(spec['image_size'], is_train=True, aug_cfg=theirs.aug_cfg).transforms[0]
    assert isinstance(crop, RandomResizedCrop) and crop.interpolation == InterpolationMode.BICUBIC
    assert tuple(crop.scale) == want and tuple(crop.ratio) == (3 / 4, 4 / 3)
    cfg = config.resolve(config._split_flags(peer.ours_argv(spec, DATA, 'out', 0)), verbose=False)
    assert ImageViews(cfg).weak['scale'] == want


def test_both_sides_train_and_one_evaluator_scores_them(tmp_path):
    """A few steps of each side in its own process: checkpoints evaluated by ours, every figure parsed."""
    proc = subprocess.run([sys.executable, '-m', 'bench.peer', f'--cache={tmp_path}', '--train_size=128',
                           '--val_size=20', '--batch_size=32', '--warmup_steps=1', '--seeds=0',
                           '--rows=open_clip,ours+old_vit_init'],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]
    assert [r['row'] for r in runs] == ['open_clip', 'ours+old_vit_init']  # ours, with a patch in its process
    for r in runs:
        assert r['steps'] == 4 and r['parameters'] == runs[0]['parameters']
        assert 0 < r['loss'] < 10 and r['samples_per_s'] > 0 and r['peak_mb'] > 0
        assert r['tasks'] == ['shape', 'colour', 'colour_shape_unseen']
        assert all(0 <= r[k] <= 100 for k in (*r['tasks'], *peer.RECALLS))
    assert 'mean ± half range' in proc.stdout and 'open_clip (n=1)' in proc.stdout
    again = subprocess.run([sys.executable, '-m', 'bench.peer', f'--cache={tmp_path}', '--train_size=128',
                            '--val_size=20', '--batch_size=32', '--warmup_steps=1', '--seeds=0',
                            '--rows=ours+old_vit_init'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and 'ours+old_vit_init seed 0:' not in again.stdout  # reused, not rerun


def user_data(tmp_path, bad_rows=True):
    """A user's comma-separated CSV with its own column names, relative paths, captions holding commas, quotes and a
    newline (and with bad_rows, a row whose image is missing and one without a caption); plain-text merges; a folder
    set and a retrieval CSV. Returns (the good rows' captions, the parsed bench.peer arguments)."""
    from PIL import Image
    (tmp_path / 'imgs').mkdir()
    captions = ['a red square', 'two cats, "sleeping"', 'line one\nline two', 'a tab\there', 'café au lait',
                'a blue circle']
    modes = ['RGB', 'RGBA', 'P', 'LA', 'L', 'RGB']
    for i, mode in enumerate(modes):
        Image.new(mode, (40 + i, 30)).save(tmp_path / 'imgs' / f'{i}.png')
    import csv
    with open(tmp_path / 'pairs.csv', 'w', newline='') as f:
        out = csv.writer(f)
        out.writerow(['image', 'text'])
        out.writerows([(f'imgs/{i}.png', c) for i, c in enumerate(captions)])
        out.writerows([('imgs/missing.png', 'no image'), ('imgs/0.png', '')] if bad_rows else [])
    merges = tmp_path / 'merges.txt'
    merges.write_bytes(gzip.decompress(CLIP_BPE.read_bytes()))
    for name in ('a', 'b'):
        (tmp_path / 'heldout' / name).mkdir(parents=True)
        Image.new('RGB', (32, 32), name == 'a' and 'red' or 'blue').save(tmp_path / 'heldout' / name / 'x.png')
    (tmp_path / 'retrieval.csv').write_text('image,caption\nimgs/0.png,a red square\nimgs/5.png,a blue circle\n')
    args = argparse.Namespace(csv=str(tmp_path / 'pairs.csv'), csv_image_key='image', csv_caption_key='text', root='',
                              bpe_path=str(merges), eval_datasets=f"folder:{tmp_path / 'heldout'}",
                              retrieval=str(tmp_path / 'retrieval.csv'), data_root='')
    return captions, args


def test_a_users_csv_and_merges_reach_both_sides_alike(tmp_path):
    """open_clip's own CsvDataset reads the rows our reader took from the user's CSV (absolute paths, captions
    verbatim; the rows it would fail on left out) and, converted as it converts them, our decode of their images
    (transparent ones flattened onto white, not black); its tokenizer reads the user's merges and tokenises as ours,
    and our flags read the user's file itself."""
    import numpy as np
    import config
    import open_clip
    from augment import to_rgb
    from data import Tokenizer, load_image
    from open_clip_train.data import CsvDataset
    from PIL import Image
    captions, args = user_data(tmp_path)
    data = peer.prepare_data(args, peer.SPEC, tmp_path / 'cache')
    assert data['rows'] == 8 and not data['demo'] and data['datasets'] == [args.eval_datasets]
    theirs = CsvDataset(data['tsv'], None, 'filepath', 'title', sep='\t', tokenizer=None)
    assert theirs.captions == captions and len(theirs.images) == 6
    for i, path in enumerate(theirs.images):  # open_clip's convert('RGB') of what it reads is our decode
        ours = to_rgb(load_image(tmp_path / 'imgs' / f'{i}.png'))
        assert np.array_equal(np.asarray(Image.open(path).convert('RGB')), np.asarray(ours))
        assert (path == str(tmp_path / 'imgs' / f'{i}.png')) == (i not in (1, 3))  # RGBA and LA: a flattened copy
    assert gzip.decompress(Path(data['bpe_gz']).read_bytes()) == Path(args.bpe_path).read_bytes()
    (tmp_path / 'oc').mkdir()
    (tmp_path / 'oc' / 'peer.json').write_text(json.dumps(peer.openclip_model_config(peer.SPEC, data)))
    open_clip.add_model_config(tmp_path / 'oc')
    texts = [*captions, 'word ' * 40]
    assert open_clip.get_tokenizer('peer')(texts).tolist() == \
        Tokenizer(args.bpe_path, peer.SPEC['context_length'])(texts).tolist()
    cfg = config.resolve(config._split_flags(peer.ours_argv(dict(peer.SPEC, batch_size=4), data, 'out', 0)),
                         verbose=False)
    assert (cfg.metadata, cfg.csv_image_key, cfg.csv_caption_key, cfg.bpe_path) == \
        (args.csv, 'image', 'text', args.bpe_path)
    again = peer.prepare_data(args, peer.SPEC, tmp_path / 'cache')
    (tmp_path / 'retrieval.csv').write_text('image,caption\nimgs/0.png,a red square\n')
    assert again['key'] == data['key'] != peer.prepare_data(args, peer.SPEC, tmp_path / 'cache')['key']


def test_missing_evaluation_set_is_refused_before_training(tmp_path):
    _, args = user_data(tmp_path)
    proc = subprocess.run([sys.executable, '-m', 'bench.peer', f'--cache={tmp_path / "cache"}', f'--csv={args.csv}',
                           '--csv_image_key=image', '--csv_caption_key=text', '--batch_size=4',
                           f'--eval_datasets=folder:{tmp_path / "nowhere"}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and proc.stderr.startswith('error: ') and 'nowhere' in proc.stderr
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'cache' / 'runs').exists()


def square_images(tmp_path, n=4, size=64):
    """A TSV of n distinct noise images of size x size px with one caption each, as bench.peer's --csv."""
    import numpy as np
    from PIL import Image
    (tmp_path / 'imgs').mkdir()
    rows = ['filepath\ttitle']
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / 'imgs' / f'{i}.png')
        rows.append(f'imgs/{i}.png\tnoise number {i}')
    (tmp_path / 'train.tsv').write_text('\n'.join(rows) + '\n')
    return argparse.Namespace(csv=str(tmp_path / 'train.tsv'), csv_image_key='filepath', csv_caption_key='title',
                              root='', bpe_path=str(CLIP_BPE), eval_datasets='', retrieval='', data_root='')


def patched(monkeypatch, name, *targets):
    """Apply PATCHES[name], undone after the test: each (object, attribute) it replaces is registered first."""
    for obj, attr in targets:
        monkeypatch.setattr(obj, attr, getattr(obj, attr))
    peer.PATCHES[name]()


def test_every_patch_changes_what_it_names(tmp_path, monkeypatch):
    """Each ablation patch still reaches the code it replaces and does what its docstring says, checked against
    PIL, open_clip's own transform and the inits' closed-form statistics."""
    import numpy as np
    import torch
    import augment
    import config
    import model
    import train
    from augment import ImageViews, finish_views
    from data import Tokenizer
    from open_clip.transform import image_transform
    from PIL import Image
    assert set(peer.PATCHES) == {'old_vit_init', 'openclip_vit_init', 'decay_class_token', 'openclip_decay',
                                 'pil_resize', 'openclip_data'}
    spec = dict(peer.SPEC, batch_size=4, weak_min_scale=1.0)  # a full-area crop of a square image is the image
    data = peer.prepare_data(square_images(tmp_path), spec, tmp_path / 'cache')
    cfg = config.resolve(config._split_flags([*peer.ours_argv(spec, data, tmp_path / 'out', 0), *peer.OPENAI_NORM]),
                         verbose=False)

    def vit(style):
        return model.VisionTransformer(64, 16, 128, 2, 4, style=style)
    patched(monkeypatch, 'old_vit_init', (model.VisionTransformer, '__init__'))
    v = vit('openai')
    assert v.class_embedding.abs().max() < 1e-5 and v.transformer.resblocks[0].mlp.c_fc.bias.abs().max() == 0
    monkeypatch.undo()
    patched(monkeypatch, 'openclip_vit_init', (model.VisionTransformer, '__init__'))
    v = vit('timm')
    assert v.positional_embedding.std().item() == pytest.approx(128 ** -0.5, rel=0.1)
    assert v.transformer.resblocks[0].mlp.c_fc.bias.abs().max() > 0  # PyTorch's default, not timm's zeros

    def decayed(groups):
        return {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    openai = vit('openai')
    assert id(openai.class_embedding) not in decayed(train.param_groups(openai, 0.1))
    patched(monkeypatch, 'decay_class_token', (train, 'param_groups'))
    assert id(openai.class_embedding) in decayed(train.param_groups(openai, 0.1))
    patched(monkeypatch, 'openclip_decay', (train, 'param_groups'))
    timm = vit('timm')
    assert id(timm.class_embedding) not in decayed(train.param_groups(timm, 0.1))
    assert id(timm.positional_embedding) in decayed(train.param_groups(timm, 0.1))

    patched(monkeypatch, 'pil_resize', (augment.ImageViews, 'draw'))
    noise = Image.open(tmp_path / 'imgs' / '0.png').resize((128, 128))
    weak, strong, _ = ImageViews(cfg).draw(noise)
    assert strong == [] and torch.equal(weak, torch.from_numpy(np.array(noise.resize((64, 64), Image.BICUBIC)))
                                        .permute(2, 0, 1))
    drawing = Image.new('RGBA', (128, 128), (0, 0, 0, 0))  # transparent black left, opaque red right
    drawing.paste((255, 0, 0, 255), (64, 0, 128, 128))
    weak = ImageViews(cfg).draw(drawing)[0]
    assert (weak[:, :, :24] == 255).all() and (weak[:, :, -24:] == torch.tensor([255, 0, 0])[:, None, None]).all()

    patched(monkeypatch, 'openclip_data', (train, 'build_train_loader'))
    batch = next(iter(train.build_train_loader(cfg, Tokenizer(data['bpe'], cfg.context_length))))
    assert batch['weak'].dtype == torch.uint8 and batch['tokens'].shape[:2] == (4, 1)
    weak, _ = finish_views(batch, cfg, 'cpu')  # (4, 3, 64, 64) normalised by the step
    theirs = image_transform(64, is_train=True, mean=cfg.image_mean, std=cfg.image_std, aug_cfg={'scale': (1.0, 1.0)})
    want = torch.stack([theirs(Image.open(tmp_path / 'imgs' / f'{i}.png')) for i in range(4)])  # (4, 3, 64, 64)
    order = [int((want - w).abs().flatten(1).amax(1).argmin()) for w in weak]  # RandomSampler's order
    assert sorted(order) == [0, 1, 2, 3] and torch.allclose(weak, want[order], atol=1e-5)
    captions = Tokenizer(data['bpe'], cfg.context_length)([f'noise number {i}' for i in order])
    assert torch.equal(batch['tokens'][:, 0], captions[:, :batch['tokens'].shape[-1]])


@pytest.mark.slow
def test_both_sides_train_on_a_users_csv_and_are_scored_on_its_sets(tmp_path):
    """The user's CSV, merges, folder set and retrieval CSV end to end: a step of each side, both scored."""
    _, args = user_data(tmp_path, bad_rows=False)
    proc = subprocess.run([sys.executable, '-m', 'bench.peer', f'--cache={tmp_path / "cache"}', f'--csv={args.csv}',
                           '--csv_image_key=image', '--csv_caption_key=text', f'--bpe_path={args.bpe_path}',
                           f'--eval_datasets={args.eval_datasets}', f'--retrieval={args.retrieval}',
                           '--batch_size=4', '--warmup_steps=1', '--seeds=0', '--rows=open_clip,ours'],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / 'cache' / 'results.jsonl').read_text().splitlines()]
    assert [r['row'] for r in runs] == ['open_clip', 'ours']
    for r in runs:
        assert r['tasks'] == ['heldout'] and 0 <= r['heldout'] <= 100 and 0 < r['val_loss'] < 10
        assert all(0 <= r[k] <= 100 for k in peer.RECALLS) and r['steps'] >= 1
    assert 'heldout' in proc.stdout and 'i2t@5' in proc.stdout


@pytest.mark.slow
def test_both_trainers_take_the_same_steps_from_the_same_weights(tmp_path):
    """From one set of starting weights, on a data set that is one batch of 64-px images (each step sees every
    pair; a full-area crop of a 64-px image is the image itself), open_clip's trainer and ours with open_clip's
    schedule ends and image statistics log the same losses and end at the same weights: AdamW and its groups, the
    schedule, the loss and the logit-scale clamp compute the same thing on both sides."""
    import torch
    import open_clip
    from PIL import Image, ImageDraw
    from model import convert_weights
    (tmp_path / 'imgs').mkdir()
    rows = ['filepath\ttitle']
    for i in range(16):
        img = Image.new('RGB', (64, 64), (20 * i, 255 - 15 * i, 128))
        ImageDraw.Draw(img).ellipse((4 * (i % 4), 3 * (i // 4), 40 + i, 30 + 2 * i), fill=(255, 16 * i, 0))
        img.save(tmp_path / 'imgs' / f'{i}.png')
        rows.append(f"{tmp_path / 'imgs' / f'{i}.png'}\tan orange ball number {i} on a {'pale' if i % 2 else 'dark'} "
                    f"ground")
    (tmp_path / 'train.tsv').write_text('\n'.join(rows) + '\n')
    spec = dict(peer.SPEC, batch_size=16, epochs=6, warmup_steps=2, lr=1e-3, weak_min_scale=1.0)
    args = argparse.Namespace(csv=str(tmp_path / 'train.tsv'), csv_image_key='filepath', csv_caption_key='title',
                              root='', bpe_path=str(CLIP_BPE), eval_datasets='', retrieval='', data_root='')
    data = peer.prepare_data(args, spec, tmp_path / 'cache')
    (tmp_path / 'oc').mkdir()
    (tmp_path / 'oc' / 'peer.json').write_text(json.dumps(peer.openclip_model_config(spec, data)))
    open_clip.add_model_config(tmp_path / 'oc')
    torch.manual_seed(0)
    init = tmp_path / 'init.pt'
    torch.save(open_clip.create_model('peer').state_dict(), init)
    theirs = peer.run_child(['--child=open_clip', f"--config={tmp_path / 'oc'}", '--',
                             *peer.openclip_argv(spec, data['tsv'], tmp_path / 'logs', 0), '--pretrained', str(init)],
                            tmp_path / 'open_clip.log', 1200)
    like_openclip = [*peer.OPENAI_NORM, '--lr_end=0', f"--lr_start={spec['lr'] / spec['warmup_steps']}",
                     f'--init={init}']
    peer.run_child(['--child=ours', '--', *peer.ours_argv(spec, data, tmp_path / 'out', 0), *like_openclip],
                   tmp_path / 'ours.log', 1200)
    their_losses = [float(x) for x in peer.re.findall(r'Contrastive_loss: ([\d.]+)', theirs)]
    our_losses = [json.loads(line)['loss'] for line in (tmp_path / 'out' / 'log.jsonl').read_text().splitlines()
                  if '"train"' in line]
    assert len(our_losses) == len(their_losses) == 6 and their_losses[-1] < their_losses[0] - 0.1
    assert our_losses == pytest.approx(their_losses, abs=2e-4)
    their_weights = convert_weights(torch.load(tmp_path / 'logs' / 'run' / 'checkpoints' / 'epoch_6.pt',
                                               weights_only=True)['state_dict'])['state']
    ours = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)['model']
    start = convert_weights(torch.load(init, weights_only=True))['state']
    for name, w in ours.items():
        theirs_w, start_w = their_weights[name], start[name]
        if name.endswith('attn.in_proj.bias'):  # drop its key third: a key bias shifts every logit of a query alike,
            keep = torch.ones_like(w, dtype=torch.bool)  # so its true gradient is 0 and Adam steps on float noise
            keep[w.shape[0] // 3:2 * w.shape[0] // 3] = False
            w, theirs_w, start_w = w[keep], theirs_w[keep], start_w[keep]
        assert (w - theirs_w).norm() <= 1e-3 * (theirs_w - start_w).norm() + 1e-7, name
