"""augment.py image views: the fast paths against torchvision's per-sample transforms, the batched step-side path
against the per-sample one, and the frequencies of every random draw (chi-square, fixed seeds)."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from PIL import Image

import augment
import data as D
from config import Config

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ROUNDED = 0.5 / 255 / min(STD)  # a strong view rounded to uint8 in the worker, normalised: at most this far off
# chi-square critical values at p = 0.001 by degrees of freedom (a true null fails 1 run in 1000; seeds are fixed)
CHI2_999 = {1: 10.83, 9: 27.88, 23: 49.73}


def photo(seed, size=(61, 47)):
    """A smooth colour field with noise: every hue, some grey, some saturated pixels."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(field, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


# --- Reference: torchvision's per-sample transforms, the reference the batched kernels must match ---
class Blur(v2.Transform):
    """PIL-style blur with sigma ~ U(0.1, 2) from torch's default generator, one image at a time."""

    def make_params(self, flat_inputs):
        return {'sigma': torch.empty(1).uniform_(0.1, 2.0).item()}

    def transform(self, inpt, params):
        return augment.gaussian_blur(inpt[None], torch.tensor([augment.blur_taps(params['sigma'])]))[0]


def reference_views(cfg):
    """(weak, [strong] * A) pipelines of torchvision v2 transforms with torchvision's colour kernels."""
    def crop(size, scale):
        return v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=v2.InterpolationMode.BICUBIC,
                                    antialias=True)
    tail = [v2.ToDtype(torch.float32, scale=True)]
    weak = v2.Compose([crop(cfg.image_size, (cfg.weak_min_scale, 1.0)), *tail, v2.Normalize(MEAN, STD)])
    strong = [v2.Compose([
        crop(cfg.local_crop_size, (cfg.strong_min_scale, cfg.strong_max_scale)), *tail,
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, sat, 0.1)], p=cfg.color_jitter_prob),
        v2.RandomGrayscale(cfg.grayscale_prob),
        v2.RandomApply([Blur()], p=blur),
        v2.RandomSolarize(128 / 255, p=sol),
        v2.RandomHorizontalFlip(0.5),
        v2.Normalize(MEAN, STD)]) for sat, blur, sol in
        ([(0.2, 1.0, 0.0), (0.2, 0.1, 0.2)] if cfg.byol_augment else [(0.4, cfg.blur_prob, cfg.solarize_prob)] * 2)]
    return weak, strong


def reference(cfg, img, seed):
    weak, strong = reference_views(cfg)
    x = F.pil_to_tensor(img)
    torch.manual_seed(seed)
    return weak(x), [t(x) for t in strong]


# --- Fast paths == reference, for the same draws ---
@pytest.mark.parametrize('overrides', [dict(), dict(solarize_prob=0.5, grayscale_prob=0.5), dict(byol_augment=True)])
def test_views_equal_torchvision_transforms_for_the_same_seed(overrides):
    """Same draws in the same order (so the same crops, bit for bit) and the same pixels to float tolerance; the
    strong views to their rounding to uint8 in the worker."""
    cfg = Config(image_size=24, local_crop_size=16, num_augs=2, **overrides)
    views = augment.ImageViews(cfg)
    for seed in range(25):
        img = photo(seed)
        weak, strong = views(img, torch.Generator().manual_seed(seed))
        ref_weak, ref_strong = reference(cfg, img, seed)
        assert weak.dtype == torch.uint8 and all(s.dtype == torch.uint8 for s in strong)
        torch.testing.assert_close(augment.normalize(weak, MEAN, STD), ref_weak, atol=1e-5, rtol=0)
        for s, r in zip(strong, ref_strong):  # + float32 rounding of a different order of ops
            torch.testing.assert_close(augment.normalize(s, MEAN, STD), r, atol=ROUNDED + 2e-5, rtol=0)


def test_uint8_crops_are_the_reference_crops_exactly():
    cfg = Config(image_size=24, local_crop_size=16, num_augs=2, color_jitter_prob=0.0, grayscale_prob=0.0,
                 blur_prob=0.0)
    views = augment.ImageViews(cfg)
    img = photo(3)
    weak, strong, params = views.draw(img, torch.Generator().manual_seed(7))
    ref_weak, ref_strong = reference(cfg, img, 7)
    assert weak.dtype == torch.uint8 and torch.equal(augment.normalize(weak[None], MEAN, STD)[0], ref_weak)
    for s, p, r in zip(strong, params, ref_strong):
        out = augment.normalize(s[None], MEAN, STD)[0]
        torch.testing.assert_close(out.flip(-1) if p['flip'] else out, r, atol=0, rtol=0)


@pytest.mark.parametrize('factor', [-0.5, -0.1, 0.0, 0.037, 0.1, 0.5])
def test_adjust_hue_matches_torchvision(factor):
    img = torch.rand(2, 3, 17, 13, generator=torch.Generator().manual_seed(0))
    img[:, :, :2] = img[:, :1, :2]  # some grey pixels (no hue)
    out = augment.adjust_hue(img, torch.full((2, 1, 1, 1), factor))
    torch.testing.assert_close(out, F.adjust_hue(img, factor), atol=1e-5, rtol=0)


@pytest.mark.parametrize('op,ref', [(lambda img, f: augment.blend_(img, f), F.adjust_brightness),
                                    (lambda img, f: augment.blend_(img, f, mean=1 - f), F.adjust_contrast),
                                    (lambda img, f: augment.blend_(img, f, grey=1 - f), F.adjust_saturation)],
                         ids=['brightness', 'contrast', 'saturation'])
def test_in_place_colour_ops_match_torchvision(op, ref):
    img = torch.rand(3, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([0.6, 1.0, 1.4])
    out = op(img.clone(), factors.view(3, 1, 1, 1))
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], ref(img[i], f), atol=1e-6, rtol=0)


# --- Batched (step-side) == per sample, for the same parameters ---
def mixed_params(n, seed):
    """Drawn parameters of n strong views with every op at p = 0.5, so each batch mixes all cases."""
    spec = augment.strong_spec(Config(color_jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5, solarize_prob=0.5),
                               0.4, 0.5, 0.5)
    gen = torch.Generator().manual_seed(seed)
    return [augment.draw_photometric(gen, spec) for _ in range(n)]


def columns_of(params):
    return torch.tensor([augment.photometric_columns(p) for p in params]).T  # (K, N)


def finish(x, columns):
    return augment.finish_strong(augment.to_unit(x), columns, augment.active_columns(columns))


def test_batched_finish_equals_per_sample_finish():
    params = mixed_params(32, 0)
    x = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    columns = columns_of(params)
    out = finish(x, columns)
    for i, p in enumerate(params):
        one = finish(x[i:i + 1], columns[:, i:i + 1])
        torch.testing.assert_close(out[i:i + 1], one, atol=1e-6, rtol=0)


def test_step_side_views_equal_worker_views():
    """--augment_device=cuda (run here on the CPU): the loader's decoded pixels, boxes and parameters, cropped and
    finished in the step, equal the views the workers make with --augment_device=cpu; a large image's views are
    cropped in the worker instead (augment.REGION_LIMIT)."""
    base = dict(image_size=16, local_crop_size=8, num_augs=2, remove_stopwords_prob=0.0, text_augment=False)
    cpu, dev = Config(**base), Config(**base, augment_device='cuda')
    images = [photo(i, (30 + i, 20)) for i in range(6)] + [photo(9, (64, 48))]  # packed, not stacked

    def samples(cfg):
        make = D.SampleMaker(cfg, lambda texts: torch.zeros(len(texts), 77, dtype=torch.long))
        return [make(img, ('a',), 0, i, 0) for i, img in enumerate(images)]

    want, got = D.collate(samples(cpu)), samples(dev)
    assert sorted(len(s['images']) for s in got) == [1] * 6 + [3]  # 6 regions; the 64x48 one ships its views
    assert sum(x.numel() for s in got for x in s['images']) <= sum(3 * img.width * img.height for img in images)
    got = D.collate(got)
    assert got['pixels'].dtype == torch.uint8 and 'weak' not in got and got['photometric'].shape[1] == 2 * 7
    weak, strong = augment.finish_views(got, dev, torch.device('cpu'))
    assert want['weak'].dtype == torch.uint8 and all(s.dtype == torch.uint8 for s in want['strong'])
    want_weak = augment.normalize(want['weak'], MEAN, STD)
    assert torch.equal(augment.finish_views(want, cpu, torch.device('cpu'))[0], want_weak)  # cpu: normalised
    torch.testing.assert_close(weak, want_weak, atol=1e-6, rtol=0)
    for s, w in zip(strong, want['strong']):  # the workers round their strong views to uint8
        torch.testing.assert_close(s, augment.normalize(w, MEAN, STD), atol=ROUNDED + 1e-6, rtol=0)


def test_packed_crops_read_back_as_their_boxes():
    """pack_views: one pixel tensor whatever the sizes, each crop found again from its (first pixel, row stride, h, w)
    and readable row by row as windows of the widest crop; crops and columns view-major."""
    g = torch.Generator().manual_seed(0)
    images = [[torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
               for h, w in sample] for sample in ([(5, 7)], [(1, 1), (9, 4), (3, 3)], [(6, 8)])]  # decoded strides
    boxes = torch.tensor([[(0, 1, 2, 3, 4), (0, 0, 0, 5, 7)], [(0, 0, 0, 1, 1), (1, 2, 1, 7, 3)],
                          [(0, 5, 7, 1, 1), (0, 0, 1, 6, 7)]])  # (B, 1 + A, 5): image in the sample, top, left, h, w
    columns = torch.arange(3 * 1 * 4, dtype=torch.float).view(3, 1, 4)  # (B, A, K)
    packed = augment.pack_views(images, boxes, columns)
    pixels, crops = packed['pixels'], packed['crops']
    widest = 7
    assert pixels.numel() == sum(x.numel() for i in images for x in i) + 3 * widest and crops.shape == (4, 6, 1)
    for n, (f, s, h, w) in enumerate(crops[..., 0].T.tolist()):
        v, b = divmod(n, 3)
        i, top, left, bh, bw = boxes[b, v].tolist()
        assert (h, w) == (bh, bw)
        crop = pixels.as_strided((3, h, w), (1, 3 * s, 3), 3 * f)
        assert torch.equal(crop, images[b][i][:, top:top + h, left:left + w])
        assert 3 * (f + (h - 1) * s) + 3 * widest <= pixels.numel()
    assert torch.equal(packed['photometric'], columns[:, 0].T)  # (K, A B)


def test_covering_region_crops_equal_whole_image_crops():
    x = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    boxes = [(5, 8, 20, 12), (10, 2, 7, 30), (30, 20, 9, 9)]
    region, inside = augment.covering_region(x, boxes)
    assert region.shape == (3, 39 - 5, 32 - 2)  # rows 5..39, columns 2..32
    for box, rel in zip(boxes, inside):
        assert torch.equal(augment.resized_crop(region, rel, 8), augment.resized_crop(x, box, 8))


@pytest.mark.parametrize('kind', ['photo', 'text', 'noise'])
def test_float_resize_is_within_two_levels_of_the_uint8_kernel(kind, monkeypatch):
    """The step's resize off the CPU (CUDA has no uint8 antialias kernel): bicubic overshoot at sharp edges is
    clamped between the passes as the uint8 kernel does (clamping once at the end differs by up to 30 levels)."""
    g = torch.Generator().manual_seed(2)
    if kind == 'photo':
        x = torch.from_numpy(np.asarray(photo(3, (64, 48))).copy()).permute(2, 0, 1)
    elif kind == 'text':  # black strokes on white
        x = torch.full((3, 48, 64), 255, dtype=torch.uint8)
        x[:, torch.rand(48, 64, generator=g) < 0.15] = 0
    else:
        x = (torch.rand(3, 48, 64, generator=g) < 0.5).to(torch.uint8) * 255
    monkeypatch.setattr(augment, 'batched_kernels', lambda device: True)  # the GPU's kernels, here on the CPU
    for box, size in (((0, 0, 48, 48), 16), ((3, 5, 20, 30), 24), ((10, 10, 38, 50), 16), ((0, 0, 5, 7), 24)):
        want = augment.resized_crop(x, box, size).int()
        packed = augment.pack_views([[x]], torch.tensor([[(0, *box)]]), torch.zeros(1, 0, len(augment.IDENTITY)))
        got = augment.to_uint8(augment.resize_crops(packed['pixels'], packed['crops'], packed['crops'], size)[0])
        assert (got.int() - want).abs().max() <= 2


# --- Frequencies of the draws (chi-square against the configured probabilities) ---
def chi2(counts, expected):
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected))


def test_op_frequencies_match_the_configured_probabilities():
    cfg = Config(solarize_prob=0.3)
    spec, n = augment.strong_specs(cfg)[0], 4000
    gen = torch.Generator().manual_seed(0)
    draws = [augment.draw_photometric(gen, spec) for _ in range(n)]
    for key, p in (('jitter', 0.8), ('gray', 0.2), ('blur', 0.5), ('solarize', 0.3), ('flip', 0.5)):
        k = sum(bool(d[key]) for d in draws)
        assert chi2([k, n - k], [n * p, n * (1 - p)]) < CHI2_999[1], (key, k / n, p)
    jittered = [d for d in draws if d['jitter']]
    orders = Counter(tuple(d['order'].tolist()) for d in jittered)  # the 24 orders equally likely
    assert len(orders) == 24 and chi2(orders.values(), [len(jittered) / 24] * 24) < CHI2_999[23]
    factors = torch.stack([d['factors'] for d in jittered])
    for col, (lo, hi) in enumerate(spec['jitter']):  # each factor uniform on its range (10 bins)
        counts = torch.histc(factors[:, col], 10, lo, hi).tolist()
        assert sum(counts) == len(jittered) and chi2(counts, [len(jittered) / 10] * 10) < CHI2_999[9]
    sigmas = torch.stack([d['sigma'] for d in draws if d['blur']])
    assert chi2(torch.histc(sigmas, 10, 0.1, 2.0).tolist(), [len(sigmas) / 10] * 10) < CHI2_999[9]
    assert all(d['sigma'] == 0 for d in draws if not d['blur'])
    assert all(d['order'].tolist() == [0, 1, 2, 3] and d['factors'].tolist() == [1, 1, 1, 0]
               for d in draws if not d['jitter'])


def test_crop_scale_and_ratio_are_uniform_and_log_uniform():
    """Away from the image's edges (scale <= 0.5 of a square: no rejected tries), the area fraction is uniform on
    the scale range and log(w / h) uniform on log(3/4)..log(4/3)."""
    gen, n, side = torch.Generator().manual_seed(1), 4000, 1000
    boxes = [augment.crop_box(gen, side, side, (0.08, 0.5)) for _ in range(n)]
    scale = torch.tensor([h * w / side ** 2 for _, _, h, w in boxes])
    ratio = torch.tensor([math.log(w / h) for _, _, h, w in boxes])
    assert chi2(torch.histc(scale, 10, 0.08, 0.5).tolist(), [n / 10] * 10) < CHI2_999[9]
    assert chi2(torch.histc(ratio, 10, math.log(3 / 4), math.log(4 / 3)).tolist(), [n / 10] * 10) < CHI2_999[9]
    assert all(0 <= t <= side - h and 0 <= left <= side - w for t, left, h, w in boxes)


def test_crop_box_draws_as_torchvision():
    for seed, (height, width) in enumerate([(375, 500), (10, 300), (300, 10), (7, 7)]):
        for scale in ((0.08, 1.0), (0.5, 1.0), (1.0, 1.0)):
            torch.manual_seed(seed)
            ref = v2.RandomResizedCrop(8, scale=scale).make_params([torch.zeros(3, height, width)])
            ours = augment.crop_box(torch.Generator().manual_seed(seed), height, width, scale)
            assert ours == (ref['top'], ref['left'], ref['height'], ref['width'])


# --- JPEG draft decoding ---
def big_jpeg(seed, size=(960, 720)):
    import io
    buf = io.BytesIO()
    photo(seed, size).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def test_draft_scale_is_the_largest_that_never_upsamples():
    rng = np.random.default_rng(0)
    for _ in range(500):
        sizes = rng.integers(8, 64, 3).tolist()
        boxes = [(0, 0, *rng.integers(1, 700, 2).tolist()) for _ in sizes]
        k = augment.draft_scale(boxes, sizes)
        assert k in (1, 2, 4, 8)
        fits = [all(min(b[2:]) >= j * s for b, s in zip(boxes, sizes)) for j in (2 * k, k)]
        assert (k == 1 or fits[1]) and (k == 8 or not fits[0])  # every crop keeps >= size pixels a side at 1/k


def test_scaled_box_covers_the_drawn_box_inside_the_decoded_image():
    gen = torch.Generator().manual_seed(2)
    for k in (1, 2, 4, 8):
        for height, width in ((720, 960), (721, 963)):
            for _ in range(200):
                top, left, h, w = augment.crop_box(gen, height, width, (0.08, 1.0))
                t, lf, hk, wk = augment.scale_box((top, left, h, w), k)
                assert t * k <= top and lf * k <= left and (t + hk) * k >= top + h and (lf + wk) * k >= left + w
                assert t + hk <= -(-height // k) and lf + wk <= -(-width // k) and min(hk, wk) >= min(h, w) // k


def test_draft_decoded_views_match_full_decoded_views():
    """A 960x720 JPEG with 64 / 48 px views: most samples decode at 1/2..1/8, with the same draws, and each crop
    differs from the full decode's by about one uint8 level on average (DCT scaling vs bicubic antialiasing)."""
    cfg = Config(image_size=64, local_crop_size=48, num_augs=2)
    views, scales = augment.ImageViews(cfg), Counter()
    for seed in range(12):
        data = big_jpeg(seed)
        full = D.open_image(data)
        full.load()
        lazy = D.open_image(data)
        got = views.draw(lazy, torch.Generator().manual_seed(seed))
        want = views.draw(full, torch.Generator().manual_seed(seed))
        scales[full.size[0] // lazy.size[0]] += 1
        for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
            assert (g.float() - w.float()).abs().mean() < 2.5
        for pg, pw in zip(got[2], want[2]):
            assert all(torch.equal(pg[k], pw[k]) for k in pg)
    assert scales[1] < 12 and set(scales) <= {1, 2, 4, 8}


def test_truncated_jpeg_is_unreadable_when_the_views_decode_it():
    data = big_jpeg(0, (64, 48))
    views = augment.ImageViews(Config(image_size=16, local_crop_size=8))
    with pytest.raises(augment.UnreadableImage):
        views.draw(D.open_image(data[:len(data) // 2]))


def test_batched_finish_runs_on_the_views_device():
    """On the 'meta' device (shapes only): a CPU tensor in the device's elementwise maths raises, as on a GPU."""
    columns = columns_of(mixed_params(8, 1))
    x = torch.empty(8, 3, 12, 12, device='meta')
    out = augment.finish_strong(x, columns.to('meta'), augment.active_columns(columns))
    assert out.device.type == 'meta' and out.shape == (8, 3, 12, 12) and out.dtype == torch.float32
    images = [[torch.zeros(3, 14, 15, dtype=torch.uint8)] for _ in range(8)]
    batch = augment.pack_views(images, torch.tensor([[(0, 0, 0, 14, 15), (0, 1, 2, 10, 10)]] * 8), columns.T[:, None])
    weak, strong = augment.finish_views({**batch, 'tokens': torch.zeros(8, 2, 5)}, Config(
        augment_device='cuda', image_size=12, local_crop_size=8, num_augs=1), torch.device('meta'))
    assert weak.device.type == strong[0].device.type == 'meta'
    assert weak.shape == (8, 3, 12, 12) and strong[0].shape == (8, 3, 8, 8)
