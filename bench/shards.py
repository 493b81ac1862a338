"""Start-up time of tar shards: from the call that builds the training loader to its first batch.

python -m bench.shards [--shards=1000] [--samples=100]
Writes --shards tar shards of --samples samples (jpg + txt + json, as img2dataset writes) into a temp folder,
then times, in this process with one rank: a serial header scan of every shard (the reference), the first
run (no index: the scan runs once, on all CPUs), a cached run (one stat per shard), a first run with
img2dataset's NNNNN_stats.json files, and the same for 10 shards: seconds until build_train_loader returns,
and until the first batch (32 tiny images; it waits for the 1,000-sample shuffle buffer, whatever the count).
"""
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

from config import Config
import data as D
from bench import exit_on_help


def write_shards(folder, shards, samples):
    """img2dataset-style shards: key.jpg, key.txt, key.json per sample."""
    buf = io.BytesIO()
    Image.new('RGB', (16, 16), (200, 80, 30)).save(buf, 'JPEG')
    image = buf.getvalue()
    for s in range(shards):
        with tarfile.open(folder / f'{s:05d}.tar', 'w') as tar:
            for j in range(samples):
                key = f'{s:05d}{j:04d}'
                for ext, payload in (('jpg', image), ('txt', f'caption {key}'.encode()), ('json', b'{}')):
                    info = tarfile.TarInfo(f'{key}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def tarfile_count(path):
    """The reference count: sample keys of a shard through tarfile."""
    with tarfile.open(path) as tar:
        return len({D.member_key(m.name)[0] for m in tar if m.isfile()})


def start(cfg, tokenizer):
    """Seconds from build_train_loader to the loader being ready, and to its first batch."""
    t = time.perf_counter()
    loader = D.build_train_loader(cfg, tokenizer)
    ready = time.perf_counter() - t
    next(iter(loader))
    return ready, time.perf_counter() - t


def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.shards [--shards=1000] [--samples=100]')
    args = dict(a[2:].split('=', 1) for a in argv)
    n, samples = int(args.get('shards', 1000)), int(args.get('samples', 100))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for count in (10, n):
            folder = tmp / f'{count}'
            folder.mkdir()
            write_shards(folder, count, samples)
            shards = [str(folder / f'{s:05d}.tar') for s in range(count)]
            cfg = Config(dataset='wds', metadata=str(folder / f'{{00000..{count - 1:05d}}}.tar'), workers=0,
                         batch_size=32, image_size=8, local_crop_size=8, bpe_path=str(D.DEMO_BPE_PATH),
                         output_dir=str(tmp / 'out'))
            tokenizer = D.build_tokenizer(cfg)
            D.SampleMaker(cfg, tokenizer)  # one-time set-up of the views, outside the timings
            t = time.perf_counter()
            old = sum(tarfile_count(s) for s in shards)  # the reference start-up: every shard's headers, serially
            rows.append((count, 'old: serial header scan, every start', (time.perf_counter() - t, None)))
            assert old == count * samples
            rows.append((count, 'first run: scan on all CPUs, index written', start(cfg, tokenizer)))
            rows.append((count, 'cached run: one stat per shard', start(cfg, tokenizer)))
            (folder / D.SHARD_INDEX).unlink()
            for s in range(count):
                (folder / f'{s:05d}_stats.json').write_text(json.dumps({'count': samples, 'successes': samples}))
            rows.append((count, 'first run with img2dataset stats files', start(cfg, tokenizer)))
        scans = []
        for what, count in (('tarfile (before)', tarfile_count), ('data.scan_keys (now)', D.count_samples)):
            t = time.perf_counter()
            for s in shards[:100]:
                count(s)
            scans.append((what, (time.perf_counter() - t) / (min(n, 100) * samples * 3)))
    cpus = len(os.sched_getaffinity(0))
    print(f"{n} and 10 tar shards of {samples} samples (3 members each), {cpus} CPUs, one rank")
    print(f"  {'':12} {'':42} {'loader ready':>14} {'per shard':>12} {'first batch':>12}")
    for count, what, (ready, first) in rows:
        print(f"  {count:5d} shards {what:<42} {ready:12.3f} s {1000 * ready / count:9.3f} ms "
              f"{f'{first:10.3f} s' if first else ''}")
    for what, per in scans:
        print(f"header scan, {what}: {1e6 * per:.1f} us per tar member -> a CC12M shard of 10k samples x 3 "
              f"members ~{3e4 * per:.2f} s, ~1,100 shards ~{1100 * 3e4 * per / 60:.1f} min on one core")


if __name__ == '__main__':
    main(sys.argv[1:])
