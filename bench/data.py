"""Training-sample throughput per data-loader worker and where the time goes.

python -m bench.data [--images=200] [--rounds=3]
The full CL2L sample (recipe §4.3): read + decode a JPEG, 1 weak + 2 strong views at 224 px, 3 caption views,
3 tokenisations, from a CSV over a temp folder of 500x375 JPEGs, in one process with one thread (= one worker).
The same with --augment_device=cuda (the workers' share), the built-in demo dataset at the tiny model's 64 px, and
a 2-worker DataLoader for the overhead of batching.
"""
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.augment import make_jpegs
from config import Config
import data as D

CLIP_VOCAB = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
WORDS = ('a the brown dog runs across grassy field near an old red barn two people riding bikes down busy city '
         'street at night woman holding umbrella in rain view of mountains from window plate with food').split()


def per_second(fn, n):
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def breakdown(dataset, n, rounds):
    """Median samples/s of the whole sample and of each stage on its own."""
    make = dataset.make_sample
    images = [dataset.reader.load(i) for i in range(n)]
    for image, _ in images:
        image.load()  # decoded once here: the image-views stage then times crops and colour ops only
    texts = [make.text_views(captions, random.Random(i)) for i, (_, captions) in enumerate(images)]
    views = make.image_views.draw if make.defer else make.image_views  # cuda: crops and draws only
    stages = {
        'full sample': lambda i: dataset[(0, i)],
        '  read + decode': lambda i: dataset.reader.load(i)[0].load(),
        '  image views (1 weak + 2 strong)': lambda i: views(images[i][0]),
        '  text views (3 captions)': lambda i: make.text_views(images[i][1], random.Random(i)),
        '  tokenise (3 captions)': lambda i: make.tokenizer(texts[i]),
    }
    per_second(stages['full sample'], min(n, 10))  # warm-up
    return {name: statistics.median(per_second(fn, n) for _ in range(rounds)) for name, fn in stages.items()}


def report(title, rates):
    print(title)
    total = 1 / rates['full sample']
    for name, rate in rates.items():
        share = '' if name == 'full sample' else f'  {100 / rate / total:5.1f}% of a sample'
        print(f"  {name:<36} {rate:8.1f} samples/s  {1000 / rate:6.2f} ms{share}")
    rest = total - sum(1 / rate for name, rate in rates.items() if name != 'full sample')
    print(f"  {'  rest (seeding, cache misses, noise)':<36} {'':>19}  {1000 * rest:6.2f} ms  {100 * rest / total:5.1f}%")


def main(argv):
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.data [--images=200] [--rounds=3]')
    args = dict(a[2:].split('=', 1) for a in argv)
    n, rounds = int(args.get('images', 200)), int(args.get('rounds', 3))
    torch.set_num_threads(1)
    bpe = str(CLIP_VOCAB) if CLIP_VOCAB.is_file() else ''
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(make_jpegs(n)):
            (Path(tmp) / f'{i}.jpg').write_bytes(data)
        rows = [f'{i}.jpg,{" ".join(rng.choices(WORDS, k=rng.randint(6, 16)))}' for i in range(n)]
        (Path(tmp) / 'train.csv').write_text('filepath,title\n' + '\n'.join(rows) + '\n')
        cfg = Config(dataset='csv', metadata=str(Path(tmp) / 'train.csv'), image_size=224, local_crop_size=224,
                     num_augs=2, bpe_path=bpe or str(D.DEMO_BPE_PATH),
                     workers=0, batch_size=32)
        tokenizer = D.build_tokenizer(cfg)
        loader = D.build_train_loader(cfg, tokenizer)
        report(f"CSV of {n} JPEGs (500x375), 224 px, {'CLIP' if bpe else 'demo'} vocabulary, 1 thread, "
               f"median of {rounds} rounds", breakdown(loader.dataset, n, rounds))
        deferred = D.build_train_loader(Config(**{**cfg.__dict__, 'augment_device': 'cuda'}), tokenizer)
        report("\nthe same with --augment_device=cuda (workers crop and draw; colour, blur, flip run in the step)",
               breakdown(deferred.dataset, n, rounds))

        demo = Config(workers=0, batch_size=32)
        report(f"\ndemo dataset, {demo.image_size} px (drawn at {D.demo_canvas(demo)} px), demo vocabulary",
               breakdown(D.build_train_loader(demo, D.build_tokenizer(demo)).dataset, n, rounds))

        loader = D.build_train_loader(Config(**{**cfg.__dict__, 'workers': 2}), tokenizer)
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch['weak'])
        rate = count / (time.perf_counter() - start)
        print(f"\nDataLoader, 2 workers, batch 32, CSV at 224 px: {rate:.1f} samples/s (worker start-up included)")


if __name__ == '__main__':
    main(sys.argv[1:])
