"""The Open Clip Art Library as Debian ships it (openclipart-png, openclipart-svg) made into a captioned data set for
`train.py --dataset=csv`, with held-out drawings for zero-shot classification and retrieval.

    python -m bench.openclipart --out=/work/data/openclipart [--root=/usr/share/openclipart]

Rule. A drawing is a regular file under ROOT/png (a symlink repeats a drawing in another category and is skipped);
its caption is "<title>. <keywords>" from the SVG with the same relative path: the title is the Dublin Core title of
the work (dc:title in cc:Work), else the SVG's <title>; the keywords are the dc:subject rdf:li entries, blank ones
dropped, joined by ", "; whitespace is collapsed, and a drawing with neither title nor keywords is left out, as is
one whose PNG is over train.py's pixel budget (--max_image_pixels: train.py would skip it as unreadable, and PIL
refuses the largest outright). Its category is the first folder of its path. The drawing is held out when the first
byte of the SHA-1 of its relative PNG path is below 26 (about 10%). Written to OUT:

- train.csv: filepath,title of every drawing not held out (absolute PNG paths);
- zeroshot/<category>/: links to the held-out PNGs of every category with at least MIN_CLASS of them, and
  classnames.txt (the folder names with '_' read as a space), for `--datasets=folder:OUT/zeroshot`;
- retrieval.csv: image,caption of one held-out drawing per distinct caption, the first in path order (a caption
  shared by two images has no single right image), for `--retrieval=OUT/retrieval.csv`;
- summary.json: the counts.
"""
import argparse
import collections
import csv
import hashlib
import io
import json
import re
import shutil
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import Config, atomic_write  # noqa: E402

NS = {'dc': 'http://purl.org/dc/elements/1.1/', 'cc': 'http://web.resource.org/cc/',
      'rdf': 'http://www.w3.org/1999/02/22-rdf-syntax-ns#', 'svg': 'http://www.w3.org/2000/svg'}
HELD_OUT = 26  # of 256: first SHA-1 byte below it
MIN_CLASS = 4  # held-out drawings a category needs to be a zero-shot class


def words(text):
    return ' '.join((text or '').split())


def svg_caption(path):
    """'<title>. <keywords>' of an SVG ('' when it has neither)."""
    root = ET.parse(path).getroot()
    work = root.find('.//cc:Work', NS)
    title = words(work.findtext('dc:title', '', NS) if work is not None else '') or \
        words(root.findtext('svg:title', '', NS))
    keywords = ', '.join(filter(None, (words(li.text) for li in root.findall('.//dc:subject/rdf:Bag/rdf:li', NS))))
    return '. '.join(filter(None, (title, keywords)))


def png_pixels(path):
    """Width x height from a PNG's header."""
    with open(path, 'rb') as f:
        head = f.read(24)
    width, height = struct.unpack('>II', head[16:24])
    return width * height


def held_out(rel):
    return hashlib.sha1(rel.encode()).digest()[0] < HELD_OUT


def drawings(root, max_pixels):
    """(relative path, PNG path, category, caption) of every drawing, in path order; and the count over budget."""
    found, over = [], 0
    for png in sorted((root / 'png').rglob('*.png')):
        if png.is_symlink():
            continue
        rel = png.relative_to(root / 'png').as_posix()
        if max_pixels and png_pixels(png) > max_pixels:
            over += 1
            continue
        caption = svg_caption((root / 'svg' / rel).with_suffix('.svg'))
        if caption:
            found.append((rel, png, rel.split('/')[0], caption))
    return found, over


def write_csv(path, header, rows):
    text = io.StringIO()
    csv.writer(text, lineterminator='\n').writerows([header, *rows])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def build(root, out, max_pixels=Config.max_image_pixels):
    """Write the data set into out (see the module's docstring); returns the summary."""
    root, out = Path(root), Path(out)
    items, over = drawings(root, max_pixels)
    train = [d for d in items if not held_out(d[0])]
    test = [d for d in items if held_out(d[0])]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / 'train.csv', ['filepath', 'title'], [(str(png), caption) for _, png, _, caption in train])
    per_class = collections.Counter(category for _, _, category, _ in test)
    classes = sorted(c for c, n in per_class.items() if n >= MIN_CLASS)
    shutil.rmtree(out / 'zeroshot', ignore_errors=True)
    (out / 'zeroshot').mkdir()
    for rel, png, category, _ in test:
        if category in classes:
            link = out / 'zeroshot' / category / re.sub(r'[/]', '__', rel)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(png)
    names = '\n'.join(c.replace('_', ' ') for c in classes) + '\n'
    atomic_write(out / 'zeroshot' / 'classnames.txt', lambda f: f.write(names.encode()))
    first = {}  # caption -> its first held-out image
    for _, png, _, caption in test:
        first.setdefault(caption, str(png))
    pairs = [(png, caption) for caption, png in first.items()]
    write_csv(out / 'retrieval.csv', ['image', 'caption'], pairs)
    captions = collections.Counter(caption for *_, caption in train)
    top, top_count = captions.most_common(1)[0]
    summary = {'drawings': len(items), 'over_pixel_budget': over, 'train': len(train), 'held_out': len(test),
               'zeroshot_images': sum(per_class[c] for c in classes), 'zeroshot_classes': len(classes),
               'majority_class': max(classes, key=per_class.__getitem__),
               'majority_percent': 100 * max(per_class[c] for c in classes) / sum(per_class[c] for c in classes),
               'retrieval_pairs': len(pairs), 'train_distinct_captions': len(captions),
               'train_top_caption': top, 'train_top_caption_percent': 100 * top_count / len(train)}
    atomic_write(out / 'summary.json', lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m bench.openclipart', description=__doc__.split('\n\n')[0])
    p.add_argument('--root', default='/usr/share/openclipart', help='holding png/ and svg/ (Debian openclipart-*)')
    p.add_argument('--out', required=True, help='folder to write train.csv, zeroshot/, retrieval.csv into')
    a = p.parse_args(argv)
    if not (Path(a.root) / 'png').is_dir() or not (Path(a.root) / 'svg').is_dir():
        sys.exit(f"error: {a.root} has no png/ and svg/ folders; apt-get install openclipart-png openclipart-svg")
    for k, v in build(a.root, a.out).items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == '__main__':
    main()
