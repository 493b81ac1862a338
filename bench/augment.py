"""Augmentation throughput per data-loader worker: our tensor views vs the plain PIL pipeline of recipe §3.1,
and the cost of each photometric op on one view (ours vs torchvision's tensor kernels and PIL).

python -m bench.augment [--images=200] [--rounds=5] [--size=224]
One weak + two strong views per image from JPEG bytes, one process, torch.set_num_threads(1). The
--augment_device=cuda row is the workers' share only (decode + draws); the rest runs batched in the step.
"""
import io
import math
import random
import statistics
import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

import augment as A
import data as D
import torchvision.transforms.v2.functional as F
from augment import ImageViews, TextViews
from config import Config
from bench import exit_on_help

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- Reference: the official PIL pipeline (torchvision.transforms v1) ---
class PILBlur:
    """PIL Gaussian blur with radius ~ U(0.1, 2.0), as in the official code."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def reference_views(size):
    weak = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(MEAN, STD)])
    strong = T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([PILBlur()], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(MEAN, STD)])

    def views(img):
        img = img.convert('RGB')
        return weak(img), [strong(img), strong(img)]
    return views


# --- Data ---
def make_jpegs(n, seed=0):
    """Photo-like 500x375 / 375x500 JPEGs: smooth colour fields, edges and sensor noise, quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        detail = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
        img = np.asarray(Image.blend(field, detail, 0.25), dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
        out.append(buf.getvalue())
    return out


def images_per_second(views, jpegs):
    start = time.perf_counter()
    for data in jpegs:
        views(Image.open(io.BytesIO(data)))
    return len(jpegs) / (time.perf_counter() - start)


def best_us(fn, calls=200):
    """Fastest of `calls` single calls, in microseconds (the least disturbed by other jobs on a shared machine)."""
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best


def op_table(size):
    """(op, reference us, ours us) on one size x size view; in-place kernels are timed on a fresh copy."""
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=gen)
    img, pil = u8.float() / 255, Image.fromarray(u8[0].permute(1, 2, 0).numpy())
    x = u8[0].repeat(1, 2, 2).permute(1, 2, 0).contiguous().permute(2, 0, 1)  # a decoded image's (3, H, W) layout
    f, h, taps = torch.full((1, 1, 1, 1), 1.2), torch.full((1, 1, 1, 1), 0.05), torch.tensor([A.blur_taps(1.5)])
    on = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    rows = [
        ('crop 1.5x + bicubic resize (uint8)',
         lambda: F.resized_crop(x, 0, 0, size * 3 // 2, size * 3 // 2, [size, size], T.InterpolationMode.BICUBIC),
         lambda: A.resized_crop(x, (0, 0, size * 3 // 2, size * 3 // 2), size)),
        ('uint8 -> float', lambda: F.to_dtype(u8, torch.float32, scale=True), lambda: u8.float().mul_(1 / 255)),
        ('brightness', lambda: F.adjust_brightness(img, 1.2), lambda: A.blend_(img.clone(), f)),
        ('contrast', lambda: F.adjust_contrast(img, 1.2), lambda: A.blend_(img.clone(), f, mean=1 - f)),
        ('saturation', lambda: F.adjust_saturation(img, 1.2), lambda: A.blend_(img.clone(), f, grey=1 - f)),
        ('hue', lambda: F.adjust_hue(img, 0.05), lambda: A.adjust_hue(img, h)),
        ('grayscale', lambda: F.rgb_to_grayscale(img, 3), lambda: torch.where(on, A.grayscale(img), img)),
        ('blur sigma 1.5 (reference: PIL on uint8)', lambda: pil.filter(ImageFilter.GaussianBlur(1.5)),
         lambda: A.gaussian_blur(img, taps)),
        ('solarize', lambda: F.solarize(img, 128 / 255), lambda: A.solarize(img, torch.full((1, 1, 1, 1), 128 / 255))),
        ('flip', lambda: F.horizontal_flip(img), lambda: torch.where(on, img.flip(-1), img)),
        ('normalise', lambda: F.normalize(img, MEAN, STD), lambda: A.standardize_(img.clone(), MEAN, STD)),
    ]
    return [(name, best_us(ref), best_us(ours)) for name, ref, ours in rows]


def finish_rate(size, device, jpegs, batch=64, calls=5):
    """Samples/s of the step-side augment.finish_views (--augment_device=cuda) on device: a batch of the workers'
    packed regions, cropped, jittered, blurred, flipped and normalised (1 weak + 2 strong views each)."""
    cfg = Config(image_size=size, local_crop_size=size, num_augs=2, augment_device='cuda')
    views, gen = ImageViews(cfg), torch.Generator().manual_seed(0)
    images = []
    for data in (jpegs * batch)[:batch]:
        images.append(views.draw_for_step(Image.open(io.BytesIO(data)), gen))
    samples = [{'images': i, 'boxes': b, 'photometric': c, 'tokens': torch.ones(3, 5)} for i, b, c in images]
    batch_ = D.collate(samples)
    sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
    A.finish_views(batch_, cfg, torch.device(device))  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        A.finish_views(batch_, cfg, torch.device(device))
    sync()
    return batch * calls / (time.perf_counter() - start)


# --- Main ---
def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.augment [--images=200] [--rounds=5] [--size=224]')
    args = dict(a[2:].split('=', 1) for a in argv)
    n, rounds, size = int(args.get('images', 200)), int(args.get('rounds', 5)), int(args.get('size', 224))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    jpegs = make_jpegs(n)
    ours = ImageViews(Config(image_size=size, local_crop_size=size, num_augs=2))
    rows = {'reference PIL transforms v1': reference_views(size), 'augment.ImageViews (cpu)': ours,
            'workers with --augment_device=cuda': ours.draw_for_step}
    rates = {name: [] for name in rows}
    for views in rows.values():
        images_per_second(views, jpegs[:10])  # warm-up
    for _ in range(rounds):  # interleaved rounds: load changes on a shared machine hit every row alike
        for name, views in rows.items():
            rates[name].append(images_per_second(views, jpegs))
    print(f"image views (1 weak + 2 strong, {size} px, {n} JPEGs 500x375, 1 thread, median of {rounds} rounds)")
    ref = rates['reference PIL transforms v1']
    for name, ips in rates.items():
        ratio = statistics.median(a / b for a, b in zip(ips, ref))
        print(f"  {name:<36} {statistics.median(ips):7.1f} images/s  {ratio:5.2f}x the reference")

    print(f"\nper op on one {size}x{size} view, fastest of 200 calls: reference (torchvision tensor kernels) vs ours")
    for name, ref_us, ours_us in op_table(size):
        print(f"  {name:<42} {ref_us:8.1f} us {ours_us:8.1f} us  {ref_us / ours_us:5.2f}x")
    for device in ['cpu'] + ['cuda'] * torch.cuda.is_available():
        print(f"step-side finish_views (--augment_device=cuda: crops, colour, blur, flip, normalise), batch 64 on "
              f"{device}: {finish_rate(size, device, jpegs):.0f} samples/s (1 weak + 2 strong views each)")

    text = TextViews(Config(num_augs=2))
    rng = random.Random(0)
    captions = [('a brown dog runs across the grassy field near an old red barn',),
                ("two people aren't riding bikes down a busy city street at night",)] * 500
    start = time.perf_counter()
    for c in captions:
        text(c, rng)
    print(f"text views (1 weak + 2 strong): {len(captions) / (time.perf_counter() - start):.0f} captions/s")


if __name__ == '__main__':
    main(sys.argv[1:])
