"""Peak memory of training (main process + its loader worker) with one huge, mostly flat PNG in the data.

python -m bench.pixels [--steps=8]
A CSV of 64 500x375 JPEGs, then the same with a 12000x12000 PNG (~450 KB on disk, 432 MB decoded) among them:
train.py (tiny model, 64 px, --workers=1, one epoch) at the default --max_image_pixels (the PNG is skipped as
unreadable) and with --max_image_pixels=0 (decoded in full). Peak of the summed VmRSS of the process tree, sampled
every 20 ms (pages shared by the main process and the worker count twice).
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from bench import exit_on_help

ROOT = Path(__file__).resolve().parents[1]
STEPS = next((int(a.split('=', 1)[1]) for a in sys.argv[1:] if a.startswith('--steps=')), 8)
TINY = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=64',
        '--local_crop_size=32', '--patch_size=16', '--embed_dim=16', '--mlp_hidden_dim=32', '--batch_size=8',
        '--eval_every=0', '--epochs=1', '--workers=1', '--dataset=csv', '--bad_sample_threshold=0.5',
        f'--bpe_path={ROOT / "assets" / "demo_bpe.txt.gz"}', '--overwrite']


def tree(pid):
    kids = []
    for task in Path(f'/proc/{pid}/task').glob('*'):
        try:
            kids += [int(k) for k in (task / 'children').read_text().split()]
        except OSError:
            pass
    return [pid] + [d for k in kids for d in tree(k)]


def rss(pid):
    try:
        return next(int(line.split()[1]) << 10 for line in open(f'/proc/{pid}/status') if line.startswith('VmRSS:'))
    except (OSError, StopIteration):
        return 0


def peak_rss(cmd):
    """(exit code, peak summed RSS in bytes) of cmd's process tree."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(map(rss, tree(proc.pid))))
        time.sleep(0.02)
    return proc.returncode, peak


def write_data(folder):
    rows = ['filepath,title']
    for i in range(64):
        img = Image.new('RGB', (500, 375), (4 * i, 100, 50))
        ImageDraw.Draw(img).ellipse([100, 100, 300, 300], fill=(200, 30, 30))
        img.save(folder / f'{i}.jpg', quality=90)
        rows.append(f'{i}.jpg,a photo of a red circle number {i}')
    (folder / 'small.csv').write_text('\n'.join(rows) + '\n')
    huge = Image.new('RGB', (12000, 12000), (30, 60, 90))
    ImageDraw.Draw(huge).rectangle([5000, 5000, 7000, 7000], fill=(200, 10, 10))
    huge.save(folder / 'huge.png', compress_level=9)
    (folder / 'huge.csv').write_text('\n'.join([*rows[:6], 'huge.png,a huge flat image', *rows[6:]]) + '\n')


def main(argv=None):
    exit_on_help(sys.argv[1:] if argv is None else argv, __doc__)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(folder)
        print(f"huge.png: {(folder / 'huge.png').stat().st_size:,} bytes on disk")
        for name, flags in (('64 JPEGs', ['small.csv']), ('+ huge PNG, default budget', ['huge.csv']),
                            ('+ huge PNG, --max_image_pixels=0', ['huge.csv', '--max_image_pixels=0'])):
            cmd = [sys.executable, 'train.py', *TINY, f'--max_steps={STEPS}', f'--metadata={folder / flags[0]}',
                   *flags[1:], f'--output_dir={folder / "out"}']
            status, peak = peak_rss(cmd)
            print(f"{name:36s} exit {status}, peak RSS main + worker {peak / 2**20:,.0f} MiB")


if __name__ == '__main__':
    main()
