"""data.py tokenizer: CLIP's ids with the standard merges, BPE vs naive references, round trips, bad input."""
import gzip
import pickle
import random
import re
import string
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import data
from augment import clean_text
from config import UserError
from data import Tokenizer, learn_bpe, save_merges

CLIP_VOCAB = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
CAPTIONS = [
    'A dog runs across the grassy field.', 'Two people riding bikes down a busy city street at night!',
    "A woman's umbrella in the rain", 'View of the mountains from a window, 2019', 'a plate with food &amp; drinks',
    'Café in Paris — crème brûlée', '東京の夜景 and a tower', 'happy birthday 🎂🎉 to you', 'Ünïcödé TEXT    spaced\tout',
    'Fish & chips at the beach', "it's 3.14 o'clock, isn't it?", 'Москва зимой', 'مرحبا بالعالم', 'x' * 300,
]
_rng = random.Random(0)
_WORDS = [''.join(_rng.choices(['ka', 'lo', 'mi', 'nu', 'pe', 'ra', 'st', 'th', 'ing'], k=_rng.randint(1, 4)))
          for _ in range(300)]
CORPUS = ([f'{c} {i % 7}' for i in range(20) for c in CAPTIONS]
          + [' '.join(_rng.choices(_WORDS, k=8)) for _ in range(200)])  # pseudo-words: pairs for 500 merges
texts = st.text(st.characters(blacklist_categories=('Cs',)), max_size=60)  # any text but lone surrogates


@pytest.fixture(scope='module')
def standard():
    if not CLIP_VOCAB.is_file():
        pytest.skip(f'standard merges file not at {CLIP_VOCAB}')
    return Tokenizer(CLIP_VOCAB)


@pytest.fixture(scope='module')
def learned_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('bpe') / 'learned.txt.gz'
    save_merges(learn_bpe(CORPUS, 900), path)
    return path


@pytest.fixture(scope='module')
def learned(learned_file):
    return Tokenizer(learned_file)


@pytest.fixture(scope='module', params=['standard', 'learned'])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def naive_bpe(symbols, ranks):
    """CLIP's loop, written plainly: merge every occurrence of the lowest-ranked pair left to right, repeat."""
    while len(symbols) > 1:
        pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float('inf')))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if symbols[i:i + 2] == list(pair):
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def naive_learn_bpe(texts, num_merges):
    """BPE learning by recounting every pair before each merge; same tie rule (count, then smallest pair)."""
    words = {}
    for text in texts:
        for w in data.PATTERN.findall(clean_text(text)):
            symbols = tuple(data._symbols(w))
            words[symbols] = words.get(symbols, 0) + 1
    merges = []
    for _ in range(num_merges):
        counts = {}
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        ranks = {pair: 0}
        words = {tuple(naive_bpe(list(s), ranks)): n for s, n in words.items()}
    return merges


# --- CLIP compatibility ---
@pytest.mark.parametrize('text, ids', [  # OpenAI CLIP / open_clip ids of these captions (facts)
    ('a photo of a cat', [320, 1125, 539, 320, 2368]),
    ("A Dog's  life!", [320, 1929, 568, 970, 256]),
    ('Two people riding bikes down a busy city street at night.',
     [1237, 1047, 6765, 9227, 1136, 320, 4354, 1305, 2012, 536, 930, 269]),
    ('café 東京 😀', [15304, 48338, 21078, 361, 7334]),
    ("it's 3.14 &amp; rising", [585, 568, 274, 269, 272, 275, 261, 5448]),
    ('pneumonoultramicroscopicsilicovolcanoconiosis',
     [28714, 749, 20253, 9800, 535, 532, 1065, 901, 1556, 13697, 9916, 78, 39031, 13903]),
])
def test_standard_ids(standard, text, ids):
    assert standard.encode(text) == ids
    row = standard(text)[0]
    assert row[:len(ids) + 2].tolist() == [49406, *ids, 49407] and not row[len(ids) + 2:].any()


def test_standard_vocabulary(standard):
    assert (standard.vocab_size, standard.sot_token, standard.eot_token) == (49408, 49406, 49407)
    assert len(standard.merges) == 48894
    # a lone printable ASCII character is its end-of-word byte symbol: 256 + its rank among '!'..'~'
    assert all(standard.encode(c) == [256 + ord(c) - ord('!')] for c in string.ascii_lowercase + string.digits + '!?#')
    assert standard.encode('<|startoftext|> x <|endoftext|>') == [49406, 343, 49407]  # as CLIP's cache does


def test_bpe_matches_naive_reference(tokenizer):
    rng = random.Random(0)
    words = [''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=rng.randint(1, 400))) for _ in range(200)]
    words += ['aaaaaaaaaaa', 'ééé', '東京タワー', 'internationalization', 'abababab', '🎂🎉🎂']
    for word in words:
        expected = [tokenizer.encoder[s] for s in naive_bpe(data._symbols(word), tokenizer.ranks)]
        assert tokenizer.encode(word) == expected, word


def test_against_open_clip(standard):
    oc = pytest.importorskip('open_clip.tokenizer')
    reference = oc.SimpleTokenizer(str(CLIP_VOCAB))
    rng = random.Random(1)
    alphabet = string.ascii_letters + string.digits + string.punctuation + '    éüß東京😀\t\n'
    samples = CAPTIONS + [''.join(rng.choices(alphabet, k=rng.randint(0, 120))) for _ in range(500)]
    for text in samples:
        assert standard.encode(text) == reference.encode(text), text
    assert torch.equal(standard(samples), oc.tokenize(samples))


# --- Round trips ---
@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_decode_encode_any_text(learned, text):
    cleaned, decoded = clean_text(text), learned.decode(learned.encode(text))
    assert decoded == ' '.join(data.PATTERN.findall(cleaned))  # each pre-token decodes as one word
    assert ''.join(decoded.split()) == ''.join(cleaned.split())  # nothing lost but spacing


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.text(st.characters(whitelist_categories=('Ll', 'Lo')), min_size=1), max_size=8))
def test_decode_encode_words_exact(standard, words):
    cleaned = clean_text(' '.join(words))
    assume(all(word.isalpha() for word in cleaned.split()))  # ftfy may turn a letter into others ('ŉ' -> "'n")
    assert standard.decode(standard.encode(' '.join(words))) == cleaned


def test_decode_encode_corpus(tokenizer):
    for text in CORPUS:
        decoded = tokenizer.decode(tokenizer.encode(text))
        assert ''.join(decoded.split()) == ''.join(clean_text(text).split()), text
    row = tokenizer('a photo')[0]
    assert tokenizer.decode(row[row != 0]) == '<|startoftext|> a photo <|endoftext|>'


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(max_codepoint=127), max_size=40))
def test_ascii_shortcut_equals_clean_text(text):
    assert data._clean(text) == clean_text(text)


# --- Batches: truncation, padding, shape ---
def test_batch_shape_padding_truncation(learned, learned_file):
    long_text = ' '.join(['dog'] * 200)
    batch = learned(['a dog', '', long_text, None])
    assert batch.shape == (4, 77) and batch.dtype == torch.long
    ids = learned.encode('a dog')
    assert batch[0].tolist() == [learned.sot_token, *ids, learned.eot_token] + [0] * (75 - len(ids))
    assert batch[1].tolist() == batch[3].tolist() == [learned.sot_token, learned.eot_token] + [0] * 75
    assert batch[2].tolist() == [learned.sot_token, *learned.encode(long_text)[:75], learned.eot_token]
    assert learned('a dog').shape == (1, 77) and learned([]).shape == (0, 77)
    short = Tokenizer(learned_file, context_length=4)
    assert short(long_text).tolist() == [[learned.sot_token, *learned.encode(long_text)[:2], learned.eot_token]]


# --- Learning ---
def test_learn_bpe_by_hand():
    # words: 'ab' x3, 'abc' x1 -> (a, b</w>) 3; then (a, b) and (b, c</w>) tie at 1: the smaller pair wins
    assert learn_bpe(['ab ab ab', 'abc'], 514 + 10) == [('a', 'b</w>'), ('a', 'b'), ('ab', 'c</w>')]


def test_learn_bpe_matches_recounting():
    corpus = CORPUS[::3]
    assert learn_bpe(corpus, 514 + 150) == naive_learn_bpe(corpus, 150)


def test_learn_bpe_deterministic():
    merges = learn_bpe(CORPUS, 800)
    assert len(merges) == 800 - 514
    assert learn_bpe(CORPUS[::-1], 800) == merges  # independent of caption order, not only of the run


def test_train_save_load_round_trip(tmp_path, learned):
    merges = learn_bpe(CORPUS, 900)
    for name in ('vocab.txt', 'vocab.txt.gz'):
        save_merges(merges, tmp_path / name)
        assert data.load_merges(tmp_path / name) == merges
        again = Tokenizer(tmp_path / name)
        assert again.vocab_size == 512 + len(merges) + 2
        assert [again.encode(t) for t in CORPUS] == [learned.encode(t) for t in CORPUS]
    lines = gzip.open(tmp_path / 'vocab.txt.gz', 'rt', encoding='utf-8').read().split('\n')
    assert lines[0].startswith('#version') and lines[1:-1] == [f'{a} {b}' for a, b in merges] and lines[-1] == ''
    # frequent words became single tokens
    assert learned.encode('the') == [learned.encoder['the</w>']] and len(learned.encode('x' * 300)) < 30


def test_build_vocab_cli(tmp_path, capsys):
    (tmp_path / 'captions.txt').write_text('\n'.join(CORPUS), encoding='utf-8')
    out = tmp_path / 'v.txt.gz'
    data.build_vocab_main([str(tmp_path / 'captions.txt'), '--vocab_size=700', f'--out={out}'])
    assert data.load_merges(out) == learn_bpe(CORPUS, 700) and 'learned 186 merges' in capsys.readouterr().out
    for argv, message in (([str(tmp_path / 'captions.txt'), '--vocab_size=100'], 'vocab_size=100 must be in [514, 49408]'),
                          ([str(tmp_path / 'captions.txt'), '--bogus=1'], 'unrecognized arguments: --bogus=1'),
                          ([str(tmp_path / 'missing.txt')], 'missing.txt not found'), ([], 'required: captions')):
        with pytest.raises(UserError, match=re.escape(message)):  # run_cli prints it as one line
            data.build_vocab_main(argv)


def test_pickles(learned):
    assert pickle.loads(pickle.dumps(learned)).encode('a dog runs') == learned.encode('a dog runs')


# --- Bad input ---
@pytest.mark.parametrize('text', [
    '', '   \t\n ', '\x00\x01\x1b[31mred\x7f', '😀' * 50, '東京タワーの夜景', 'mixed Ελληνικά עברית 日本 text',
    '\ud800', 'a\udfffb', 'x' * 100000, 'a photo ' * 12500, '&amp;&lt;&#0;&#xD800;', '<|endoftext|' * 3],
    ids=lambda text: ascii(text[:12]))
def test_bad_text_never_crashes(tokenizer, text):
    row = tokenizer(text)[0]
    n = int((row != 0).sum())
    assert row[0] == tokenizer.sot_token and row[n - 1] == tokenizer.eot_token and not row[n:].any()
    assert ''.join(tokenizer.decode(tokenizer.encode(text)).split()) == ''.join(clean_text(text).split())


def test_surrogate_decodes_to_replacement(learned):
    assert learned.decode(learned.encode('a\ud800b')) == 'a \ufffd b'  # three pre-tokens: letter, symbol, letter


@pytest.mark.parametrize('bad', [5, b'a photo', ['a photo', 3], {'a': 1}])
def test_non_text_raises_type_error(learned, bad):
    with pytest.raises(TypeError, match='str'):
        learned(bad)


def test_bad_ids_and_sizes(learned, learned_file):
    for ids in ([-1], [learned.vocab_size], ['a'], [[1, 2]]):
        with pytest.raises(ValueError, match='token ids'):
            learned.decode(ids)
    with pytest.raises(ValueError, match='vocab_size=100'):
        learn_bpe(CORPUS, 100)
    with pytest.raises(ValueError, match='context_length=1'):
        Tokenizer(learned_file, context_length=1)


@pytest.mark.parametrize('content, message', [
    (b'#version: 0.2\na b c\n', "line 2: expected a merge 'a b'"),
    (b'#version: 0.2\nzz q\n', "line 2: expected a merge 'a b' of known"),
    (b'#version: 0.2\n', 'has no merges'),
    (b'', 'has no merges'),
    (b'\xff\xfe\x00garbage', 'cannot read BPE merges file'),
    (gzip.compress(b'#version: 0.2\na b\n')[:12], 'cannot read BPE merges file'),
])
def test_malformed_merges_file(tmp_path, content, message):
    path = tmp_path / 'bad.txt.gz'
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        Tokenizer(path)
    assert str(path) in str(error.value) and '\n' not in str(error.value)


def test_missing_merges_file(tmp_path):
    with pytest.raises(UserError, match=f'{tmp_path / "nope.txt.gz"} not found'):
        Tokenizer(tmp_path / 'nope.txt.gz')
