"""Augmentation throughput per data-loader worker: our tensor views vs the plain PIL pipeline of SPEC.md 3.1.

python -m bench.augment [--images=200] [--rounds=5] [--size=224]
One weak + two strong views per image from JPEG bytes, one process, torch.set_num_threads(1).
"""
import io
import random
import statistics
import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from augment import ImageViews, TextViews
from config import Config

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


# --- Main ---
def main(argv):
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.augment [--images=200] [--rounds=5] [--size=224]')
    args = dict(a[2:].split('=', 1) for a in argv)
    n, rounds, size = int(args.get('images', 200)), int(args.get('rounds', 5)), int(args.get('size', 224))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    jpegs = make_jpegs(n)
    ours = ImageViews(Config(image_size=size, local_crop_size=size, num_augs=2))
    ref = reference_views(size)
    images_per_second(ours, jpegs[:10]), images_per_second(ref, jpegs[:10])  # warm-up
    ratios, ours_ips, ref_ips = [], [], []
    for _ in range(rounds):  # interleaved rounds: load changes on a shared machine hit both sides alike
        ref_ips.append(images_per_second(ref, jpegs))
        ours_ips.append(images_per_second(ours, jpegs))
        ratios.append(ours_ips[-1] / ref_ips[-1])
    print(f"image views (1 weak + 2 strong, {size} px, {n} JPEGs 500x375, 1 thread, median of {rounds} rounds)")
    print(f"  reference PIL transforms v1: {statistics.median(ref_ips):7.1f} images/s")
    print(f"  augment.ImageViews (v2):     {statistics.median(ours_ips):7.1f} images/s")
    print(f"  ratio ours / reference:      {statistics.median(ratios):7.2f}x  (goal >= 1.3x)")

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
