"""Tokenizer throughput (captions/s) vs open_clip's pure-Python tokenizer, and BPE learning time.

python -m bench.tokenizer [--captions=20000]
A fixed, seeded corpus of realistic captions (Zipf-distributed vocabulary, capitals, punctuation, numbers,
a few accents, emoji, CJK and HTML entities). Tokenised as a whole list and as a data-loader sample does it
(3 captions a call); open_clip, when installed, runs the same calls in the same process on the same merges.
"""
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

from data import Tokenizer, learn_bpe, save_merges
from bench import exit_on_help

CLIP_VOCAB = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
NOUNS = ('dog cat man woman child people car bus train bike street road city building house room table chair '
         'plate food pizza sandwich cake field grass tree flower mountain lake river beach ocean sky cloud sunset '
         'horse cow sheep bird boat plane kitchen bathroom bed window door sign clock phone laptop computer book '
         'shirt hat umbrella bag ball frisbee kite skateboard surfboard snow wave rock bridge tower park').split()
ADJECTIVES = ('red blue green yellow white black brown small large old young tall little wooden empty busy '
              'sunny snowy wet dry bright dark colorful happy smiling cute modern vintage').split()
VERBS = 'sitting standing walking running riding holding playing eating looking lying flying parked'.split()
PLACES = ('on the table', 'in the park', 'near the water', 'next to a building', 'on a city street',
          'in a kitchen', 'at the beach', 'under a tree', 'in front of a house', 'on top of a hill')
EXTRAS = ('café', 'naïve', '😀', '東京', 'crème brûlée', 'Ünïcödé', 'fish &amp; chips', '<b>bold</b>', "it's", "don't")


def make_captions(n, seed=0):
    """n seeded captions, templated from a Zipf-weighted vocabulary."""
    rng = random.Random(seed)

    def zipf(words):
        return rng.choices(words, cum_weights=list(itertools.accumulate(1 / (r + 1) for r in range(len(words)))))[0]

    captions = []
    for _ in range(n):
        caption = (f"{rng.choice(['a', 'the', 'two', 'an image of a', 'photo of a'])} {zipf(ADJECTIVES)} "
                   f"{zipf(NOUNS)} {zipf(VERBS)} {rng.choice(PLACES)}")
        if rng.random() < 0.3:
            caption += f" with {rng.randint(2, 12)} {zipf(NOUNS)}s"
        if rng.random() < 0.05:
            caption += ' ' + rng.choice(EXTRAS)
        captions.append(caption.capitalize() + rng.choice(['', '.', '!', ' .']))
    return captions


def make_word_corpus(n, seed=0, types=30000):
    """n captions over `types` pseudo-words (syllable strings, Zipf frequencies): enough pairs for 10k merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in 'bcdfghjklmnprstvwz' for v in 'aeiou'] + ['th', 'ing', 'er', 'st', 'ch']
    vocab = [''.join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(types)]
    cum_weights = list(itertools.accumulate(1 / (r + 1) for r in range(types)))
    return [' '.join(rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(5, 15))) for _ in range(n)]


def whole_list(tokenizer):
    return tokenizer


def three_a_call(tokenizer):
    """As a data-loader sample: one call for its 1 + A = 3 caption views."""
    return lambda captions: [tokenizer(captions[i:i + 3]) for i in range(0, len(captions), 3)]


def captions_per_second(fn, captions, rounds=3):
    """Best of `rounds` timed passes after one warm-up pass (caches filled, as in a long data-loader run)."""
    fn(captions)
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        fn(captions)
        best = min(best, time.perf_counter() - start)
    return len(captions) / best


def main(argv):
    exit_on_help(argv, __doc__)
    n = int(next((a.split('=', 1)[1] for a in argv if a.startswith('--captions=')), 20000))
    captions = make_captions(n)
    try:
        import open_clip.tokenizer as oc
    except ImportError:
        oc = None
    bpe_path = CLIP_VOCAB if CLIP_VOCAB.is_file() else Path(oc.default_bpe()) if oc else None
    with tempfile.TemporaryDirectory() as tmp:
        if bpe_path is None:  # no standard merges anywhere: learn some from the corpus
            bpe_path = Path(tmp) / 'vocab.txt.gz'
            save_merges(learn_bpe(captions, 4096), bpe_path)
        start = time.perf_counter()
        tokenizer = Tokenizer(bpe_path)
        print(f"load {bpe_path.name}: {time.perf_counter() - start:.2f} s, vocab_size {tokenizer.vocab_size}")

        accented = [c + ' café' for c in captions]  # every caption goes through ftfy
        runs = [('whole list', whole_list, captions), ('3 captions a call', three_a_call, captions),
                ('all non-ASCII', whole_list, accented)]
        reference = oc and oc.SimpleTokenizer(str(bpe_path))
        print(f"{n} captions, {sum(map(len, captions)) / n:.0f} characters on average")
        for name, call, corpus in runs:
            ours = captions_per_second(call(tokenizer), corpus)
            line = f"  {name:18s} ours {ours:9.0f} captions/s"
            if reference:
                theirs = captions_per_second(call(reference), corpus)
                line += f" | open_clip {theirs:9.0f} captions/s | ratio {ours / theirs:.2f}x"
            print(line)
        if not reference:
            print("  (pip install open_clip_torch to compare with open_clip's tokenizer)")

        corpus = make_word_corpus(100000)
        start = time.perf_counter()
        merges = learn_bpe(corpus, 514 + 10000)
        print(f"learn_bpe: {len(merges)} merges from {len(corpus)} captions in {time.perf_counter() - start:.1f} s")


if __name__ == '__main__':
    main(sys.argv[1:])
