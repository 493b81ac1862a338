"""What real image-caption data brings that the demo does not: transparent drawings (composited onto a constant
background in training and evaluation), runs of unreadable files (counted once each, named in the output dir),
and oversized images that the pixel budget, not PIL's warning, decides about."""
import io
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import config
import data
import train
from augment import ImageViews, eval_transform, to_rgb
from config import Config

CFG = Config(image_size=32, local_crop_size=24, strong_min_scale=0.25)


# --- Transparency ---
def drawing(size=(90, 70)):
    """Dark anti-aliased line art on a transparent canvas that hides the same dark colour, as clip-art PNGs hide
    black: alpha 0 outside the strokes, 255 on them and every level in between along their edges."""
    big = Image.new('L', (size[0] * 4, size[1] * 4), 0)
    pen = ImageDraw.Draw(big)
    pen.ellipse((20, 30, 300, 250), outline=255, width=9)
    pen.line((0, 270, 350, 10), fill=255, width=7)
    alpha = np.asarray(big.resize(size, Image.LANCZOS))  # downsampling makes the partial alpha of the edges
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 40, alpha  # a dark green stroke; the transparent pixels hide (0, 40, 0)
    return Image.fromarray(rgba, 'RGBA')


def flattened(img, background=(255, 255, 255)):
    """The RGBA image composited onto background by the formula, in integers: round((c a + b (255 - a)) / 255)."""
    x = np.asarray(img, np.int64)
    a = x[..., 3:]
    return Image.fromarray(((x[..., :3] * a + np.array(background) * (255 - a) + 127) // 255).astype(np.uint8))


def same(a, b):
    """Nested tuples/lists/dicts of tensors equal to the bit."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(map(same, a, b))


def views_of(img, cfg=CFG, seed=0):
    """The worker's views (--augment_device=cpu) and the worker's share of --augment_device=cuda's, seeded alike."""
    views = ImageViews(cfg)
    return views(img, torch.Generator().manual_seed(seed)), views.draw_for_step(img, torch.Generator().manual_seed(seed))


def png(img):
    """img saved as a PNG and opened as the loaders open a file (data.open_image)."""
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    return data.open_image(buf.getvalue())


def test_a_transparent_drawing_trains_and_evaluates_as_on_white():
    img = drawing()
    alpha = np.asarray(img)[..., 3]
    assert 0 < (alpha == 0).mean() < 1 and ((alpha > 0) & (alpha < 255)).any()  # strokes, blank and edges
    white = flattened(img)
    for cfg in (CFG, Config(image_size=64, local_crop_size=32, num_augs=3)):
        for seed in (0, 1):
            assert same(views_of(png(img), cfg, seed), views_of(png(white), cfg, seed))
        assert torch.equal(eval_transform(cfg)(png(img)), eval_transform(cfg)(png(white)))
    # what the views showed before: the hidden colour, where the stroke is black on black
    assert not np.array_equal(np.asarray(img.convert('RGB')), np.asarray(white))


def test_alpha_background_flag_picks_the_colour():
    img, grey = drawing(), (128, 90, 200)
    cfg = Config(image_size=32, local_crop_size=24, alpha_background=list(grey))
    assert same(views_of(png(img), cfg), views_of(png(flattened(img, grey)), cfg))
    assert torch.equal(eval_transform(cfg)(img), eval_transform(cfg)(flattened(img, grey)))
    assert not torch.equal(eval_transform(cfg)(img), eval_transform(CFG)(img))
    assert 'background=(128, 90, 200)' in repr(eval_transform(cfg))  # the probe's feature cache tells them apart


def test_palette_transparency_trains_as_on_white():
    """A palette PNG whose index 0 is marked transparent (tRNS), and the same palette with that entry white."""
    paletted = flattened(drawing(), (250, 240, 200)).quantize(8, dither=Image.Dither.NONE)
    index = np.asarray(paletted)
    hidden = int(np.bincount(index.ravel()).argmax())  # the background's index
    assert 0.5 < (index == hidden).mean() < 1 and len(np.unique(index)) > 2
    paletted.info['transparency'] = hidden
    opened = png(paletted)
    assert opened.mode == 'P' and 'transparency' in opened.info
    palette = np.array(paletted.getpalette()[:3 * 8]).reshape(-1, 3)
    palette[hidden] = 255
    white = Image.fromarray(palette[index].astype(np.uint8))
    assert same(views_of(opened), views_of(png(white)))
    assert torch.equal(eval_transform(CFG)(opened), eval_transform(CFG)(white))


@pytest.mark.parametrize('mode', ['LA', 'PA', 'RGB_key', 'L_key', 'I;16_key'])
def test_every_way_of_being_transparent_is_composited(mode):
    """Grey + alpha, palette + alpha, and a transparent colour key on RGB, 8-bit and 16-bit grey (PNG's tRNS)."""
    rng = np.random.default_rng(0)
    level, alpha = rng.integers(0, 256, (12, 10), dtype=np.uint8), rng.integers(0, 256, (12, 10), dtype=np.uint8)
    alpha[:3] = 0
    if mode in ('LA', 'PA'):
        img = Image.fromarray(level).convert('L' if mode == 'LA' else 'P')  # a grey palette
        img.putalpha(Image.fromarray(alpha))
        expected = flattened(Image.fromarray(np.stack([level] * 3 + [alpha], -1), 'RGBA'))
    else:
        key = alpha == 0
        if mode == 'I;16_key':
            img = Image.fromarray(level.astype(np.uint16) * 257)  # mode I;16, every level a multiple of 257
            img.info['transparency'] = int(level[0, 0]) * 257
            key = level == level[0, 0]
        elif mode == 'L_key':
            img, key = Image.fromarray(level), level == level[0, 0]
            img.info['transparency'] = int(level[0, 0])
        else:
            rgb = np.stack([level, 255 - level, level // 2], -1)
            img, key = Image.fromarray(rgb), (rgb == rgb[0, 0]).all(-1)
            img.info['transparency'] = tuple(int(v) for v in rgb[0, 0])
        colours = np.asarray(img.convert('RGB') if mode == 'RGB_key' else Image.fromarray(level).convert('RGB'))
        expected = Image.fromarray(np.where(key[..., None], 255, colours).astype(np.uint8))
    assert img.mode == mode.removesuffix('_key')
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(expected))
    if mode != 'PA':  # PNG stores a palette's alpha as tRNS: PIL reads it back as P with transparency
        assert np.array_equal(np.asarray(to_rgb(png(img))), np.asarray(expected))


# --- Unreadable samples ---
class CountingReader:
    """A reader of n rows whose rows in `bad` do not exist; counts every load."""

    def __init__(self, n, bad):
        self.n, self.bad, self.loads = n, set(bad), 0

    def __len__(self):
        return self.n

    def load(self, i):
        self.loads += 1
        if i in self.bad:
            raise FileNotFoundError(2, 'No such file or directory', f'{i}.png')
        return Image.new('RGB', (8, 8)), (f'row {i}',)

    def name(self, i):
        return f'{i}.png'


def rows_of(dataset, keys):
    """{key: (the row that made the sample, skipped, [where, why] pairs)} with a sample maker that records its row."""
    def make(image, captions, epoch, index, skipped):
        return {'row': int(captions[0].split()[1]), 'skipped': skipped}
    dataset.make_sample = make
    return {k: (s['row'], s['skipped'], json.loads(s['skipped_files'])) for k in keys for s in [dataset[k]]}


def test_a_run_of_bad_rows_costs_linear_reads_and_counts_each_once():
    """48 rows, the last 16 missing: each missing row is counted and named once, and its replacement costs a few
    reads (a third of the draws fail), not the 16 + 15 + ... + 1 = 136 failed reads of replacing it by the next."""
    reader = CountingReader(48, range(32, 48))
    dataset = data.TrainDataset(reader, None, seed=7)
    out = rows_of(dataset, [(0, i) for i in range(48)])
    assert sum(skipped for _, skipped, _ in out.values()) == 16
    assert sorted(w for _, _, names in out.values() for w, _ in names) == sorted(f'{i}.png' for i in range(32, 48))
    assert all(why.startswith('FileNotFoundError: ') for _, _, names in out.values() for _, why in names)
    assert all(row < 32 for row, _, _ in out.values())  # every sample is a readable row
    assert 48 + 16 < reader.loads <= 48 + 3 * 16  # expected 48 + 16 x 1.5
    # the replacements hang on (seed, epoch, index, attempt) alone: any order, any worker, a resumed run agree
    again = rows_of(data.TrainDataset(CountingReader(48, range(32, 48)), None, seed=7),
                    [(0, i) for i in reversed(range(48))])
    assert again == out
    other = rows_of(data.TrainDataset(CountingReader(48, range(32, 48)), None, seed=7), [(1, i) for i in range(48)])
    assert [other[(1, i)][0] for i in range(32, 48)] != [out[(0, i)][0] for i in range(32, 48)]  # a new epoch draws anew


ROOT = Path(__file__).resolve().parents[1]
TINY = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=32',
        '--local_crop_size=32', '--embed_dim=16', '--mlp_hidden_dim=32', '--batch_size=8', '--eval_every=0',
        '--method=clip', f'--bpe_path={ROOT / "assets/demo_bpe.txt.gz"}', '--dataset=csv']


def last_rows_missing(tmp_path, n=48, missing=16):
    """A CSV of n drawings whose last `missing` files are not there (a folder that did not copy)."""
    (tmp_path / 'img').mkdir()
    for i in range(n - missing):
        Image.new('RGB', (40, 40), (5 * i, 100, 50)).save(tmp_path / 'img' / f'{i}.png')
    (tmp_path / 'pairs.csv').write_text('filepath,title\n' + ''.join(f'img/{i}.png,shape {i % 5}\n' for i in range(n)))
    return [f'--metadata={tmp_path / "pairs.csv"}']


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_missing_rows_with_a_loader_worker_are_counted_named_and_judged_once_each(tmp_path, capsys):
    flags = [*TINY, *last_rows_missing(tmp_path), '--workers=1', '--epochs=1', '--log_every=2']
    train.main([*flags, f'--output_dir={tmp_path / "ok"}', '--bad_sample_threshold=0.5'])
    out = capsys.readouterr().out
    epoch = [r for r in jsonl(tmp_path / 'ok' / 'log.jsonl') if r['type'] == 'epoch']
    assert epoch[0]['skipped'] == 16  # a third of the rows: under 50%, training goes on
    skipped = jsonl(tmp_path / 'ok' / 'skipped.jsonl')
    assert sorted(r['sample'] for r in skipped) == sorted(str(tmp_path / 'img' / f'{i}.png') for i in range(32, 48))
    assert all(r['reason'].startswith('FileNotFoundError') and r['step'] in (2, 4, 6) for r in skipped)
    steps = [r for r in jsonl(tmp_path / 'ok' / 'log.jsonl') if r['type'] == 'train']
    assert [r.get('skipped_files', []) for r in steps] == [[s['sample'] for s in skipped if s['step'] == r['step']][:5]
                                                           for r in steps]
    shown = [line for line in out.splitlines() if 'unreadable sample(s) skipped' in line]
    assert len(shown) == sum(r['skipped'] > 0 for r in steps) and 'skipped.jsonl' in shown[0]
    assert f"{skipped[0]['sample']} (FileNotFoundError" in out

    with pytest.raises(config.UserError, match=r'^16 of 48 samples read this epoch \(33\.33%\) were unreadable'):
        train.main([*flags, f'--output_dir={tmp_path / "stop"}', '--bad_sample_threshold=0.3'])


@pytest.mark.slow
def test_two_ranks_name_each_skipped_sample_once(tmp_path):
    """Under torchrun (2 gloo ranks, a loader worker each) the ranks' unreadable samples reach rank 0's skipped.jsonl,
    each once, and the epoch's count is theirs."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone', 'train.py', *TINY,
           *last_rows_missing(tmp_path), '--batch_size=4', '--workers=1', '--epochs=1', '--log_every=2',
           '--bad_sample_threshold=0.5', f'--output_dir={tmp_path / "run"}']
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output=True, text=True,
                       timeout=600)  # a hang guard, far above the minute it takes
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = jsonl(tmp_path / 'run' / 'skipped.jsonl')
    assert sorted(s['sample'] for s in skipped) == sorted(str(tmp_path / 'img' / f'{i}.png') for i in range(32, 48))
    assert [e['skipped'] for e in jsonl(tmp_path / 'run' / 'log.jsonl') if e['type'] == 'epoch'] == [16]


def test_a_resumed_run_names_each_skipped_sample_once(tmp_path):
    """Stopped mid-epoch (the list written with the checkpoint, a line past it from a killed run's last interval) and
    resumed: skipped.jsonl names what an uninterrupted run names, once each."""
    flags = [*TINY, *last_rows_missing(tmp_path, 48, 12), '--workers=0', '--epochs=1', '--log_every=4',
             '--bad_sample_threshold=0.5']
    train.main([*flags, f'--output_dir={tmp_path / "straight"}'])
    train.main([*flags, f'--output_dir={tmp_path / "resumed"}', '--max_steps=3'])
    with open(tmp_path / 'resumed' / 'skipped.jsonl', 'a') as f:
        f.write(json.dumps({'step': 4, 'sample': 'read after the checkpoint', 'reason': 'x'}) + '\n{"step": 5, "sa')
    train.main([*flags, f'--output_dir={tmp_path / "resumed"}', '--resume=auto'])
    straight, resumed = (jsonl(tmp_path / d / 'skipped.jsonl') for d in ('straight', 'resumed'))
    assert sorted(r['sample'] for r in resumed) == sorted(r['sample'] for r in straight)
    assert len(straight) == sum(r['skipped'] for r in jsonl(tmp_path / 'straight' / 'log.jsonl')
                                if r['type'] == 'epoch') > 0


def jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, 'JPEG')
    return buf.getvalue()


def test_a_run_of_bad_tar_members_is_read_counted_and_named_once_each(tmp_path):
    members = []
    for i in range(12):
        bad = 4 <= i < 9  # a run of 5 broken images in a row
        members += [(f'{i:05d}.jpg', b'broken' if bad else jpeg(i)), (f'{i:05d}.txt', f'caption {i}'.encode())]
    with tarfile.open(tmp_path / 'a.tar', 'w') as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    cfg = Config(dataset='wds', metadata=str(tmp_path / 'a.tar'), batch_size=7, workers=1, image_size=16,
                 local_crop_size=16, bpe_path=str(ROOT / 'assets/demo_bpe.txt.gz'))
    batch, = list(data.build_train_loader(cfg, data.build_tokenizer(cfg)))  # the 7 good samples of 12
    names = [w for s in batch['skipped_files'] for w, why in json.loads(s)]
    assert int(batch['skipped'].sum()) == 5 and sorted(names) == [f'{tmp_path / "a.tar"}:{i:05d}' for i in range(4, 9)]
    assert data.samples_read(7, 5, cfg) == 12 and data.samples_read(7, 5, Config(dataset='csv')) == 7


def test_the_pixel_budget_decides_without_pils_warning(tmp_path, monkeypatch):
    """A JPEG over PIL's decompression-bomb warning size decodes at 1/2 scale within --max_image_pixels, silently; with
    no budget (0) PIL's own warning stays."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 400 * 300)  # PIL warns over this, refuses over twice it
    buf = io.BytesIO()
    Image.new('RGB', (480, 320), (200, 10, 10)).save(buf, 'JPEG')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        img = data.open_image(buf.getvalue(), max_pixels=200 * 200)
        img.load()
        assert img.size == (240, 160)  # the budget's 1/2 scale
        with pytest.raises(ValueError, match='over --max_image_pixels'):  # a PNG is refused, never decoded
            png_buf = io.BytesIO()
            Image.new('L', (480, 320)).save(png_buf, 'PNG')
            data.open_image(png_buf.getvalue(), max_pixels=200 * 200)
    with pytest.warns(Image.DecompressionBombWarning):
        data.open_image(buf.getvalue())


def test_the_budgets_filter_leaves_other_warnings_shown_once():
    """Silencing PIL's bomb warning must not reset which warnings were shown: a warning of one place (as PIL's corrupt
    EXIF one) prints once in a run of many images, not once per image."""
    buf = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buf, 'PNG')
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('default')
        for _ in range(3):
            data.open_image(buf.getvalue(), max_pixels=200 * 200)
            warnings.warn('possibly corrupt EXIF data', UserWarning)
    assert len(shown) == 1


# --- Per-epoch evaluation of a user's data ---
def test_a_csv_run_evaluates_its_folder_sets_each_epoch_and_says_once_when_it_has_none(tmp_path, capsys):
    flags = [*TINY, *last_rows_missing(tmp_path, 16, 0), '--workers=0', '--epochs=2', '--log_every=2',
             '--eval_every=1']
    train.main([*flags, f'--output_dir={tmp_path / "none"}'])
    out = capsys.readouterr().out
    assert out.count('no zero-shot evaluation during training') == 1 and out.count('skip imagenet') == 1
    assert all('test' not in r for r in jsonl(tmp_path / 'none' / 'log.jsonl'))
    for i, colour in enumerate(('red', 'blue', 'red', 'blue')):
        (tmp_path / 'shapes' / colour).mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (40, 40), (200, 0, 0) if colour == 'red' else (0, 0, 200)).save(
            tmp_path / 'shapes' / colour / f'{i}.png')
    train.main([*flags, f'--output_dir={tmp_path / "folder"}', f'--eval_datasets=folder:{tmp_path / "shapes"}'])
    out = capsys.readouterr().out
    assert 'skip ' not in out and 'no zero-shot evaluation' not in out
    tests = [r['test'] for r in jsonl(tmp_path / 'folder' / 'log.jsonl') if r['type'] == 'epoch']
    assert len(tests) == 2 and all(t['shapes']['images'] == 4 and t['shapes']['classes'] == 2 for t in tests)
