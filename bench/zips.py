"""Per-sample cost of reading a YFCC image from its zip archive, before and now.

python -m bench.zips [--archives=10] [--members=1000] [--reads=2000]
Writes --archives zips of --members JPEG members (as YFCC15M's images/XX/YYY.zip), then reads --reads
random members, in one process: before, with zipfile.ZipFile opened per read (what a shuffled sampler
got from a 64-archive cache: YFCC15M's images are spread over ~100k archives, so a random read
almost never hit it) and with an already-open ZipFile (a cache hit); now, with data.read_zip_member.
The decode of a 500x375 JPEG (data.open_image) is printed for scale.
"""
import io
import random
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.augment import make_jpegs
import data as D
from bench import exit_on_help


def timed(fn, jobs, rounds=3):
    """Median over rounds of the mean microseconds per job."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for job in jobs:
            fn(*job)
        times.append((time.perf_counter() - start) / len(jobs) * 1e6)
    return statistics.median(times)


def main(argv):
    exit_on_help(argv, __doc__)
    if any(not a.startswith('--') or '=' not in a for a in argv):
        sys.exit('usage: python -m bench.zips [--archives=10] [--members=1000] [--reads=2000]')
    args = dict(a[2:].split('=', 1) for a in argv)
    archives, members, reads = (int(args.get(k, d)) for k, d in (('archives', 10), ('members', 1000),
                                                                    ('reads', 2000)))
    rng = np.random.default_rng(0)
    small = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(small, 'JPEG', quality=90)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f'{a:03d}.zip' for a in range(archives)]
        for path in paths:
            with zipfile.ZipFile(path, 'w') as zf:  # stored, as JPEGs usually are
                for m in range(members):
                    zf.writestr(f'{m:03d}.jpg', small.getvalue())
        pick = random.Random(0)
        jobs = [(pick.choice(paths), f'{pick.randrange(members):03d}.jpg') for _ in range(reads)]
        opened = {path: zipfile.ZipFile(path) for path in paths}
        assert all(D.read_zip_member(p, n) == opened[p].read(n) for p, n in jobs[:50])
        rows = [('before: zipfile.ZipFile opened per read (cache miss)',
                 timed(lambda p, n: zipfile.ZipFile(p).read(n), jobs)),
                ('before: open ZipFile (cache hit, rare when shuffled)', timed(lambda p, n: opened[p].read(n), jobs)),
                ('now: read_zip_member', timed(D.read_zip_member, jobs))]
        jpeg = make_jpegs(1)[0]
        rows.append(('for scale: decode one 500x375 JPEG (open_image)', timed(lambda: D.open_image(jpeg), [()] * 200)))
    print(f"{reads} random reads from {archives} zips of {members} members of {len(small.getvalue())} bytes")
    for what, us in rows:
        print(f"  {what:<56} {us:9.1f} us per sample")
    print(f"  speed-up of a shuffled read: {rows[0][1] / rows[2][1]:.1f}x")


if __name__ == '__main__':
    main(sys.argv[1:])
