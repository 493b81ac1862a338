"""bench.openclipart: captions from the SVGs' metadata, symlinked duplicates and over-budget PNGs left out, a hash
split into training rows, a zero-shot ImageFolder and a retrieval CSV that evaluate.py reads."""
import csv
import hashlib
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import openclipart  # noqa: E402

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <title>{svg_title}</title>
  <metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Someone Else</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
</svg>"""


def drawing(root, rel, title='', keywords=(), svg_title='', size=(8, 8)):
    png = root / 'png' / rel
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGBA', size).save(png)
    svg = (root / 'svg' / rel).with_suffix('.svg')
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(SVG.format(title=title, svg_title=svg_title,
                              keywords=''.join(f'<rdf:li>{k}</rdf:li>' for k in keywords)))


def test_captions_split_and_sets(tmp_path):
    root, out = tmp_path / 'openclipart', tmp_path / 'out'
    drawing(root, 'animals/cat.png', 'A  cat\n', ['cat', ' ', 'animal'])
    drawing(root, 'animals/dog.png', svg_title='Dog', keywords=['dog'])  # no dc:title: the SVG's own title
    drawing(root, 'animals/blank.png')  # neither title nor keywords: left out
    drawing(root, 'animals/huge.png', 'Huge', size=(70, 70))  # over the pixel budget given below: left out
    (root / 'png' / 'people').mkdir(parents=True)
    (root / 'png' / 'people' / 'cat.png').symlink_to('../animals/cat.png')  # the same drawing again: skipped
    for i in range(200):
        drawing(root, f"{'shapes' if i % 2 else 'signs_and_symbols'}/s{i}.png", 'Star' if i < 100 else f'Sign {i}')
    summary = openclipart.build(root, out, max_pixels=64 * 64)
    with open(out / 'train.csv', newline='') as f:
        train = {r['filepath']: r['title'] for r in csv.DictReader(f)}
    with open(out / 'retrieval.csv', newline='') as f:
        retrieval = [(r['image'], r['caption']) for r in csv.DictReader(f)]
    held = [p for p in (root / 'png').rglob('*.png') if not p.is_symlink() and str(p) not in train]
    captions = {'cat.png': 'A cat. cat, animal', 'dog.png': 'Dog. dog'}
    for name, caption in captions.items():
        path = str(root / 'png' / 'animals' / name)
        assert train.get(path, caption) == caption and (path in train) != (path in map(str, held))
    assert not any('blank' in p or 'huge' in p or '/people/' in p for p in train)
    for p in (root / 'png').rglob('s*.png'):  # the documented rule: first SHA-1 byte of the relative path < 26
        rel = p.relative_to(root / 'png').as_posix()
        assert (str(p) not in train) == (hashlib.sha1(rel.encode()).digest()[0] < openclipart.HELD_OUT)
    assert summary['train'] == len(train) and summary['drawings'] == 202 and summary['over_pixel_budget'] == 1
    assert len({c for _, c in retrieval}) == len(retrieval) and all(Path(p).is_file() for p, _ in retrieval)
    assert summary['held_out'] == summary['drawings'] - summary['train'] > 0
    classes = sorted(p.name for p in (out / 'zeroshot').iterdir() if p.is_dir())
    names = (out / 'zeroshot' / 'classnames.txt').read_text().splitlines()
    assert names == [c.replace('_', ' ') for c in classes]
    linked = [p for c in classes for p in (out / 'zeroshot' / c).iterdir()]
    assert all(p.resolve().parent.name == p.parent.name for p in linked)
    assert summary['zeroshot_images'] == len(linked) > 0
    from evaluate import read_custom_set, read_retrieval_csv  # the sets as evaluate.py reads them
    images, classnames, _ = read_custom_set('zeroshot', {'path': str(out / 'zeroshot')}, None)
    assert classnames == names and len(images) == len(linked)
    images, texts, ids = read_retrieval_csv(out / 'retrieval.csv', None)
    assert texts == [c for _, c in retrieval] and len(images) == len(set(ids)) == len(retrieval)
