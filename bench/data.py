"""Training-sample throughput per data-loader worker and where the time goes.

python -m bench.data [--images=200] [--rounds=3] [--code=DIR]
The full CL2L sample (recipe §4.3): read + decode a JPEG, 1 weak + 2 strong views at 224 px, 3 caption views,
3 tokenisations, from a CSV over a temp folder of 500x375 JPEGs, in one process with one thread (= one worker),
and the collate that batches them. The same with --augment_device=cuda (the workers' share), the built-in demo
dataset at the tiny model's 64 px, and a 2-worker DataLoader for the hand-over to the main process.
--code=DIR: the first row only, timing the config/data/augment modules of another checkout (e.g. an earlier
commit: `git worktree add DIR COMMIT`); run it and this one in turns for a before/after ratio.
"""
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CODE = next((a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--code=')), None)
if CODE:
    sys.path.insert(0, CODE)  # config, data and augment come from that checkout
from bench.augment import make_jpegs  # noqa: E402
from config import Config  # noqa: E402
import data as D  # noqa: E402
from bench import exit_on_help  # noqa: E402

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
    views = make.image_views.draw_for_step if getattr(make, 'defer', False) else make.image_views  # cuda: the draws
    stages = {
        'full sample': lambda i: dataset[(0, i)],
        '  read + decode': lambda i: dataset.reader.load(i)[0].load(),
        '  image views (1 weak + 2 strong)': lambda i: views(images[i][0]),
        '  text views (3 captions)': lambda i: make.text_views(images[i][1], random.Random(i)),
        '  tokenise (3 captions)': lambda i: make.tokenizer(texts[i]),
    }
    per_second(stages['full sample'], min(n, 10))  # warm-up
    rates = {name: statistics.median(per_second(fn, n) for _ in range(rounds)) for name, fn in stages.items()}
    samples = [dataset[(0, i)] for i in range(n - n % 32)]
    collate = getattr(D, 'collate', torch.utils.data.default_collate)  # older checkouts: the default
    batches = len(samples) // 32  # collate mutates its samples: each call gets fresh dicts
    rates['collate (batches of 32)'] = 32 * statistics.median(per_second(
        lambda b: collate([dict(s) for s in samples[32 * b:32 * (b + 1)]]), batches) for _ in range(rounds))
    return rates


def report(title, rates):
    """The stages' rates and shares of a sample, then the per-core rate with the collate (what a worker does)."""
    print(title)
    rates = dict(rates)
    collate = rates.pop('collate (batches of 32)')
    total = 1 / rates['full sample']
    for name, rate in rates.items():
        share = '' if name == 'full sample' else f'  {100 / rate / total:5.1f}% of a sample'
        print(f"  {name:<36} {rate:8.1f} samples/s  {1000 / rate:6.2f} ms{share}")
    rest = total - sum(1 / rate for name, rate in rates.items() if name != 'full sample')
    print(f"  {'  rest (seeding, cache misses, noise)':<36} {'':>19}  {1000 * rest:6.2f} ms  "
          f"{100 * rest / total:5.1f}%")
    print(f"  {'collate (batches of 32)':<36} {collate:8.1f} samples/s  {1000 / collate:6.2f} ms")
    print(f"  {'per core: sample + collate':<36} {1 / (total + 1 / collate):8.1f} samples/s")


def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.data [--images=200] [--rounds=3]')
    args = dict(a[2:].split('=', 1) for a in argv)
    if CODE:
        print(f"config, data, augment from {CODE}")
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
        if CODE:
            return
        deferred = D.build_train_loader(Config(**{**cfg.__dict__, 'augment_device': 'cuda'}), tokenizer)
        report("\nthe same with --augment_device=cuda (workers decode and draw; crops, colour, blur, flip run in the "
               "step)", breakdown(deferred.dataset, n, rounds))

        demo = Config(workers=0, batch_size=32)
        report(f"\ndemo dataset, {demo.image_size} px (drawn at {D.demo_canvas(demo)} px), demo vocabulary",
               breakdown(D.build_train_loader(demo, D.build_tokenizer(demo)).dataset, n, rounds))

        print()
        for device in ('cpu', 'cuda'):  # collate (stacking or packing) and the hand-over to the main process included
            loader = D.build_train_loader(Config(**{**cfg.__dict__, 'workers': 2, 'augment_device': device}),
                                          tokenizer)
            start, count, nbytes = time.perf_counter(), 0, 0
            for batch in loader:
                count += len(batch['tokens'])
                nbytes += sum(t.numel() * t.element_size() for t in [batch.get('weak'), batch.get('pixels'),
                                                                      *batch.get('strong', [])] if t is not None)
            rate = count / (time.perf_counter() - start)
            print(f"DataLoader, 2 workers, batch 32, CSV at 224 px, --augment_device={device}: {rate:.1f} samples/s "
                  f"(worker start-up included), {nbytes / count / 1e3:.0f} kB of images per sample")


if __name__ == '__main__':
    main(sys.argv[1:])
