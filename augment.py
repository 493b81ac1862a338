"""Image and text augmentations: the weak and strong views of CLIP 🚀 (recipe §3)."""
import contextlib
import functools
import hashlib
import html
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as tnf
import torchvision.transforms.v2 as v2
from PIL import Image

from config import atomic_write


# --- Image: mode conversion ---
def check_image(img):
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}; open files with PIL.Image.open")
    if min(img.size) == 0:
        raise ValueError(f"empty image of size {img.size}; drop it from the dataset")


WHITE = (255, 255, 255)


def to_rgb(img, background=WHITE):
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) -> 8-bit RGB; 16-bit data is rescaled, and an image with alpha (a
    channel, or a palette or grey/RGB colour marked transparent) is composited onto the constant background."""
    check_image(img)
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        # PIL's own convert clips 16-bit values at 255 (an all-white image); rescale to 8 bits instead
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
        gray = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), 'L')
        if 'transparency' in img.info:  # a transparent grey level, in the stored units
            gray.putalpha(Image.fromarray(np.where(a == img.info['transparency'], 0, 255).astype(np.uint8), 'L'))
        img = gray
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
        # transparent pixels keep whatever colour the file stored (often black, which hides black line art)
        rgba = img.convert('RGBA')  # palette and colour-key transparency become alpha here (else PIL warns)
        img = Image.new('RGB', img.size, tuple(map(int, background)))
        img.paste(rgba, mask=rgba.getchannel('A'))  # round((c a + bg (255 - a)) / 255), PIL's exact blend
    return img if img.mode == 'RGB' else img.convert('RGB')


# --- Image: colour and blur kernels (float (N, 3, H, W) images in [0, 1]; factors are (N, 1, 1, 1) tensors) ---
# Kernels ending in _ work in place. Each is torchvision's maths (or PIL's, for the blur) in fewer passes, batched:
# each image has its own factors. Off the CPU the step runs them over whole batches, so every op is one launch.
def batched_kernels(device):
    """Whether device takes the kernels made for whole batches (one launch an op): all but the CPU, whose per-crop
    uint8 resize and shifted-add blur are faster there."""
    return device.type != 'cpu'


@functools.lru_cache(maxsize=None)
def constant(values, device, shape=(-1,)):
    """A constant tensor made once per device (made in each call, it would be a blocking host-to-device copy)."""
    return torch.tensor(values, device=device).view(shape)


def grayscale(img):
    """(N, 1, H, W) luma with torchvision's weights, in its order of operations."""
    r, g, b = img.split(1, dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)


def blend_(img, ratio, mean=None, grey=None):
    """torchvision's brightness, contrast and saturation in one pass, each a blend f * img + (1 - f) * other clamped to
    [0, 1]: ratio * img + mean * (the image's mean luma) + grey * (its luma). Brightness (f, 0, 0), contrast (f, 1 - f,
    0), saturation (f, 0, 1 - f); a weight of None is zero, skipped."""
    luma = grayscale(img) if mean is not None or grey is not None else None
    if ratio is not None:
        img.mul_(ratio)
    if grey is not None:
        img.addcmul_(luma, grey)
    if mean is not None:
        img.add_(luma.mean((-3, -2, -1), keepdim=True) * mean)  # (N, 1, 1, 1) products first: far faster on CPU
    return img.clamp_(0, 1)


def adjust_hue(img, hue_factor):
    """Rotate the hue by hue_factor turns: torchvision's HSV maths in closed form (V = max and V*S = max - min
    are kept), with one division and no float mod (the costliest op: a round instead)."""
    maxc, minc = img.amax(-3, keepdim=True), img.amin(-3, keepdim=True)  # (N, 1, H, W); aminmax is 20x slower on CPU
    delta = maxc - minc
    r, g, b = img.split(1, dim=-3)
    h = torch.where(maxc == r, g - b,
                    torch.where(maxc == g, (b - r).add_(delta, alpha=2), (r - g).add_(delta, alpha=4)))
    h.div_(delta.clamp_min(1e-8)).add_(6 * hue_factor)  # hue in sextants; grey pixels (delta 0) keep maxc anyway
    # HSV -> RGB: channel = max - delta * clamp(2 - d, 0, 1) = max - 2 delta + delta * clamp(d, 1, 2), where d is
    # the distance of (hue + phase) from 2 on the 6-circle; the phases of R, G, B in sextants, minus 2: 3, 1, -1
    u = h + constant((3.0, 1.0, -1.0), img.device, (3, 1, 1))  # (N, 3, H, W)
    u.sub_(torch.round(u / 6).mul_(6)).abs_().clamp_(1, 2)
    return torch.addcmul(maxc.sub_(delta, alpha=2), delta, u)


def blur_taps(sigma, width=None):
    """The taps of Pillow's extended box filter whose 3 passes make a Gaussian of std sigma (Gwosdek et al. 2011):
    2n + 1 full taps plus a fractional tap a at each end, normalised, each pass of variance sigma^2 / 3; zeros at
    both ends up to width taps (the same sums, exactly)."""
    var = sigma * sigma / 3
    n = math.floor((math.sqrt(12 * var + 1) - 1) / 2)
    a = (2 * n + 1) * (n * (n + 1) - 3 * var) / (6 * (var - (n + 1) ** 2))
    pad = [0.0] * ((width or 2 * n + 3) // 2 - n - 1)
    return pad + [w / (2 * n + 1 + 2 * a) for w in [a] + [1.0] * (2 * n + 1) + [a]] + pad


def gaussian_blur(img, taps):
    """PIL's GaussianBlur per image, taps (N, T) from blur_taps: 3 extended box passes per axis, edges replicated; PIL's
    up to its uint8 rounding between passes (<= 3/255). torchvision's sampled Gaussian blurs far less below 0.7."""
    if batched_kernels(img.device):
        return box_passes(img, taps)
    lead = int(taps.ne(0).any(0).int().argmax())  # taps zero in every row add nothing: a narrower filter on the CPU
    r = taps.shape[1] // 2 - lead
    taps = taps[:, lead:taps.shape[1] - lead].T.reshape(-1, len(img), 1, 1, 1)  # (T, N, 1, 1, 1)
    for dim, pad in ((3, (r, r, 0, 0)), (2, (0, 0, r, r))):  # (N, C, H, W): along W, then along H
        size = img.shape[dim]
        for _ in range(3):
            x = tnf.pad(img, pad, mode='replicate')
            # shifted multiply-adds: far faster than a depthwise conv2d on CPU for kernels this small
            img = x.narrow(dim, 0, size) * taps[0]
            for i in range(1, len(taps)):
                img.addcmul_(x.narrow(dim, i, size), taps[i])
    return img


def box_passes(img, taps):
    """gaussian_blur's passes as depthwise convolutions over the whole batch: 12 launches whatever the batch."""
    n, c, h, w = img.shape
    r = taps.shape[1] // 2
    weight = taps.repeat_interleave(c, 0)  # (N C, T): each image's taps for each of its channels
    x = img.reshape(1, n * c, h, w)
    for kernel, pad in ((weight.view(n * c, 1, 1, -1), (r, r, 0, 0)), (weight.view(n * c, 1, -1, 1), (0, 0, r, r))):
        for _ in range(3):
            x = tnf.conv2d(tnf.pad(x, pad, mode='replicate'), kernel, groups=n * c)
    return x.view(n, c, h, w)


def solarize(img, threshold):
    """PIL's solarize(threshold=128) on uint8 where threshold is 128 / 255; inf leaves an image alone."""
    return torch.where(img >= threshold, 1 - img, img)


# --- Image: random parameters of the views (torchvision's draws, in its order, from one generator) ---
def coin(gen, p):
    """torchvision's RandomApply test: applied unless rand >= p, compared in float32 as there."""
    return torch.rand(1, generator=gen).item() < float(np.float32(p))


def uniform(gen, lo, hi):
    return torch.empty(1).uniform_(lo, hi, generator=gen).item()


@functools.lru_cache(maxsize=None)
def float32_logs(values):
    return torch.log(torch.tensor(values)).tolist()  # torchvision's log ratio bounds, to the last bit


def crop_box(gen, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's (top, left, h, w): a box of area scale x the image and log-uniform aspect ratio,
    10 tries, else the central crop of clamped ratio (torchvision's make_params)."""
    log_ratio = float32_logs(ratio)
    for _ in range(10):
        area = height * width * uniform(gen, *scale)
        aspect = torch.exp(torch.empty(1).uniform_(*log_ratio, generator=gen)).item()
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=gen).item()
            return top, torch.randint(0, width - w + 1, (1,), generator=gen).item(), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


BLUR_SIGMA = (0.1, 2.0)  # the strong views' blur radius range (recipe §3.1)


def strong_spec(cfg, saturation, blur_prob, solarize_prob):
    """Local view (recipe §3.1): crop R, colour jitter in random order, grayscale, blur, solarize, flip, normalise."""
    jitter = ((0.6, 1.4), (0.6, 1.4), (1 - saturation, 1 + saturation), (-0.1, 0.1))  # brightness, contrast, ..., hue
    return dict(size=cfg.local_crop_size, scale=(cfg.strong_min_scale, cfg.strong_max_scale), jitter=jitter,
                jitter_prob=cfg.color_jitter_prob, gray_prob=cfg.grayscale_prob, blur_prob=blur_prob,
                sigma=BLUR_SIGMA, solarize_prob=solarize_prob, flip_prob=0.5)


def strong_specs(cfg):
    """The A strong views; byol_augment gives BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2)."""
    if cfg.byol_augment:
        return [strong_spec(cfg, 0.2, 1.0, 0.0), strong_spec(cfg, 0.2, 0.1, 0.2)]
    return [strong_spec(cfg, 0.4, cfg.blur_prob, cfg.solarize_prob) for _ in range(cfg.num_augs)]


def draw_photometric(gen, spec):
    """A strong view's parameters after its crop, in torchvision's order; skipped ops keep identity, draw nothing."""
    order, factors = torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.0])  # brightness, contrast, saturation, hue
    jitter = coin(gen, spec['jitter_prob'])
    if jitter:
        order = torch.randperm(4, generator=gen)
        factors = torch.tensor([uniform(gen, lo, hi) for lo, hi in spec['jitter']])
    gray, blur = coin(gen, spec['gray_prob']), coin(gen, spec['blur_prob'])
    sigma = uniform(gen, *spec['sigma']) if blur else 0.0
    flags = dict(jitter=jitter, gray=gray, blur=blur, solarize=coin(gen, spec['solarize_prob']),
                 flip=coin(gen, spec['flip_prob']))
    return dict(order=order, factors=factors, sigma=torch.tensor(sigma),
                **{k: torch.tensor(v) for k, v in flags.items()})


# --- Image: a strong view's draws as columns of numbers, read by the batched photometric ops ---
# Per view: 6 blend slots of (ratio, mean, grey) weights (blend_), the hue factor, grayscale, flip, solarize's
# threshold and the blur's taps; a skipped op holds identity values. The jitter's brightness, contrast and saturation,
# at ranks j = 0, 1, 2 of the drawn order with the hue at place p, take blend slots j + 3 - p: slots 0-2 run before
# the hue and 3-5 after it, so one hue pass serves all 24 orders, and each view's ops run in its drawn order.
BLEND_SLOTS = 6
HUE, GRAY, FLIP, SOLARIZE, TAPS = range(3 * BLEND_SLOTS, 3 * BLEND_SLOTS + 5)
BLUR_WIDTH = len(blur_taps(BLUR_SIGMA[1]))  # the widest filter of the range: every view's taps padded to it
IDENTITY = ((1.0, 0.0, 0.0) * BLEND_SLOTS + (0.0, 0.0, 0.0, math.inf)
            + (0.0,) * (BLUR_WIDTH // 2) + (1.0,) + (0.0,) * (BLUR_WIDTH // 2))


def photometric_columns(p):
    """A strong view's draws (draw_photometric) as the batched ops' columns: a list of len(IDENTITY) floats."""
    blend, hue = [[1.0, 0.0, 0.0] for _ in range(BLEND_SLOTS)], 0.0
    if p['jitter']:
        order, factors = p['order'].tolist(), p['factors'].tolist()
        at = order.index(3)  # the hue's place
        for j, op in enumerate(o for o in order if o != 3):
            blend[j + 3 - at][0] = factors[op]
            if op:  # contrast (1) blends with the mean luma, saturation (2) with the luma
                blend[j + 3 - at][op] = 1 - factors[op]
        hue = factors[3]
    taps = blur_taps(float(p['sigma']), BLUR_WIDTH) if p['blur'] else IDENTITY[TAPS:]
    return [w for slot in blend for w in slot] + [hue, float(p['gray']), float(p['flip']),
                                                 128 / 255 if p['solarize'] else math.inf, *taps]


def active_columns(columns):
    """For each column of (K, N) CPU columns, how many of the N views set it off identity: ops that no view needs are
    skipped, and ops that every view needs run unmasked."""
    return columns.ne(constant(IDENTITY, columns.device, (-1, 1))).sum(1).tolist()


def finish_strong(img, columns, active):
    """The strong views' photometric ops, batched: img (N, 3, R, R) float in [0, 1] -> colour jitter in each view's
    drawn order, grayscale, blur, solarize, flip; columns (K, N) on img's device (photometric_columns), active: their
    counts of views off identity (active_columns, from a CPU copy: no sync)."""
    col, n = columns.view(len(columns), -1, 1, 1, 1).unbind(), columns.shape[1]  # K x (N, 1, 1, 1)
    if any(0 < active[k] < n for k in (HUE, GRAY, FLIP)):  # masks for the ops some views skip
        on = dict(zip((HUE, GRAY, FLIP), columns[HUE:FLIP + 1].ne(0).view(3, -1, 1, 1, 1).unbind()))

    def masked(k, out, before):  # out where a view asked for the op k, before elsewhere
        return out if active[k] == n else torch.where(on[k], out, before)

    for slot in range(BLEND_SLOTS):
        if slot == BLEND_SLOTS // 2 and active[HUE]:
            img = masked(HUE, adjust_hue(img, col[HUE]), img)
        weights = [col[i] if active[i] else None for i in range(3 * slot, 3 * slot + 3)]
        if any(w is not None for w in weights):
            img = blend_(img, *weights)
    if active[GRAY]:
        luma = grayscale(img)
        img = img.copy_(luma) if active[GRAY] == n else torch.where(on[GRAY], luma, img)
    if any(active[TAPS:]):
        img = gaussian_blur(img, columns[TAPS:].T)
    if active[SOLARIZE]:
        img = solarize(img, col[SOLARIZE])
    return masked(FLIP, img.flip(-1), img) if active[FLIP] else img


# --- Image: decoding, crops, packing for the step, normalisation ---
REGION_LIMIT = 2  # --augment_device=cuda ships a sample's region up to 2x its views' pixels (bounds loader memory)


class UnreadableImage(OSError):
    """An image file that fails to decode (truncated or corrupt): the loaders skip and count it."""


def draft_scale(boxes, sizes):
    """The largest JPEG DCT scale 1/k (k in 8, 4, 2, 1) at which every crop box (top, left, h, w) still has at
    least `size` pixels a side: no view is upsampled where the full decode would not upsample it."""
    return next((k for k in (8, 4, 2) if all(min(box[2:]) >= k * size for box, size in zip(boxes, sizes))), 1)


def draft(img, boxes, sizes):
    """Decode img (if not yet decoded) at draft_scale(boxes, sizes); returns the k it got (1: full size)."""
    k, (width, height) = draft_scale(boxes, sizes), img.size
    # Pillow sets a draft only on a JPEG still to be decoded, and picks the largest scale keeping the asked size
    drafted = k > 1 and img.format == 'JPEG' and img.draft('RGB', (width // k, height // k)) is not None
    try:
        img.load()
    except (OSError, EOFError) as e:
        raise UnreadableImage(f'{e}') from e
    return k if drafted else 1


def scale_box(box, k):
    """A box of the stored image in pixels of its 1/k decode: the whole decoded pixels that cover it."""
    top, left, h, w = box
    return top // k, left // k, -(-(top + h) // k) - top // k, -(-(left + w) // k) - left // k


def resized_crop(x, box, size):
    """(3, H, W) uint8 -> (3, size, size) uint8 on the CPU: the box (top, left, h, w) resized bicubic with antialias."""
    top, left, h, w = box
    crop = x[None, :, top:top + h, left:left + w]
    if (h, w) == (size, size):
        return crop[0].clone()
    return tnf.interpolate(crop, size=(size, size), mode='bicubic', antialias=True, align_corners=False)[0]


def covering_region(x, boxes):
    """(x's smallest region (3, h, w) holding every box, the boxes [(top, left, h, w)] in it)."""
    top, left = min(b[0] for b in boxes), min(b[1] for b in boxes)
    bottom, right = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return x[:, top:bottom, left:right], [(t - top, l - left, h, w) for t, l, h, w in boxes]


def pack_views(images, boxes, columns):
    """The workers' share of a batch (draw_for_step) in three tensors whatever the image sizes: images [[(3, H, W)
    uint8] per sample], boxes (B, 1 + A, 5) of (image in its sample, top, left, h, w), columns (B, A, K) -> 'pixels':
    every image's bytes in (H, W, 3) order, then zeros enough to read any crop's row as a window of the widest crop;
    'crops' (4, (1 + A) B, 1): each crop's first pixel, row stride (its image's width), h and w; 'photometric' (K, A B).
    Crops and columns are view-major: view v of sample b at v B + b."""
    flat = [x for sample in images for x in sample]
    sizes = torch.tensor([x.shape[1:] for x in flat])  # (M, 2)
    area = sizes.prod(1)
    image = boxes[..., 0] + torch.tensor([0] + [len(i) for i in images[:-1]]).cumsum(0)[:, None]  # (B, 1 + A)
    top, left, h, w = boxes[..., 1:].unbind(-1)
    width = sizes[image, 1]
    crops = torch.stack([(area.cumsum(0) - area)[image] + top * width + left, width, h, w])  # (4, B, 1 + A)
    tail = torch.zeros(3 * int(boxes[..., 3:].max()), dtype=torch.uint8)
    return {'pixels': torch.cat([x.permute(1, 2, 0).reshape(-1) for x in flat] + [tail]),
            'crops': crops.transpose(1, 2).reshape(4, -1, 1),
            'photometric': columns.permute(2, 1, 0).reshape(columns.shape[2], -1)}


def resize_weights(lengths, extent, size):
    """(..., size, extent) weights of torch's antialiased bicubic resize from each of `lengths` (..., 1) input pixels
    to size: Keys' cubic (a = -0.5) widened by the scale when shrinking, normalised; zero past each length."""
    n = lengths[..., None].float()  # (..., 1, 1)
    scale = n / size
    support = scale.clamp_min(1)
    x = torch.arange(0.5, extent, device=n.device)  # input pixel centres
    t = (x - constant(tuple(i + 0.5 for i in range(size)), n.device, (-1, 1)) * scale).div_(support).abs_()
    near, far = t * t * (1.5 * t - 2.5) + 1, t.clamp_(max=2)  # Keys' two pieces, |t| < 1 and 1 <= |t| < 2
    w = torch.where(far < 1, near, -0.5 * (((far - 5) * far + 8) * far - 4))
    w = torch.where(x < n, w, 0)
    return w.div_(w.sum(-1, keepdim=True))


@contextlib.contextmanager
def full_fp32_matmul():
    """float32 matmuls in full precision, whatever training set (TF32 on Ampere and later)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def resize_crops(pixels, crops, host, size):
    """(N, 3, size, size) float in [0, 1]: the crops (4, N, 1) of pack_views's pixels, on their device (host: the
    same on the CPU), resized as resized_crop does; batched off the CPU: each pass (width, then height) one bmm with
    every crop's weights, rounded and clamped to uint8 levels as the CPU's uint8 kernel rounds (within 2 levels of it:
    CUDA has no uint8 antialias kernel, and clamping once at the end would be up to 30 levels off at sharp edges)."""
    if not batched_kernels(pixels.device):  # the CPU's uint8 kernel crop by crop: the workers' own, and faster here
        return torch.stack([resized_crop(pixels.as_strided((3, h, w), (1, 3 * s, 3), 3 * f), (0, 0, h, w), size)
                            for f, s, h, w in host[..., 0].T.tolist()]).float().mul_(1 / 255)
    n, extent = crops.shape[1], int(host[2:].max())
    first, stride, h, _ = crops.unbind()  # (N, 1) each
    # (N, P) first pixel of each crop row, rows past h repeating the last (their weights are zero)
    rows = first + torch.minimum(torch.arange(extent, device=pixels.device), h - 1) * stride
    x = pixels.unfold(0, 3 * extent, 3)[rows]  # (N, P, 3 P) uint8: every crop row as a window of P pixels
    x = x.view(n, extent, extent, 3).permute(0, 1, 3, 2).to(torch.float, memory_format=torch.contiguous_format)
    w_h, w_w = resize_weights(crops[2:], extent, size).unbind()  # (N, size, P): zero past the crop's own h, w
    with full_fp32_matmul():  # TF32's 10-bit weights would move a pixel by up to 0.1 level, across roundings
        x = torch.bmm(x.view(n, 3 * extent, extent), w_w.transpose(1, 2)).round_().clamp_(0, 255)  # (N, P * 3, size)
        x = torch.bmm(w_h, x.view(n, extent, 3 * size)).round_().clamp_(0, 255)  # (N, size, 3 size)
    return x.view(n, size, 3, size).transpose(1, 2).contiguous().mul_(1 / 255)


def to_unit(x):
    """uint8 -> float in [0, 1]."""
    return x.float().mul_(1 / 255)


def to_uint8(img):
    """float in [0, 1] -> uint8, rounded."""
    return img.mul(255).round_().to(torch.uint8)


def normalize(x, mean, std):
    """(..., 3, H, W) uint8 -> float scaled to [0, 1], minus mean, over std (torchvision's ToDtype + Normalize)."""
    return standardize_(to_unit(x), mean, std)


def standardize_(img, mean, std):
    return img.sub_(constant(tuple(mean), img.device, (3, 1, 1))).div_(constant(tuple(std), img.device, (3, 1, 1)))


# --- Image: the views ---
def view_sizes(cfg):
    """Output sizes of the views, weak first then the A strong ones: [S, R, ..., R]."""
    return [cfg.image_size] + [spec['size'] for spec in strong_specs(cfg)]


class ImageViews:
    """views(pil_img, gen) -> (weak (3, S, S), [strong (3, R, R)] * A) uint8, all cut from one decoded image, every
    random draw from torch generator gen (torch's default one if None)."""

    def __init__(self, cfg):
        self.weak = dict(size=cfg.image_size, scale=(cfg.weak_min_scale, 1.0))  # recipe §3.1: crop, normalise
        self.strong = strong_specs(cfg)
        self.sizes = view_sizes(cfg)
        self.background = cfg.alpha_background

    def draw_boxes(self, img, gen=None):
        """(x (3, H, W) uint8, boxes [(top, left, h, w)] * (1 + A), [strong params] * A), every draw made: boxes drawn
        on the stored size, x decoded at the DCT scale they allow (a JPEG not decoded yet), the boxes scaled to x."""
        check_image(img)
        width, height = img.size
        boxes = [crop_box(gen, height, width, self.weak['scale'])]
        params = []
        for spec in self.strong:
            boxes.append(crop_box(gen, height, width, spec['scale']))
            params.append(draw_photometric(gen, spec))
        k = draft(img, boxes, self.sizes)
        x = v2.functional.pil_to_tensor(to_rgb(img, self.background))  # (3, H / k, W / k) uint8, for every view
        return x, [scale_box(box, k) for box in boxes], params

    def draw(self, img, gen=None):
        """The views as uint8 crops, before any photometric op: (weak, [strong] * A, [strong params] * A)."""
        x, boxes, params = self.draw_boxes(img, gen)
        weak, *strong = (resized_crop(x, box, size) for box, size in zip(boxes, self.sizes))
        return weak, strong, params

    def draw_for_step(self, img, gen=None):
        """--augment_device=cuda's worker share, cropped by the step: (images, boxes (1 + A, 5) of (image, top, left, h,
        w), photometric columns (A, K)); images: the boxes' region, or the views if it is over REGION_LIMIT x theirs."""
        x, boxes, params = self.draw_boxes(img, gen)
        columns = torch.tensor([photometric_columns(p) for p in params]).reshape(-1, len(IDENTITY))
        region, inside = covering_region(x, boxes)
        if region[0].numel() <= REGION_LIMIT * sum(size * size for size in self.sizes):
            return [region], torch.tensor([(0, *box) for box in inside]), columns
        views = [resized_crop(x, box, size) for box, size in zip(boxes, self.sizes)]
        return views, torch.tensor([(i, 0, 0, size, size) for i, size in enumerate(self.sizes)]), columns

    def __call__(self, img, gen=None):
        """(weak, [strong] * A) uint8, the step normalises them (finish_views): each strong view's photometric ops run
        in float, then round to uint8 (<= 0.5 / 255 off; torchvision on PIL images rounds after every op)."""
        weak, strong, params = self.draw(img, gen)
        finished = []
        for x, p in zip(strong, params):
            columns = torch.tensor(photometric_columns(p))[:, None]  # (K, 1): a batch of one view
            finished.append(to_uint8(finish_strong(to_unit(x[None]), columns, active_columns(columns))[0]))
        return weak, finished


def finish_views(batch, cfg, device):
    """The step's normalised (weak, [strong] * A) on device: from the workers' uint8 views or (--augment_device=cuda)
    from pack_views's pixels, crops and photometric columns, as ImageViews makes them. Batched: the same ops whatever
    the batch size; only the batch's own tensors (pinned by the loader) cross to the device, without blocking."""
    stats = cfg.image_mean, cfg.image_std
    if cfg.augment_device != 'cuda':
        weak, *strong = (normalize(x.to(device, non_blocking=True), *stats) for x in (batch['weak'], *batch['strong']))
        return weak, strong
    pixels, crops, columns = (batch[k].to(device, non_blocking=True) for k in ('pixels', 'crops', 'photometric'))
    host, n = batch['crops'], len(batch['tokens'])
    if cfg.num_augs == 0 or cfg.image_size == cfg.local_crop_size:  # one resize for all the views
        views = resize_crops(pixels, crops, host, cfg.image_size)
        weak, strong = views[:n], views[n:]
    else:
        weak = resize_crops(pixels, crops[:, :n], host[:, :n], cfg.image_size)
        strong = resize_crops(pixels, crops[:, n:], host[:, n:], cfg.local_crop_size)
    if cfg.num_augs == 0:
        return standardize_(weak, *stats), []
    strong = finish_strong(strong, columns, active_columns(batch['photometric']))
    return standardize_(weak, *stats), list(standardize_(strong, *stats).split(n))


class ToRGB:
    """to_rgb onto a given background, as a transform whose repr names it (the probe's feature cache keys on the
    transform's repr)."""

    def __init__(self, background):
        self.background = tuple(map(int, background))

    def __call__(self, img):
        return to_rgb(img, self.background)

    def __repr__(self):
        return f'ToRGB(background={self.background})'


def eval_transform(cfg):
    """Validation transform (recipe §3.1): resize the short side to S (bilinear), centre crop S, normalise."""
    # torchvision's own ops, not a Lambda: their repr names the statistics, which the probe's feature-cache key reads
    return v2.Compose([ToRGB(cfg.alpha_background), v2.PILToTensor(),
                       v2.Resize(cfg.image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                       v2.CenterCrop(cfg.image_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(cfg.image_mean, cfg.image_std)])


# --- Text: cleaning, stopwords and word tokenizer ---
def clean_text(text):
    """ftfy fix, HTML-unescape twice, collapse whitespace, lowercase (CLIP's tokenizer cleaning)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r'\s+', ' ', text).strip().lower()  # regex's Unicode \s, as CLIP's whitespace_clean


# NLTK's English stopword list as shipped with nltk 3.7 (179 words; newer nltk_data adds ~19 contractions)
STOPWORDS = frozenset("""i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their theirs themselves what which
who whom this that that'll these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through during before after above
below to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should should've now
d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn
isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't
wouldn wouldn't""".split())

# NLTK's improved Treebank tokenizer, one sentence at a time. Rules run in order; the second list runs on
# ' ' + text + ' '. Compiled with the standard re, as nltk does: the regex module's \w, \b and \s differ on
# combining marks, digits such as '²' and the separators \x1c-\x1f.
_TOKEN_RULES = [(re.compile(p, f), r) for p, f, r in [
    (r'([«“‘„]|[`]+)', 0, r' \1 '),  # starting quotes
    (r'^"', 0, r'``'),
    (r'(``)', 0, r' \1 '),
    (r'([ (\[{<])("|\'{2})', 0, r'\1 `` '),
    (r"(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", re.I, r'\1 \2'),
    (r'([^.])(\.)([\]\)}>"\'»”’ ]*)\s*$', 0, r'\1 \2 \3 '),  # punctuation
    (r'([:,])([^\d])', 0, r' \1 \2'),
    (r'([:,])$', 0, r' \1 '),
    (r'\.{2,}', 0, r' \g<0> '),
    (r'[;@#$%&]', 0, r' \g<0> '),
    (r'([^.])(\.)([\]\)}>"\']*)\s*$', 0, r'\1 \2\3 '),
    (r'[?!]', 0, r' \g<0> '),
    (r"([^'])' ", 0, r"\1 ' "),
    (r'[*]', 0, r' \g<0> '),
    (r'[\]\[\(\)\{\}<>]', 0, r' \g<0> '),  # brackets
    (r'--', 0, r' -- '),
]]
_PADDED_RULES = [(re.compile(p, f), r) for p, f, r in [
    (r'([»”’])', 0, r' \1 '),  # ending quotes
    (r"''", 0, " '' "),
    (r'"', 0, " '' "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", 0, r'\1 \2 '),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", 0, r'\1 \2 '),
    *((r'\b(' + a + ')(' + b + r')\b', re.I, r' \1 \2 ') for a, b in [  # contractions (MacIntyre)
        ('can', 'not'), ('d', "'ye"), ('gim', 'me'), ('gon', 'na'), ('got', 'ta'), ('lem', 'me'), ('more', "'n")]),
    (r"\b(wan)(na)(?=\s)", re.I, r' \1 \2 '),
    (r" ('t)(is)\b", re.I, r' \1 \2 '),
    (r" ('t)(was)\b", re.I, r' \1 \2 '),
]]


def treebank_tokenize(sentence):
    """Treebank-style word tokens of one sentence: punctuation split off, "don't" -> ['do', "n't"], quotes as ``
    and '', and only a final period split off."""
    for pattern, repl in _TOKEN_RULES:
        sentence = pattern.sub(repl, sentence)
    sentence = f' {sentence} '
    for pattern, repl in _PADDED_RULES:
        sentence = pattern.sub(repl, sentence)
    return sentence.split()


# nltk.word_tokenize first splits sentences with Punkt's English model; only the split at a period changes the
# word tokens ("it." -> "it ."). A rule-based stand-in for Punkt on captions (recipe §3.2): a word ending in a
# period, perhaps with closing quotes or brackets, ends a sentence when whitespace and a token follow, except
# after an ellipsis, after a common abbreviation (unless a capitalised sentence starter follows), after a number
# followed by a lowercase word, and after an initial followed by a lowercase word or a name.
_SENTENCE_END = re.compile(r'(\S*)\.(["\')\]}»”’]*)\s+(?=(\S+))')
_NUMBER = re.compile(r'-?[.,]?\d[\d,.-]*')
_INITIAL = re.compile(r'[^\W\d]')
_ABBREVIATIONS = frozenset("""mr mrs ms dr st jr sr prof gen sen rep inc ltd co corp vs ave ft jan feb aug sept oct
nov dec a.m p.m u.s u.k""".split())  # each one an abbreviation in Punkt's English model too
_SENTENCE_STARTERS = frozenset('the this these there they he it i if in but so some most many when while however'
                               .split())


def _ends_sentence(word, following):
    """Whether word + '.' ends a sentence when the token `following` comes next (Punkt's usual decision)."""
    word = word.lstrip('([{"\'`').lower()
    lower, upper = following[:1].islower(), following[:1].isupper()
    if word.endswith('.'):  # an ellipsis: the tokens are the same either way
        return False
    if word in _ABBREVIATIONS or word.rsplit('-', 1)[-1] in _ABBREVIATIONS:
        return upper and following.lower() in _SENTENCE_STARTERS
    if _NUMBER.fullmatch(word):
        return not lower
    if _INITIAL.fullmatch(word):  # a capitalised non-stopword is taken for a name: 'J. Smith', but 'B. The end'
        return not lower and not (upper and following.lower() not in STOPWORDS)
    return True


def word_tokenize(text):
    """nltk.word_tokenize: sentences split as Punkt would on captions, then Treebank tokens of each sentence."""
    tokens, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if _ends_sentence(m.group(1), m.group(2)[:1] or m.group(3)):  # closing marks are what Punkt sees next
            tokens += treebank_tokenize(text[start:m.end(2)])
            start = m.end()
    return tokens + treebank_tokenize(text[start:])


def remove_stopwords(text, rng, p):
    """With probability p drop the tokens whose lowercase form is a stopword; an empty result keeps text."""
    if not text.strip() or rng.random() >= p:
        return text
    return ' '.join(w for w in word_tokenize(text) if w.lower() not in STOPWORDS) or text


# --- Text: WordNet synonyms ---
_POS_FILES = {'n': 'noun', 'v': 'verb', 'a': 'adj', 'r': 'adv'}
# morphy's suffix rules, as in NLTK (including the noun rule ves -> f)
_SUFFIXES = {
    'n': [('s', ''), ('ses', 's'), ('ves', 'f'), ('xes', 'x'), ('zes', 'z'), ('ches', 'ch'), ('shes', 'sh'),
          ('men', 'man'), ('ies', 'y')],
    'v': [('s', ''), ('ies', 'y'), ('es', 'e'), ('es', ''), ('ed', 'e'), ('ed', ''), ('ing', 'e'), ('ing', '')],
    'a': [('er', ''), ('est', ''), ('er', 'e'), ('est', 'e')],
    'r': [],
}
_WORDNET_FILES = [f for name in _POS_FILES.values() for f in (f'index.{name}', f'data.{name}', f'{name}.exc')]
_CACHE_VERSION = 1  # bump when the cached table's layout or rules change


def morphy(word, pos, lemmas, exceptions):
    """WordNet base forms of a lowercase word in one part of speech (NLTK's _morphy): the exception list,
    else the word and its one-step suffix rewrites, else repeated rewrites until some form is a lemma."""
    def known(forms):
        return [f for f in dict.fromkeys(forms) if f in lemmas]

    def rewrite(forms):
        # deduplicated: NLTK's list grows exponentially on tokens like 'eseses...'; the result is the same
        return list(dict.fromkeys(f[:-len(old)] + new for f in forms for old, new in _SUFFIXES[pos] if f.endswith(old)))

    if word in exceptions:
        return known([word, *exceptions[word]])
    forms = rewrite([word])
    found = known([word] + forms)
    while forms and not found:
        forms = rewrite(forms)
        found = known(forms)
    return found


class Synonyms:
    """Read-only mapping word -> sorted WordNet synonyms (recipe §3.2), resolved on lookup through morphy
    over all parts of speech; words without synonyms are absent."""

    def __init__(self, lemmas, exceptions):
        self.lemmas, self.exceptions = lemmas, exceptions  # {pos: {lemma: names}}, {pos: {form: bases}}

    def get(self, word, default=None):
        query, found = word.lower(), set()
        for pos, lemmas in self.lemmas.items():  # nouns, verbs, adjectives, adverbs
            for form in morphy(query, pos, lemmas, self.exceptions[pos]):
                found.update(lemmas[form])
        found.discard(word)  # textaugment removes the word as given (so 'Dog' may become 'dog')
        return sorted(found) or default

    def __getitem__(self, word):
        if (found := self.get(word)) is None:
            raise KeyError(word)
        return found

    def __contains__(self, word):
        return self.get(word) is not None


def _lemma_name(name):
    """A lemma name as textaugment writes it ('_'/'-' -> space, lowercase, keep a-z and space), with spaces
    collapsed (deviation: textaugment turns '3-d' into ' d' and '10' into ''; we give 'd' and drop '')."""
    name = re.sub(r'\(.*\)$', '', name)  # adjective syntactic markers such as 'galore(ip)'
    name = name.replace('_', ' ').replace('-', ' ').lower()
    return ' '.join(re.sub('[^a-z ]', '', name).split())


def _parse_wordnet(root):
    """Parse index.*, data.* and *.exc into ({pos: {lemma: synonym names}}, {pos: {form: base forms}})."""
    def entries(file):  # the lines of a data.* or index.* file after its licence header (lines starting with spaces)
        with open(root / file, encoding='utf-8') as f:
            yield from (line for line in f if not line.startswith(' '))

    lemmas, exceptions = {}, {}
    for pos, name in _POS_FILES.items():
        names = {}  # synset offset -> cleaned lemma names
        for line in entries(f'data.{name}'):
            offset, _, _, count, rest = line.split(' ', 4)  # offset lex_file type w_cnt (word lex_id)*
            words = rest.split(' ', 2 * int(count, 16))[:2 * int(count, 16):2]
            names[offset] = [n for n in map(_lemma_name, words) if n]
        lemmas[pos] = {}
        for fields in map(str.split, entries(f'index.{name}')):  # lemma pos synset_cnt ... synset offsets last
            lemmas[pos][fields[0]] = tuple(sorted({n for o in fields[-int(fields[2]):] for n in names[o]}))
        with open(root / f'{name}.exc', encoding='utf-8') as f:
            exceptions[pos] = {w[0]: tuple(w[1:]) for w in map(str.split, f) if w}
    return lemmas, exceptions


@functools.lru_cache(maxsize=None)
def load_synonyms(wordnet_dir):
    """Synonyms from a WordNet 3.0 directory, parsed once per process and cached under ~/.cache/rocket-clip;
    None (with one warning) when the files are missing."""
    root = Path(wordnet_dir).expanduser()
    missing = [n for n in _WORDNET_FILES if not (root / n).is_file()]
    if missing:
        warnings.warn(f"WordNet 3.0 not found in {root} ({len(missing)} files missing, e.g. {missing[0]}): synonym "
                      f"replacement is skipped; run `apt-get install wordnet-base` or set --wordnet_dir", stacklevel=2)
        return None
    stats = [(n, (root / n).stat().st_size, (root / n).stat().st_mtime_ns) for n in _WORDNET_FILES]
    key = hashlib.sha1(repr((_CACHE_VERSION, str(root.resolve()), stats)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get('XDG_CACHE_HOME', '~/.cache')).expanduser() / 'rocket-clip' / f'wordnet-{key}.pkl'
    with contextlib.suppress(Exception), open(cache, 'rb') as f:  # no cache yet, or an unreadable or stale one: rebuild
        return Synonyms(*pickle.load(f))
    try:
        tables = _parse_wordnet(root)
    except (ValueError, LookupError) as e:  # includes UnicodeDecodeError, IndexError, KeyError
        raise ValueError(f"{root}: unreadable WordNet 3.0 files ({e!r}); reinstall wordnet-base or fix "
                         f"--wordnet_dir") from None
    with contextlib.suppress(OSError):  # atomic: no worker reads half a cache; a read-only home: each process rebuilds
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: pickle.dump(tables, f, protocol=pickle.HIGHEST_PROTOCOL))
    return Synonyms(*tables)


# --- Text: EDA operations (textaugment 1.3.4 defaults) ---
def synonym_replacement(text, rng, synonyms):
    """Replace every occurrence of one random non-stopword that has synonyms by one random synonym."""
    words = text.split()
    candidates = [w for w in dict.fromkeys(words) if w not in STOPWORDS]  # case-sensitive, as textaugment
    rng.shuffle(candidates)
    for word in candidates:
        options = synonyms.get(word)
        if options:
            new = rng.choice(options)
            return ' '.join(new if w == word else w for w in words)
    return ' '.join(words)


def random_swap(text, rng):
    """Swap two words at distinct random positions (j redrawn at most 3 times, else unchanged)."""
    words = text.split()
    if len(words) > 1:
        i = rng.randrange(len(words))
        for _ in range(3):
            j = rng.randrange(len(words))
            if j != i:
                words[i], words[j] = words[j], words[i]
                break
    return ' '.join(words)


def random_deletion(text, rng, p=0.1):
    """Drop each word with probability p; a one-word text is kept, an all-deleted one keeps one random word."""
    words = text.split()
    if len(words) <= 1:
        return ' '.join(words)
    kept = [w for w in words if rng.random() > p]
    return ' '.join(kept) if kept else rng.choice(words)


# --- Text: weak and strong captions ---
class TextViews:
    """views(captions, rng) -> [weak, strong_1, ..., strong_A] strings (recipe §3.2), each from its own caption draw."""

    def __init__(self, cfg):
        self.p, self.num_augs, self.clean = cfg.remove_stopwords_prob, cfg.num_augs, cfg.clean_before_augment
        self.augment = cfg.text_augment
        self.weights = (cfg.identity_prob, cfg.synonym_prob, cfg.swap_prob, cfg.deletion_prob)
        use_wordnet = cfg.text_augment and cfg.num_augs > 0 and cfg.synonym_prob > 0
        self.synonyms = load_synonyms(cfg.wordnet_dir) if use_wordnet else None

    def eda(self, text, rng):
        """One EDA operation drawn with the configured weights; an empty result keeps the input."""
        op = rng.choices(range(4), self.weights)[0]
        if not text.strip() or op == 0 or (op == 1 and self.synonyms is None):
            return text
        out = (synonym_replacement(text, rng, self.synonyms) if op == 1 else
               random_swap(text, rng) if op == 2 else random_deletion(text, rng))
        return out or text

    def __call__(self, captions, rng):
        captions = (captions,) if isinstance(captions, str) else tuple(captions) or ('',)
        if self.clean:
            captions = tuple(map(clean_text, captions))
        rows = [remove_stopwords(rng.choice(captions), rng, self.p)]
        for _ in range(self.num_augs):
            text = remove_stopwords(rng.choice(captions), rng, self.p)
            rows.append(self.eda(text, rng) if self.augment else text)
        return rows
