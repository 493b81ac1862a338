"""Zero-shot evaluation throughput and where the time goes, to size evaluate.py's --workers.

python -m bench.zeroshot [--images=240] [--classes=8] [--model=vit_b16] [--batch=32] [--workers=0,2] [--device=cpu]
A generated ImageNet-layout folder (val/<wnid>/*.JPEG) of photo-like 500x375 / 375x500 JPEGs, a randomly
initialised model at 224 px, fp32. Measures, in one process: read + decode and the eval transform alone (one
process = one loader worker), the image encoder alone on ready tensors, the class embeddings (80 ImageNet
templates a class), and evaluate() end to end for each --workers value. Shares are those of a serial pipeline
(--workers=0); the workers needed to keep the model fed = model rate / (decode + transform) rate of one worker.
"""
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import evaluate as E
from bench.augment import make_jpegs
from config import resolve
from bench import exit_on_help

CLIP_VOCAB = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'


def make_imagenet_folder(root, images, classes):
    """root/imagenet/val/<wnid>/<i>.JPEG, the images dealt round-robin over the classes."""
    for i, data in enumerate(make_jpegs(images)):
        folder = root / 'imagenet' / 'val' / f'n{i % classes:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{i}.JPEG').write_bytes(data)


def rate(fn, n):
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit(__doc__.splitlines()[2])
    args = dict(a[2:].split('=', 1) for a in argv)
    n, classes, batch = int(args.get('images', 240)), int(args.get('classes', 8)), int(args.get('batch', 32))
    workers = [int(w) for w in args.get('workers', '0,2').split(',')]
    device = torch.device(args.get('device', 'cpu'))
    bpe = str(CLIP_VOCAB) if CLIP_VOCAB.is_file() else ''
    cfg = resolve({'model': args.get('model', 'vit_b16'), 'dataset': 'csv', 'bpe_path': bpe}, verbose=False)
    cfg.eval_batch_size, cfg.precision, cfg.device = batch, 'fp32', device.type
    tokenizer = E.build_tokenizer(cfg)
    torch.manual_seed(0)
    model = E.build_model(cfg, tokenizer.vocab_size).to(device).eval()
    names = [f'class {i}' for i in range(classes)]
    labels, templates = {'imagenet': names}, {'imagenet': E.read_json(E.ASSETS / 'templates.json', 't')['imagenet']}
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    print(f"ImageNet layout: {n} JPEGs (500x375), {classes} classes; {cfg.model} (random init), {cfg.image_size} px, "
          f"batch {batch}, {device.type} fp32, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        make_imagenet_folder(Path(tmp), n, classes)
        dataset = E.build_dataset('imagenet', Path(tmp) / 'imagenet', E.eval_transform(cfg), names)
        [dataset[i] for i in range(min(n, 16))]  # warm-up: page cache, allocator
        decoded = []
        decode = rate(lambda: decoded.extend(E.decode_image(p) for p in dataset.images), n)
        transform = rate(lambda: [dataset.transform(img) for img in decoded], n)
        x = torch.stack([dataset[i][0] for i in range(batch)]).to(device)
        rounds = max(1, n // batch)

        def encode_batches():
            for _ in range(rounds):
                model.encode_image_heads(x)
            sync()

        with torch.no_grad():
            model.encode_image_heads(x)  # warm-up
            encode = rate(encode_batches, rounds * batch)
            start = time.perf_counter()
            E.class_embeddings(model, tokenizer, names, templates['imagenet'], device)
            sync()
            per_class = (time.perf_counter() - start) / classes
        serial = 1 / decode + 1 / transform + 1 / encode
        for what, r in (('read + JPEG decode, 1 process', decode), ('eval transform, 1 process', transform),
                        ('image encoder, ready tensors', encode)):
            print(f"  {what:<40}{r:9.1f} images/s  {1000 / r:7.2f} ms/image  {100 / r / serial:5.1f} % of a "
                  f"serial pipeline (--workers=0)")
        per_worker = 1 / (1 / decode + 1 / transform)
        print(f"  {'workers to keep the model fed':<40}{math.ceil(encode / per_worker):9d}   (model rate / "
              f"{per_worker:.1f} images/s a worker)")
        print(f"  {'class embeddings, 80 templates':<40}{per_class:9.2f} s a class -> {1000 * per_class:.0f} s "
              f"for ImageNet's 1000 (once per checkpoint)")
        for w in workers:
            cfg.workers = w
            start = time.perf_counter()
            results = E.evaluate(model, tokenizer, cfg, datasets=['imagenet'], catalog={'imagenet': Path(tmp) /
                                 'imagenet'}, labels=labels, templates=templates)
            seconds = time.perf_counter() - start - classes * per_class
            print(f"  evaluate(), --workers={w:<22}{results['imagenet']['images'] / seconds:9.1f} images/s "
                  f"(class embeddings excluded)")


if __name__ == '__main__':
    main(sys.argv[1:])
