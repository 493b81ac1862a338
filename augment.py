"""Image and text augmentations: the weak and strong views of CLIP 🚀 (SPEC.md section 3)."""
import functools
import hashlib
import html
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
import torch.nn.functional as tnf
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from PIL import Image


# --- Text cleaning ---
def clean_text(text):
    """ftfy fix, HTML-unescape twice, collapse whitespace, lowercase (CLIP's tokenizer cleaning)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r'\s+', ' ', text).strip().lower()  # regex's Unicode \s, as CLIP's whitespace_clean


# --- Image: mode conversion ---
def to_rgb(img):
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) -> 8-bit RGB; 16-bit data is rescaled, alpha dropped."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}; open files with PIL.Image.open")
    if min(img.size) == 0:
        raise ValueError(f"empty image of size {img.size}; drop it from the dataset")
    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        # PIL's own convert clips 16-bit values at 255 (an all-white image); rescale to 8 bits instead
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8), 'L')
    elif img.mode in ('P', 'PA'):
        img = img.convert('RGBA')  # palette transparency must go through RGBA (else PIL warns per image)
    return img if img.mode == 'RGB' else img.convert('RGB')


# --- Image: colour and blur kernels (float (C, H, W) images in [0, 1]) ---
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)  # HSV -> RGB phase of R, G, B in sextants


def adjust_hue(img, hue_factor):
    """Rotate the hue of a (3, H, W) image by hue_factor turns: torchvision's HSV maths in closed form
    (V = max and V*S = max - min are kept), ~3x faster than its tensor kernel."""
    maxc, minc = img.amax(0), img.amin(0)  # (H, W)
    delta = maxc - minc
    d = delta.clamp_min(1e-8)  # grey pixels have no hue; their output is maxc whatever h is
    r, g, b = img
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    # HSV -> RGB: channel = max - delta * clamp(min(k, 4 - k), 0, 1) with k = (phase + hue) mod 6
    k = (h + 6 * hue_factor + _HUE_OFFSETS) % 6  # (3, H, W)
    return maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1)


def gaussian_blur(img, sigma):
    """PIL's GaussianBlur(radius=sigma) on tensors: 3 passes of Pillow's extended box filter per axis, whose
    size comes from sigma (Gwosdek et al. 2011; total variance sigma^2), edges replicated per pass. Matches
    PIL up to its uint8 rounding between passes (<= 3/255) at a third of its cost. A sampled Gaussian
    (torchvision) would blur much less for sigma < 0.7."""
    var = sigma * sigma / 3  # per pass
    n = math.floor((math.sqrt(12 * var + 1) - 1) / 2)  # box of 2n + 1 full taps plus a fractional tap a each side
    a = (2 * n + 1) * (n * (n + 1) - 3 * var) / (6 * (var - (n + 1) ** 2))
    taps = [w / (2 * n + 1 + 2 * a) for w in [a] + [1.0] * (2 * n + 1) + [a]]
    r = n + 1
    for dim, pad in ((2, (r, r, 0, 0)), (1, (0, 0, r, r))):  # (C, H, W): along W, then along H
        size = img.shape[dim]
        for _ in range(3):
            x = tnf.pad(img[None], pad, mode='replicate')[0]
            # shifted multiply-adds: far faster than a depthwise conv2d on CPU for kernels this small
            img = x.narrow(dim, 0, size) * taps[0]
            for i in range(1, len(taps)):
                img.add_(x.narrow(dim, i, size), alpha=taps[i])
    return img


class ColorJitter(v2.ColorJitter):
    """torchvision's ColorJitter (same factor draws, random order) with the faster float hue kernel."""

    def transform(self, inpt, params):
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, adjust_hue)
        factors = (params['brightness_factor'], params['contrast_factor'], params['saturation_factor'],
                   params['hue_factor'])
        for i in params['fn_idx'].tolist():
            if factors[i] is not None:
                inpt = ops[i](inpt, factors[i])
        return inpt


class GaussianBlur(v2.Transform):
    """PIL-style Gaussian blur with sigma ~ U(sigma_min, sigma_max), drawn per call from torch's generator."""

    def __init__(self, sigma=(0.1, 2.0)):
        super().__init__()
        self.sigma = sigma

    def make_params(self, flat_inputs):
        return {'sigma': torch.empty(1).uniform_(*self.sigma).item()}

    def transform(self, inpt, params):
        return gaussian_blur(inpt, params['sigma'])


# --- Image: weak, strong and evaluation views ---
BICUBIC = v2.InterpolationMode.BICUBIC


def weak_transform(cfg):
    """Global view (SPEC.md 3.1): RandomResizedCrop(S, scale (weak_min_scale, 1)), bicubic, normalise."""
    return v2.Compose([
        v2.RandomResizedCrop(cfg.image_size, scale=(cfg.weak_min_scale, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.image_mean, cfg.image_std),
    ])


def strong_transform(cfg, saturation, blur_prob, solarize_prob):
    """Local view (SPEC.md 3.1): crop R, colour jitter, grayscale, blur, solarize, flip, normalise.
    Colour ops run on float images after the uint8 crop (no rounding between ops, unlike PIL)."""
    return v2.Compose([
        v2.RandomResizedCrop(cfg.local_crop_size, scale=(cfg.strong_min_scale, cfg.strong_max_scale),
                             ratio=(3 / 4, 4 / 3), interpolation=BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([ColorJitter(0.4, 0.4, saturation, 0.1)], p=cfg.color_jitter_prob),
        v2.RandomGrayscale(cfg.grayscale_prob),
        v2.RandomApply([GaussianBlur((0.1, 2.0))], p=blur_prob),
        v2.RandomSolarize(128 / 255, p=solarize_prob),  # PIL's solarize(threshold=128) on uint8
        v2.RandomHorizontalFlip(0.5),
        v2.Normalize(cfg.image_mean, cfg.image_std),
    ])


def strong_transforms(cfg):
    """The A strong pipelines; byol_augment gives BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2)."""
    if cfg.byol_augment:
        return [strong_transform(cfg, 0.2, 1.0, 0.0), strong_transform(cfg, 0.2, 0.1, 0.2)]
    return [strong_transform(cfg, 0.4, cfg.blur_prob, cfg.solarize_prob) for _ in range(cfg.num_augs)]


class ImageViews:
    """views(pil_img) -> (weak (3, S, S), [strong (3, R, R)] * A), all cut from one decoded image."""

    def __init__(self, cfg):
        self.weak = weak_transform(cfg)
        self.strong = strong_transforms(cfg)

    def __call__(self, img):
        x = F.pil_to_tensor(to_rgb(img))  # (3, H, W) uint8, shared by every view
        return self.weak(x), [t(x) for t in self.strong]


def eval_transform(cfg):
    """Validation transform (SPEC.md 3.1): resize the short side to S (bilinear), centre crop S, normalise."""
    return v2.Compose([
        v2.Lambda(to_rgb),
        v2.PILToTensor(),
        v2.Resize(cfg.image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.CenterCrop(cfg.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.image_mean, cfg.image_std),
    ])


# --- Text: stopwords and word tokenizer ---
# NLTK's English stopword list as shipped with nltk 3.7 (179 words; newer nltk_data adds ~19 contractions)
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom
this that that'll these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where why how all
any both each few more most other some such no nor not only own same so than too very s t can will just don
don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn
hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

# NLTK's improved Treebank tokenizer, one sentence at a time. Rules run in order; the second list runs on
# ' ' + text + ' '. Compiled with the standard re, as nltk does: the regex module's \w, \b and \s differ on
# combining marks, digits such as '²' and the separators \x1c-\x1f.
_TOKEN_RULES = [(re.compile(p, f), r) for p, f, r in [
    (r'([«“‘„]|[`]+)', 0, r' \1 '),  # starting quotes
    (r'^"', 0, r'``'),
    (r'(``)', 0, r' \1 '),
    (r'([ (\[{<])("|\'{2})', 0, r'\1 `` '),
    (r"(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", re.I, r'\1 \2'),
    (r'([^.])(\.)([\]\)}>"\'»”’ ]*)\s*$', 0, r'\1 \2 \3 '),  # punctuation
    (r'([:,])([^\d])', 0, r' \1 \2'),
    (r'([:,])$', 0, r' \1 '),
    (r'\.{2,}', 0, r' \g<0> '),
    (r'[;@#$%&]', 0, r' \g<0> '),
    (r'([^.])(\.)([\]\)}>"\']*)\s*$', 0, r'\1 \2\3 '),
    (r'[?!]', 0, r' \g<0> '),
    (r"([^'])' ", 0, r"\1 ' "),
    (r'[*]', 0, r' \g<0> '),
    (r'[\]\[\(\)\{\}<>]', 0, r' \g<0> '),  # brackets
    (r'--', 0, r' -- '),
]]
_PADDED_RULES = [(re.compile(p, f), r) for p, f, r in [
    (r'([»”’])', 0, r' \1 '),  # ending quotes
    (r"''", 0, " '' "),
    (r'"', 0, " '' "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", 0, r'\1 \2 '),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", 0, r'\1 \2 '),
    *((r'\b(' + a + ')(' + b + r')\b', re.I, r' \1 \2 ') for a, b in [  # contractions (MacIntyre)
        ('can', 'not'), ('d', "'ye"), ('gim', 'me'), ('gon', 'na'), ('got', 'ta'), ('lem', 'me'), ('more', "'n")]),
    (r"\b(wan)(na)(?=\s)", re.I, r' \1 \2 '),
    (r" ('t)(is)\b", re.I, r' \1 \2 '),
    (r" ('t)(was)\b", re.I, r' \1 \2 '),
]]


def treebank_tokenize(sentence):
    """Treebank-style word tokens of one sentence: punctuation split off, "don't" -> ['do', "n't"], quotes as ``
    and '', and only a final period split off."""
    for pattern, repl in _TOKEN_RULES:
        sentence = pattern.sub(repl, sentence)
    sentence = f' {sentence} '
    for pattern, repl in _PADDED_RULES:
        sentence = pattern.sub(repl, sentence)
    return sentence.split()


# nltk.word_tokenize first splits sentences with Punkt's English model; only the split at a period changes the
# word tokens ("it." -> "it ."). A rule-based stand-in for Punkt on captions (recipe §3.2): a word ending in a
# period, perhaps with closing quotes or brackets, ends a sentence when whitespace and a token follow, except
# after an ellipsis, after a common abbreviation (unless a capitalised sentence starter follows), after a number
# followed by a lowercase word, and after an initial followed by a lowercase word or a name.
_SENTENCE_END = re.compile(r'(\S*)\.(["\')\]}»”’]*)\s+(?=(\S+))')
_NUMBER = re.compile(r'-?[.,]?\d[\d,.-]*')
_INITIAL = re.compile(r'[^\W\d]')
_ABBREVIATIONS = frozenset("""mr mrs ms dr st jr sr prof gen sen rep inc ltd co corp vs ave ft jan feb aug sept oct
nov dec a.m p.m u.s u.k""".split())  # each one an abbreviation in Punkt's English model too
_SENTENCE_STARTERS = frozenset('the this these there they he it i if in but so some most many when while however'
                               .split())


def _ends_sentence(word, following):
    """Whether word + '.' ends a sentence when the token `following` comes next (Punkt's usual decision)."""
    word = word.lstrip('([{"\'`').lower()
    lower, upper = following[:1].islower(), following[:1].isupper()
    if word.endswith('.'):  # an ellipsis: the tokens are the same either way
        return False
    if word in _ABBREVIATIONS or word.rsplit('-', 1)[-1] in _ABBREVIATIONS:
        return upper and following.lower() in _SENTENCE_STARTERS
    if _NUMBER.fullmatch(word):
        return not lower
    if _INITIAL.fullmatch(word):  # a capitalised non-stopword is taken for a name: 'J. Smith', but 'B. The end'
        return not lower and not (upper and following.lower() not in STOPWORDS)
    return True


def word_tokenize(text):
    """nltk.word_tokenize: sentences split as Punkt would on captions, then Treebank tokens of each sentence."""
    tokens, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if _ends_sentence(m.group(1), m.group(2)[:1] or m.group(3)):  # closing marks are what Punkt sees next
            tokens += treebank_tokenize(text[start:m.end(2)])
            start = m.end()
    return tokens + treebank_tokenize(text[start:])


def remove_stopwords(text, rng, p):
    """With probability p drop the tokens whose lowercase form is a stopword; an empty result keeps text."""
    if not text.strip() or rng.random() >= p:
        return text
    return ' '.join(w for w in word_tokenize(text) if w.lower() not in STOPWORDS) or text


# --- Text: WordNet synonyms ---
_POS_FILES = {'n': 'noun', 'v': 'verb', 'a': 'adj', 'r': 'adv'}
# morphy's suffix rules, as in NLTK (SPEC.md 3.2 lists them without noun ves -> f, which NLTK has)
_SUFFIXES = {
    'n': [('s', ''), ('ses', 's'), ('ves', 'f'), ('xes', 'x'), ('zes', 'z'), ('ches', 'ch'), ('shes', 'sh'),
          ('men', 'man'), ('ies', 'y')],
    'v': [('s', ''), ('ies', 'y'), ('es', 'e'), ('es', ''), ('ed', 'e'), ('ed', ''), ('ing', 'e'), ('ing', '')],
    'a': [('er', ''), ('est', ''), ('er', 'e'), ('est', 'e')],
    'r': [],
}
_LETTERS = frozenset('abcdefghijklmnopqrstuvwxyz ')
_WORDNET_FILES = [f for name in _POS_FILES.values() for f in (f'index.{name}', f'data.{name}', f'{name}.exc')]
_CACHE_VERSION = 1  # bump when the cached table's layout or rules change


def morphy(word, pos, lemmas, exceptions):
    """WordNet base forms of a lowercase word in one part of speech (NLTK's _morphy): the exception list,
    else the word and its one-step suffix rewrites, else repeated rewrites until some form is a lemma."""
    def known(forms):
        return [f for f in dict.fromkeys(forms) if f in lemmas]

    def rewrite(forms):
        # deduplicated: NLTK's list grows exponentially on tokens like 'eseses...'; the result is the same
        return list(dict.fromkeys(f[:-len(old)] + new for f in forms for old, new in _SUFFIXES[pos] if f.endswith(old)))

    if word in exceptions:
        return known([word, *exceptions[word]])
    forms = rewrite([word])
    found = known([word] + forms)
    while forms and not found:
        forms = rewrite(forms)
        found = known(forms)
    return found


class Synonyms:
    """Read-only mapping word -> sorted WordNet synonyms (SPEC.md 3.2), resolved on lookup through morphy
    over all parts of speech; words without synonyms are absent."""

    def __init__(self, lemmas, exceptions):
        self.lemmas, self.exceptions = lemmas, exceptions  # {pos: {lemma: names}}, {pos: {form: bases}}

    def get(self, word, default=None):
        query, found = word.lower(), set()
        for pos, lemmas in self.lemmas.items():  # nouns, verbs, adjectives, adverbs
            for form in morphy(query, pos, lemmas, self.exceptions[pos]):
                found.update(lemmas[form])
        found.discard(word)  # textaugment removes the word as given (so 'Dog' may become 'dog')
        return sorted(found) or default

    def __getitem__(self, word):
        found = self.get(word)
        if found is None:
            raise KeyError(word)
        return found

    def __contains__(self, word):
        return self.get(word) is not None


def _lemma_name(name):
    """A lemma name as textaugment writes it ('_'/'-' -> space, lowercase, keep a-z and space), with spaces
    collapsed (deviation: textaugment turns '3-d' into ' d' and '10' into ''; we give 'd' and drop '')."""
    name = re.sub(r'\(.*\)$', '', name)  # adjective syntactic markers such as 'galore(ip)'
    name = name.replace('_', ' ').replace('-', ' ').lower()
    return ' '.join(''.join(c for c in name if c in _LETTERS).split())


def _parse_wordnet(root):
    """Parse index.*, data.* and *.exc into ({pos: {lemma: synonym names}}, {pos: {form: base forms}})."""
    lemmas, exceptions = {}, {}
    for pos, name in _POS_FILES.items():
        names = {}  # synset offset -> cleaned lemma names
        with open(root / f'data.{name}', encoding='utf-8') as f:
            for line in f:
                if not line.startswith(' '):  # lines starting with spaces are the licence header
                    offset, _, _, count, rest = line.split(' ', 4)  # offset lex_file type w_cnt (word lex_id)*
                    words = rest.split(' ', 2 * int(count, 16))[:2 * int(count, 16):2]
                    names[offset] = [n for n in map(_lemma_name, words) if n]
        table = {}
        with open(root / f'index.{name}', encoding='utf-8') as f:
            for line in f:
                if not line.startswith(' '):
                    fields = line.split()
                    table[fields[0]] = tuple(sorted({n for o in fields[-int(fields[2]):] for n in names[o]}))
        lemmas[pos] = table
        with open(root / f'{name}.exc', encoding='utf-8') as f:
            exceptions[pos] = {w[0]: tuple(w[1:]) for w in map(str.split, f) if w}
    return lemmas, exceptions


@functools.lru_cache(maxsize=None)
def load_synonyms(wordnet_dir):
    """Synonyms from a WordNet 3.0 directory, parsed once per process and cached under ~/.cache/rocket-clip;
    None (with one warning) when the files are missing."""
    root = Path(wordnet_dir).expanduser()
    missing = [n for n in _WORDNET_FILES if not (root / n).is_file()]
    if missing:
        warnings.warn(f"WordNet 3.0 not found in {root} ({len(missing)} files missing, e.g. {missing[0]}): synonym "
                      f"replacement is skipped; run `apt-get install wordnet-base` or set --wordnet_dir", stacklevel=2)
        return None
    stats = [(n, (root / n).stat().st_size, (root / n).stat().st_mtime_ns) for n in _WORDNET_FILES]
    key = hashlib.sha1(repr((_CACHE_VERSION, str(root.resolve()), stats)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get('XDG_CACHE_HOME', '~/.cache')).expanduser() / 'rocket-clip' / f'wordnet-{key}.pkl'
    try:
        with open(cache, 'rb') as f:
            return Synonyms(*pickle.load(f))
    except Exception:  # no cache yet, or an unreadable or stale one: rebuild it
        pass
    try:
        tables = _parse_wordnet(root)
    except (ValueError, LookupError) as e:  # includes UnicodeDecodeError, IndexError, KeyError
        raise ValueError(f"{root}: unreadable WordNet 3.0 files ({e!r}); reinstall wordnet-base or fix "
                         f"--wordnet_dir") from None
    try:  # write-then-rename so concurrent workers never read a half-written cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f'.{os.getpid()}.tmp')
        with open(tmp, 'wb') as f:
            pickle.dump(tables, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only home: the table is rebuilt by each process
    return Synonyms(*tables)


# --- Text: EDA operations (textaugment 1.3.4 defaults) ---
def synonym_replacement(text, rng, synonyms):
    """Replace every occurrence of one random non-stopword that has synonyms by one random synonym."""
    words = text.split()
    candidates = [w for w in dict.fromkeys(words) if w not in STOPWORDS]  # case-sensitive, as textaugment
    rng.shuffle(candidates)
    for word in candidates:
        options = synonyms.get(word)
        if options:
            new = rng.choice(options)
            return ' '.join(new if w == word else w for w in words)
    return ' '.join(words)


def random_swap(text, rng):
    """Swap two words at distinct random positions (j redrawn at most 3 times, else unchanged)."""
    words = text.split()
    if len(words) > 1:
        i = rng.randrange(len(words))
        for _ in range(3):
            j = rng.randrange(len(words))
            if j != i:
                words[i], words[j] = words[j], words[i]
                break
    return ' '.join(words)


def random_deletion(text, rng, p=0.1):
    """Drop each word with probability p; a one-word text is kept, an all-deleted one keeps one random word."""
    words = text.split()
    if len(words) <= 1:
        return ' '.join(words)
    kept = [w for w in words if rng.random() > p]
    return ' '.join(kept) if kept else rng.choice(words)


# --- Text: weak and strong captions ---
class TextViews:
    """views(captions, rng) -> [weak, strong_1, ..., strong_A] strings (SPEC.md 3.2); each row draws its
    own caption from the tuple."""

    def __init__(self, cfg):
        self.p, self.num_augs, self.clean = cfg.remove_stopwords_prob, cfg.num_augs, cfg.clean_before_augment
        self.augment = cfg.text_augment
        self.weights = (cfg.identity_prob, cfg.synonym_prob, cfg.swap_prob, cfg.deletion_prob)
        use_wordnet = cfg.text_augment and cfg.num_augs > 0 and cfg.synonym_prob > 0
        self.synonyms = load_synonyms(cfg.wordnet_dir) if use_wordnet else None

    def eda(self, text, rng):
        """One EDA operation drawn with the configured weights; an empty result keeps the input."""
        op = rng.choices(range(4), self.weights)[0]
        if not text.strip() or op == 0 or (op == 1 and self.synonyms is None):
            return text
        out = (synonym_replacement(text, rng, self.synonyms) if op == 1 else
               random_swap(text, rng) if op == 2 else random_deletion(text, rng))
        return out or text

    def __call__(self, captions, rng):
        captions = (captions,) if isinstance(captions, str) else tuple(captions) or ('',)
        if self.clean:
            captions = tuple(map(clean_text, captions))
        rows = [remove_stopwords(rng.choice(captions), rng, self.p)]
        for _ in range(self.num_augs):
            text = remove_stopwords(rng.choice(captions), rng, self.p)
            rows.append(self.eda(text, rng) if self.augment else text)
        return rows
