"""What real image-caption data brings that the demo does not: transparent drawings (composited onto a constant
background in training and evaluation), runs of unreadable files (counted once each, named in the output dir),
and oversized images that the pixel budget, not PIL's warning, decides about."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
from augment import ImageViews, eval_transform, to_rgb
from config import Config

CFG = Config(image_size=32, local_crop_size=24, strong_min_scale=0.25)


# --- Transparency ---
def drawing(size=(90, 70)):
    """Black anti-aliased line art on a transparent canvas whose hidden colour is black, as many clip-art PNGs are:
    alpha 0 outside the strokes, 255 on them and every level in between along their edges."""
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
