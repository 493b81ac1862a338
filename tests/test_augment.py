"""Augmentations against recipe §3: pipeline parameters, kernels vs torchvision/PIL, text-op properties, WordNet."""
import functools
import io
import pickle
import random
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
import torchvision.transforms.v2 as v2
from hypothesis import example, given, settings, strategies as st
from PIL import Image, ImageFilter

import augment
from augment import (STOPWORDS, ImageViews, TextViews, eval_transform, random_deletion, random_swap,
                     remove_stopwords, synonym_replacement, to_rgb, word_tokenize)
from config import Config

try:  # the official tokenizer's rules, a test-only reference
    from nltk.tokenize import NLTKWordTokenizer
except ImportError:
    NLTKWordTokenizer = None

WORDNET = Path('/usr/share/wordnet')
needs_wordnet = pytest.mark.skipif(not (WORDNET / 'data.noun').is_file(), reason='WordNet 3.0 not installed')
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def solid(color, size=(40, 30), mode='RGB'):
    return Image.new(mode, size, color)


def normalised(rgb):
    """(3,) expected output of a solid uint8 colour after ToDtype + Normalize."""
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


def seeded(fn, img):
    torch.manual_seed(0)
    return fn(img)


# --- Image pipelines: parameters (recipe §3.1) ---
def test_weak_view_matches_spec():
    assert ImageViews(Config(image_size=224, weak_min_scale=0.5)).weak == dict(size=224, scale=(0.5, 1.0))


def test_strong_views_match_spec():
    cfg = Config(local_crop_size=192, num_augs=2, solarize_prob=0.3)
    strong = ImageViews(cfg).strong
    assert len(strong) == 2 and strong[0] == strong[1]
    s = strong[0]
    assert s['size'] == 192 and s['scale'] == (0.08, 1.0)
    assert s['jitter_prob'] == 0.8 and sum(s['jitter'], ()) == pytest.approx((0.6, 1.4) * 3 + (-0.1, 0.1))
    assert (s['gray_prob'], s['blur_prob'], s['sigma'], s['solarize_prob'], s['flip_prob']) == (0.2, 0.5, (0.1, 2.0),
                                                                                             0.3, 0.5)


def test_byol_views_are_asymmetric():
    a, b = ImageViews(Config(byol_augment=True, num_augs=2)).strong
    for spec, blur_p, sol_p in ((a, 1.0, 0.0), (b, 0.1, 0.2)):
        assert spec['jitter'][2] == pytest.approx((0.8, 1.2))
        assert (spec['blur_prob'], spec['solarize_prob']) == (blur_p, sol_p)


def test_eval_transform_matches_spec():
    t = eval_transform(Config(image_size=224)).transforms
    resize, crop = t[2], t[3]
    assert resize.size == [224] and resize.interpolation == v2.InterpolationMode.BILINEAR
    assert crop.size == (224, 224)


# --- Image views: outputs ---
def test_view_shapes_and_dtypes():
    weak, strong = ImageViews(Config(image_size=32, local_crop_size=24, num_augs=3))(solid((9, 99, 199), (50, 40)))
    assert weak.shape == (3, 32, 32) and weak.dtype == torch.uint8  # the step normalises (augment.finish_views)
    assert [s.shape for s in strong] == [(3, 24, 24)] * 3 and all(s.dtype == torch.uint8 for s in strong)
    assert ImageViews(Config(num_augs=0))(solid((1, 2, 3)))[1] == []


def test_weak_view_of_solid_image_is_the_normalised_colour():
    weak, _ = ImageViews(Config(image_size=16, num_augs=0))(solid((10, 128, 250), (37, 23)))
    torch.testing.assert_close(augment.normalize(weak, MEAN, STD),
                               normalised([10, 128, 250])[:, None, None].expand(3, 16, 16), atol=1e-5, rtol=0)


def test_views_are_reproducible_with_a_seed():
    views = ImageViews(Config(image_size=16, local_crop_size=16))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    (weak, strong), (weak2, strong2) = seeded(views, img), seeded(views, img)
    assert torch.equal(weak, weak2) and all(map(torch.equal, strong, strong2))
    torch.manual_seed(1)
    assert not torch.equal(views(img)[1][0], strong[0])


def test_views_and_eval_transform_pickle():  # spawn-started data-loader workers pickle the dataset
    cfg = Config(image_size=16, local_crop_size=16)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    views, evaluate = ImageViews(cfg), eval_transform(cfg)
    (weak, strong), (weak2, strong2) = seeded(views, img), seeded(pickle.loads(pickle.dumps(views)), img)
    assert torch.equal(weak, weak2) and all(map(torch.equal, strong, strong2))
    assert torch.equal(evaluate(img), pickle.loads(pickle.dumps(evaluate))(img))


def test_eval_transform_crops_the_centre():
    img = np.zeros((50, 100, 3), dtype=np.uint8)
    img[:, 25:75] = 255  # white centre square between black side bands
    out = eval_transform(Config(image_size=50))(Image.fromarray(img))  # short side already 50: no resampling
    torch.testing.assert_close(out, normalised([255] * 3)[:, None, None].expand(3, 50, 50))
    assert eval_transform(Config(image_size=20))(solid((0, 0, 0), (100, 50))).shape == (3, 20, 20)


# --- Image kernels vs PIL ---
@pytest.mark.parametrize('sigma', [0.1, 0.3, 0.7, 1.3, 2.0])
def test_gaussian_blur_is_pils_blur(sigma):
    u8 = torch.randint(0, 256, (3, 30, 41), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius=sigma))
    pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1) / 255
    out = augment.gaussian_blur(u8[None] / 255, torch.tensor([augment.blur_taps(sigma)]))[0]
    torch.testing.assert_close(out, pil, atol=3.01 / 255, rtol=0)  # PIL rounds


@pytest.mark.parametrize('sigma', [0.1, 0.7, 2.0])
def test_gaussian_blur_impulse_response_has_variance_sigma_squared(sigma):
    impulse = torch.zeros(3, 41, 41, dtype=torch.float64)
    impulse[:, 20, 20] = 1
    taps = torch.tensor([augment.blur_taps(sigma, augment.BLUR_WIDTH)])  # padded with zero taps: the same sums
    out = augment.gaussian_blur(impulse[None], taps)[0, 0]
    x = torch.arange(41, dtype=torch.float64) - 20
    assert out.sum().item() == pytest.approx(1)
    assert (out.sum(0) * x ** 2).sum().item() == pytest.approx(sigma ** 2)
    assert (out.sum(1) * x ** 2).sum().item() == pytest.approx(sigma ** 2)
    flat = torch.full((1, 3, 2, 5), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(flat, taps), flat)


# --- Bad images ---
def sixteen_bit(value):
    img = Image.new('I;16', (8, 6))
    img.frombytes(np.full((6, 8), value, dtype='<u2').tobytes())
    return img


BAD_IMAGES = {  # name: (image factory, expected RGB of its first pixel or None)
    'L': (lambda: solid(128, mode='L'), (128, 128, 128)),
    '1': (lambda: solid(1, mode='1'), (255, 255, 255)),
    'RGBA': (lambda: solid((0, 255, 0, 0), mode='RGBA'), (255, 255, 255)),  # transparent: the white background
    'LA': (lambda: solid((9, 200), mode='LA'), (62, 62, 62)),  # round((9 * 200 + 255 * 55) / 255)
    'CMYK': (lambda: solid((0, 0, 0, 0), mode='CMYK'), (255, 255, 255)),
    'YCbCr': (lambda: solid((90, 128, 128), mode='YCbCr'), None),
    'I': (lambda: solid(70000, mode='I'), (255, 255, 255)),
    'F': (lambda: solid(0.5, mode='F'), None),
    'I;16': (lambda: sixteen_bit(65535), (255, 255, 255)),
    'P': (lambda: Image.new('P', (40, 30), 3), None),
    '1x1': (lambda: solid((1, 2, 3), (1, 1)), (1, 2, 3)),
    '3x500': (lambda: solid(200, (3, 500), 'L'), (200, 200, 200)),
}


@pytest.mark.parametrize('name', BAD_IMAGES)
def test_any_mode_and_size_becomes_rgb_and_gives_views(name):
    make, pixel = BAD_IMAGES[name]
    img, rgb = make(), to_rgb(make())
    assert rgb.mode == 'RGB' and rgb.size == img.size
    assert pixel is None or rgb.getpixel((0, 0)) == pixel
    weak, strong = ImageViews(Config(image_size=16, local_crop_size=8))(img)
    assert weak.shape == (3, 16, 16) and [s.shape for s in strong] == [(3, 8, 8)] * 2
    assert eval_transform(Config(image_size=16))(img).shape == (3, 16, 16)


def test_palette_transparency_converts_without_a_warning():
    img = Image.new('P', (4, 4), 0)
    img.info['transparency'] = b'\x00'
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert to_rgb(Image.open(io.BytesIO(buf.getvalue()))).mode == 'RGB'


def test_sixteen_bit_is_rescaled_not_clipped():
    assert np.asarray(to_rgb(sixteen_bit(32896)))[0, 0].tolist() == [128, 128, 128]  # 32896 / 257 = 128
    assert np.asarray(to_rgb(sixteen_bit(65535)))[0, 0].tolist() == [255, 255, 255]


def test_unusable_images_raise_clear_errors():
    with pytest.raises(ValueError, match='empty image'):
        to_rgb(Image.new('RGB', (0, 5)))
    with pytest.raises(TypeError, match='PIL image'):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))


# --- Text: stopwords and tokenizer ---
def test_stopword_list_is_nltk_3_7():
    assert len(STOPWORDS) == 179
    assert {'i', 'me', 'my', 'myself', 'we', 'won', "won't", 'wouldn', "wouldn't", "should've", 'ma'} <= STOPWORDS
    assert not {"he'd", "i'm", "they're", 'dog'} & STOPWORDS  # added in later nltk_data; a content word


@pytest.mark.parametrize('text,tokens', [  # outputs of nltk 3.7's word_tokenize(text) (Punkt's English model)
    ("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\nThanks.",
     ['Good', 'muffins', 'cost', '$', '3.88', 'in', 'New', 'York', '.', 'Please', 'buy', 'me', 'two', 'of', 'them',
      '.', 'Thanks', '.']),
    ('Look at it. The cat sleeps', ['Look', 'at', 'it', '.', 'The', 'cat', 'sleeps']),
    ('Photo by J. Smith. All rights reserved.', ['Photo', 'by', 'J.', 'Smith', '.', 'All', 'rights', 'reserved', '.']),
    ('Mr. Brown and his dog. They live next door.',
     ['Mr.', 'Brown', 'and', 'his', 'dog', '.', 'They', 'live', 'next', 'door', '.']),
    ('old church, built in 1850. restored in 2003.',
     ['old', 'church', ',', 'built', 'in', '1850.', 'restored', 'in', '2003', '.']),
    ('Our hotel in the U.S. The room was big.', ['Our', 'hotel', 'in', 'the', 'U.S', '.', 'The', 'room', 'was', 'big', '.']),
    ('He said "go." Then he left.', ['He', 'said', '``', 'go', '.', "''", 'Then', 'he', 'left', '.']),
    ('Waiting for the bus... It never came.', ['Waiting', 'for', 'the', 'bus', '...', 'It', 'never', 'came', '.']),
    ("a 'q\u0301 b", ['a', "'", 'q\u0301', 'b']),  # the regex module's \w would take the combining mark
    ('the end.\x1c', ['the', 'end', '.']),  # ... and its \s would not take the separator \x1c
    ("They'll save and invest more.", ['They', "'ll", 'save', 'and', 'invest', 'more', '.']),
    ("hi, my name can't hello,", ['hi', ',', 'my', 'name', 'ca', "n't", 'hello', ',']),
    ('He said "hello" (twice)...', ['He', 'said', '``', 'hello', "''", '(', 'twice', ')', '...']),
    ("I cannot do it, gonna try", ['I', 'can', 'not', 'do', 'it', ',', 'gon', 'na', 'try']),
    ("a dog's toy -- nice!", ['a', 'dog', "'s", 'toy', '--', 'nice', '!']),
    ('', []),
])
def test_word_tokenize_matches_nltk(text, tokens):
    assert word_tokenize(text) == tokens


def test_remove_stopwords():
    rng = random.Random(0)
    assert remove_stopwords("The dog isn't on the beach", rng, 1.0) == "dog n't beach"
    assert remove_stopwords('it is what it is', rng, 1.0) == 'it is what it is'  # all stopwords: keep input
    assert remove_stopwords('The dog', rng, 0.0) == 'The dog'
    assert remove_stopwords('   ', rng, 1.0) == '   '
    assert remove_stopwords('Look at it. The cat sleeps', rng, 1.0) == 'Look . cat sleeps'  # sentence split first
    hits = sum(remove_stopwords('a dog', rng, 0.8) == 'dog' for _ in range(4000))
    assert abs(hits / 4000 - 0.8) < 0.03


def str_class(predicate):
    """A character class of every code point where the str predicate holds, written out for the regex module."""
    inside = [predicate(chr(c)) for c in range(0x110000)] + [False]  # inside[-1] is the edge for c = 0
    starts = [c for c in range(0x110000) if inside[c] and not inside[c - 1]]
    ends = [c for c in range(0x110000) if inside[c] and not inside[c + 1]]
    return ''.join(f'\\U{a:08x}-\\U{b:08x}' for a, b in zip(starts, ends))


@functools.lru_cache(maxsize=None)
def python_semantics_rules():
    """The tokenizer's rules for the regex module with \\w, \\d, \\s and \\b spelled out from Python's str predicates,
    which define them for the standard re: an independent engine with the character semantics nltk gets."""
    w = str_class(lambda c: c.isalnum() or c == '_')
    d, s = str_class(str.isdecimal), str_class(str.isspace)
    spelled = [('[^\\d]', f'[^{d}]'), ('\\w', f'[{w}]'), ('\\s', f'[{s}]'),
               ('\\b', f'(?:(?<=[{w}])(?![{w}])|(?<![{w}])(?=[{w}]))')]

    def port(rules):
        out = []
        for pattern, repl in rules:
            text = pattern.pattern
            for escape, cls in spelled:
                text = text.replace(escape, cls)
            assert not regex.search(r'\\[a-zA-TV-Z]', text), text  # every class escape was spelled out
            out.append((regex.compile(text, regex.I if pattern.flags & re.I else 0), repl))
        return out
    return port(augment._TOKEN_RULES), port(augment._PADDED_RULES)


def reference_treebank(sentence):
    first, padded = python_semantics_rules()
    for pattern, repl in first:
        sentence = pattern.sub(repl, sentence)
    sentence = f' {sentence} '
    for pattern, repl in padded:
        sentence = pattern.sub(repl, sentence)
    return sentence.split()


# Treebank's punctuation and contractions, and characters on which the regex module and the standard re disagree
# (combining marks, digits like '²', the separators \x1c-\x1f, case folding), alone and where the rules look
PIECES = st.sampled_from([' ', "'", '"', '.', ',', ':', '(', '«', '”', '...', 'q', 'a', 'nT', "n't", 'can', 'not',
                          'wan', 'na', "'re", '0', '_', '\u0301', 'q\u0301', '\x1c', '.\x1c', '\x1f', '\x85', '\xa0',
                          '²', 'a²', '٣', 'ſ', '\u212a', 'İ', 'ǅ'])
unicode_text = st.lists(st.one_of(PIECES, PIECES, PIECES, st.characters()), max_size=30).map(''.join)


@settings(max_examples=1000, deadline=None)
@given(unicode_text)
def test_treebank_tokenize_has_the_standard_re_semantics(text):
    assert augment.treebank_tokenize(text) == reference_treebank(text)


@pytest.mark.skipif(NLTKWordTokenizer is None, reason='nltk 3.7 (requirements-test.txt) not installed')
@settings(max_examples=1000, deadline=None)
@given(unicode_text)
def test_treebank_tokenize_matches_nltk(text):
    assert augment.treebank_tokenize(text) == NLTKWordTokenizer().tokenize(text)


def without_space_or_quote_style(text):
    """Text without spaces and quote marks: Treebank rewrites quotes (" -> `` or '') and may merge a rewritten
    quote with a neighbouring ' (the text '" gives the tokens ' and ''), so only the other characters compare."""
    return re.sub(r"[\s'\"`]", '', text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(PIECES, st.sampled_from(['. ', '.) ', '." ', 'Mr', 'J', '2010', 'The', 'the', 'U.S'])),
                max_size=30).map(''.join))
@example('\'"')  # the quote becomes '' beside a ' (found by hypothesis)
def test_word_tokenize_splits_sentences_at_periods_only(text):
    tokens = word_tokenize(text)
    assert without_space_or_quote_style(''.join(tokens)) == without_space_or_quote_style(text)
    if '.' not in text:
        assert tokens == augment.treebank_tokenize(text)


words = st.lists(st.sampled_from(['a', 'the', 'dog', 'Dog', 'red', 'on', 'café', '東京', "don't", 'x']),
                 min_size=0, max_size=12)


def is_subsequence(sub, seq):
    it = iter(seq)
    return all(w in it for w in sub)


@settings(max_examples=60, deadline=None)
@given(words, st.integers(0, 10 ** 6))
def test_remove_stopwords_drops_only_listed_words(ws, seed):
    text = ' '.join(ws)
    out, tokens = remove_stopwords(text, random.Random(seed), 1.0).split(), word_tokenize(text)
    if all(t.lower() in STOPWORDS for t in tokens):
        assert out == ws  # nothing would be left: the input is kept
    else:
        assert is_subsequence(out, tokens) and not any(t.lower() in STOPWORDS for t in out)
        assert all(t.lower() in STOPWORDS for t in (Counter(tokens) - Counter(out)))


# --- Text: EDA operations ---
@settings(max_examples=80, deadline=None)
@given(words, st.integers(0, 10 ** 6))
def test_random_swap_keeps_the_multiset(ws, seed):
    out = random_swap('  '.join(ws), random.Random(seed)).split()
    assert Counter(out) == Counter(ws)
    assert sum(a != b for a, b in zip(out, ws)) in (0, 2)


def test_random_swap_swaps_distinct_positions():
    outs = {random_swap('a b c', random.Random(s)) for s in range(200)}
    assert outs == {'b a c', 'c b a', 'a c b', 'a b c'}  # 'a b c': i == j on all three tries (rare)
    assert random_swap('one', random.Random(0)) == 'one'


@settings(max_examples=80, deadline=None)
@given(words, st.integers(0, 10 ** 6), st.sampled_from([0.1, 0.5, 1.0]))
def test_random_deletion_keeps_a_nonempty_subsequence(ws, seed, p):
    out = random_deletion(' '.join(ws), random.Random(seed), p).split()
    assert is_subsequence(out, ws) and (len(out) >= 1 or not ws)
    if len(ws) == 1:
        assert out == ws
    if p == 1.0 and len(ws) > 1:
        assert len(out) == 1  # everything deleted: one random original word comes back


FAKE = {'dog': ['hound', 'domestic dog'], 'red': ['crimson'], 'the': ['never'], 'Dog': ['pooch']}


@settings(max_examples=80, deadline=None)
@given(words, st.integers(0, 10 ** 6))
def test_synonym_replacement_changes_every_occurrence_of_one_word(ws, seed):
    out = synonym_replacement(' '.join(ws), random.Random(seed), FAKE)
    choices = {' '.join(s if w == word else w for w in ws)
               for word in set(ws) - STOPWORDS for s in FAKE.get(word, [])}
    assert out in choices if choices else out == ' '.join(ws)


# --- Text: WordNet ---
@pytest.fixture(scope='module')
def wordnet():
    return augment.load_synonyms(str(WORDNET))


@needs_wordnet
def test_wordnet_facts(wordnet):
    dog = wordnet['dog']
    assert {'domestic dog', 'canis familiaris', 'frump', 'chase'} <= set(dog) and 'dog' not in dog
    assert dog == sorted(dog) and all(set(s) <= set('abcdefghijklmnopqrstuvwxyz ') for s in dog)
    assert set(wordnet['dogs']) == set(dog) | {'dog'}  # morphy: dogs -> dog; only 'dogs' itself is removed
    assert 'give out' in wordnet['distribute'] and 'hot dog' in wordnet['hot_dog']
    assert 'the' not in wordnet and wordnet.get('xqzv') is None


@needs_wordnet
@pytest.mark.parametrize('word,pos,forms', [
    ('dogs', 'n', ['dog']), ('churches', 'n', ['church']), ('aardwolves', 'n', ['aardwolf']),
    ('abaci', 'n', ['abacus']), ('wolves', 'n', ['wolf']), ('glasses', 'n', ['glasses', 'glass']),
    ('ran', 'v', ['run']), ('book', 'a', []), ('hardrock', 'r', []), ('dogsss', 'n', ['dog']),
])
def test_morphy(wordnet, word, pos, forms):
    assert augment.morphy(word, pos, wordnet.lemmas[pos], wordnet.exceptions[pos]) == forms


@needs_wordnet
def test_synonym_replacement_uses_wordnet(wordnet):
    for seed in range(20):
        out = synonym_replacement('the dogs run', random.Random(seed), wordnet)
        assert out.startswith('the ') and out != 'the dogs run'
        new = out[4:]
        assert (new.endswith(' run') and new[:-4] in wordnet['dogs']) or \
               (new.startswith('dogs ') and new[5:] in wordnet['run'])


@needs_wordnet
def test_synonym_replacement_never_deletes_a_word(wordnet):
    # textaugment's letter filter turns lemmas such as '2' (of 'two') into '', a deletion; we drop such lemmas
    assert augment._lemma_name('2') == '' and wordnet['two'] == ['deuce', 'ii']
    outs = [synonym_replacement('two Cats sitting', random.Random(seed), wordnet).split() for seed in range(300)]
    assert all(len(out) >= 3 and out[0] in ('two', 'deuce', 'ii') for out in outs)
    assert 20 < sum(out[0] != 'two' for out in outs) < 180  # 'two' is replaced about a third of the time


@needs_wordnet
def test_wordnet_disk_cache_round_trip(tmp_path, monkeypatch, wordnet):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    augment.load_synonyms.cache_clear()
    built = augment.load_synonyms(str(WORDNET))
    assert len(list((tmp_path / 'rocket-clip').glob('wordnet-*.pkl'))) == 1
    augment.load_synonyms.cache_clear()
    cached = augment.load_synonyms(str(WORDNET))
    assert cached.lemmas == built.lemmas == wordnet.lemmas and cached.exceptions == built.exceptions


def test_missing_wordnet_warns_once_and_skips_synonyms(tmp_path):
    cfg = Config(wordnet_dir=str(tmp_path), synonym_prob=1.0, swap_prob=0.0, deletion_prob=0.0,
                 remove_stopwords_prob=0.0)
    with pytest.warns(UserWarning, match='WordNet 3.0 not found'):
        views = TextViews(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for seed in range(20):
            assert views(('a happy dog runs',), random.Random(seed)) == ['a happy dog runs'] * 3


# --- Text: weak and strong views ---
def test_text_views_rows_and_reproducibility():
    views = TextViews(Config(num_augs=2))
    rows = views(('a brown dog runs on the beach', 'two cats sleeping'), random.Random(7))
    assert len(rows) == 3 and all(isinstance(r, str) and r for r in rows)
    assert rows == views(('a brown dog runs on the beach', 'two cats sleeping'), random.Random(7))
    assert len(TextViews(Config(num_augs=0))(('x',), random.Random(0))) == 1


def test_weak_row_is_stopword_removal_with_its_own_coin():
    views = TextViews(Config(num_augs=0, remove_stopwords_prob=0.8))
    weak = Counter(views(('the dog',), random.Random(s))[0] for s in range(3000))
    assert set(weak) == {'dog', 'the dog'} and abs(weak['dog'] / 3000 - 0.8) < 0.03


def test_rows_draw_their_own_caption():
    views = TextViews(Config(num_augs=3, remove_stopwords_prob=0.0, text_augment=False))
    seen = Counter(r for s in range(300) for r in views(('aa', 'bb'), random.Random(s)))
    assert set(seen) == {'aa', 'bb'} and abs(seen['aa'] / 1200 - 0.5) < 0.06


def test_eda_operation_frequencies():
    views = TextViews(Config(num_augs=1, remove_stopwords_prob=0.0, synonym_prob=0.0, swap_prob=0.4,
                             deletion_prob=0.2, identity_prob=0.4))
    ops = Counter()
    for s in range(3000):
        out = views(('w1 w2 w3 w4 w5 w6 w7 w8',), random.Random(s))[1].split()
        ops['swap' if len(out) == 8 and out != sorted(out) else 'delete' if len(out) < 8 else 'same'] += 1
    # identity 0.4, swap 0.4, deletion 0.2 (a deletion keeping all 8 words, p = 0.9^8, counts as 'same')
    assert abs(ops['swap'] / 3000 - 0.4) < 0.03 and abs(ops['delete'] / 3000 - 0.2 * (1 - 0.9 ** 8)) < 0.03


def test_clean_before_augment():
    views = TextViews(Config(num_augs=1, remove_stopwords_prob=0.0, text_augment=False, clean_before_augment=True))
    assert views(('  A &amp;amp; B\n\tDOG ',), random.Random(0)) == ['a & b dog'] * 2


@needs_wordnet
@pytest.mark.parametrize('captions', [(), ('',), ('   \t ',), ('dog',), ('café 東京 🚀 naïve',), ('x' * 5000,),
                                      (' '.join(['big red dogs run fast'] * 2000),), 'a plain string caption'])
def test_text_views_never_crash_or_empty(captions):
    views = TextViews(Config(num_augs=2))
    for seed in range(10):
        rows = views(captions, random.Random(seed))
        assert len(rows) == 3
        source = captions if not isinstance(captions, str) else (captions,)
        if any(c.strip() for c in source):
            assert all(r.strip() for r in rows)
