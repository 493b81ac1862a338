"""Metadata memory: YFCC-style (id, title, description) held as Python objects (before) or flat arrays (now).

python -m bench.metadata [--entries=2000000] [--batches=200]
Writes a pickle of --entries YFCC-style triples (titles of 1-8 words, half the descriptions empty, the
others 5-40 words, 5% non-ASCII), then in one fresh process per layout (before: the unpickled list; now:
parsed into arrays and cached beside the pickle; now again: the cached arrays, memory-mapped): seconds to
load, bytes per entry, and the summed proportional set size (PSS, /proc/PID/smaps_rollup) of the main process and 2
DataLoader workers after their first batch and after --batches batches of 256 random entries, each entry's
id and captions read in a worker, as a training step reads them. Python objects are copied into each
worker page by page as their reference counts are written (copy-on-read), and every object the garbage
collector tracks when it runs, unless the worker froze them (data.init_worker's gc.freeze; rows without it
show what it saves); numpy arrays are shared.
"""
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from config import Config
import data as D
from bench import exit_on_help

WORDS = ('sunset beach family trip mountain lake city night street dog cat wedding party concert tree flower '
         'garden river bridge snow winter summer holiday museum church train car boat sky cloud friends kids '
         'birthday food market festival park road old new red blue green light portrait landscape').split()
ACCENTED = ('café', 'über', 'señor', '東京', 'фото', 'été', 'naïve', '北京')


def write_metadata(path, n, seed=0):
    rng = random.Random(seed)
    ids = sorted(rng.sample(range(10 ** 8), n))
    items = []
    for image_id in ids:
        words = WORDS + list(ACCENTED) if rng.random() < 0.05 else WORDS
        title = ' '.join(rng.choices(words, k=rng.randint(1, 8)))
        description = ' '.join(rng.choices(words, k=rng.randint(5, 40))) if rng.random() < 0.5 else ''
        items.append((image_id, title, description))
    with open(path, 'wb') as f:
        pickle.dump(items, f, protocol=4)
    return sum(len(t.encode()) + len(d.encode()) for _, t, d in items)


def pss_mb(pids):
    total = 0
    for pid in pids:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            total += next(int(line.split()[1]) for line in f if line.startswith('Pss:'))
    return total / 1024


def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


class Touch(torch.utils.data.Dataset):
    """Reads entry i's id and captions, as a training sample does (no image)."""

    def __init__(self, get, n):
        self.get, self.n = get, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image_id, captions = self.get(i)
        return torch.tensor([int(image_id) % 1000, sum(map(len, captions))])


class Old:
    """The reference layout: the unpickled list of (id, title, description) tuples."""

    def __init__(self, items):
        self.items = items

    def __call__(self, i):
        image_id, title, description = self.items[i]
        return image_id, (title, description)


class New:
    def __init__(self, reader):
        self.reader = reader

    def __call__(self, i):
        return self.reader.ids[i], self.reader.captions[i]


def child(layout, path, batches, freeze):
    base = rss_mb()
    t = time.perf_counter()
    if layout == 'old':
        with open(path, 'rb') as f:
            get = Old(pickle.load(f))
        n, nbytes = len(get.items), None
    else:
        folder = str(Path(path).parent)
        reader = D.read_yfcc(Config(dataset='yfcc15m', metadata=path, root=folder, output_dir=folder))
        get, n = New(reader), len(reader)
        nbytes = reader.ids.nbytes + reader.captions.data.nbytes + reader.captions.offsets.nbytes
    seconds = time.perf_counter() - t
    grown = rss_mb() - base
    order = torch.randint(n, (batches * 256,), generator=torch.Generator().manual_seed(0)).tolist()
    loader = torch.utils.data.DataLoader(Touch(get, n), 256, sampler=order, num_workers=2,
                                         worker_init_fn=D.init_worker if freeze else None)
    it = iter(loader)
    next(it)
    pids = [os.getpid(), *(w.pid for w in it._workers)]
    start = pss_mb(pids)
    for _ in range(batches - 1):
        next(it)
    end = pss_mb(pids)  # before the iterator ends: its workers exit then
    print(json.dumps({'seconds': seconds, 'rss_growth_mb': grown, 'nbytes': nbytes, 'n': n, 'start': start,
                      'end': end}))


def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.metadata [--entries=2000000] [--batches=200]')
    args = dict(a[2:].split('=', 1) for a in argv)
    if 'child' in args:
        return child(args['child'], args['path'], int(args['batches']), args['freeze'] == '1')
    n, batches = int(args.get('entries', 2_000_000)), int(args.get('batches', 200))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'yfcc.pkl'
        raw = write_metadata(path, n)
        rows = {}
        # 'new' parses the pickle and caches the arrays beside it; 'cached' maps them
        for layout, freeze in (('old', 0), ('old', 1), ('new', 1), ('cached', 1), ('cached', 0)):
            out = subprocess.run([sys.executable, '-m', 'bench.metadata', f'--child={layout}', f'--path={path}',
                                  f'--batches={batches}', f'--freeze={freeze}'], capture_output=True, text=True,
                                 check=True)
            rows[layout, freeze] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{n:,} YFCC-style entries, raw UTF-8 {raw / n:.1f} bytes per entry (title + description); "
          f"main + 2 workers, {batches} batches of 256 random entries")
    for (layout, freeze), r in rows.items():
        what = {'old': 'before: list of tuples', 'new': 'now: arrays, first run', 'cached': 'now: arrays, cached'}[
            layout] + ('' if freeze else ', no gc.freeze')
        size = r['nbytes'] if r['nbytes'] is not None else r['rss_growth_mb'] * 2 ** 20
        print(f"  {what:<38} load {r['seconds']:6.2f} s  {size / n:6.1f} bytes/entry "
              f"({'array bytes' if r['nbytes'] else 'RSS growth'}, raw + {size / n - raw / n:.1f})  "
              f"PSS at start {r['start']:7.1f} MB, after {batches} batches {r['end']:7.1f} MB "
              f"(+{r['end'] - r['start']:.1f})")


if __name__ == '__main__':
    main(sys.argv[1:])
