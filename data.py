"""Data: CLIP's BPE tokenizer (recipe §1.4), the dataset readers, the training samples, the loaders (recipe §4) and
the built-in demo dataset."""
import atexit
import bisect
import collections
import contextlib
import csv
import ctypes
import dataclasses
import functools
import gc
import gzip
import hashlib
import heapq
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import struct
import sys
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import regex
import torch
from PIL import Image, ImageDraw, ImageOps

from augment import REGION_LIMIT, ImageViews, TextViews, UnreadableImage, clean_text, eval_transform, pack_views
from config import RECIPES, ConfigError, UserError, atomic_write, first_line, parse_flags, run_cli


# --- BPE tokenizer ---
# CLIP's pre-tokenisation: special tokens, contractions, letter runs, single digits, runs of other symbols
PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
SPECIAL_TOKENS = ('<|startoftext|>', '<|endoftext|>')
MAX_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 lines of its 262k-merge file: vocabulary 49408
# printable ASCII without '&' (plus \t \n \r): ftfy and HTML-unescaping leave such text unchanged
_PLAIN = regex.compile(r'[\t\n\r\x20-\x25\x27-\x7e]*')


def bytes_to_unicode():
    """CLIP's byte -> character table: printable Latin-1 bytes map to themselves, the other 68 to chr(256 + k)."""
    keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


BYTE_ENCODER = bytes_to_unicode()  # also a str.translate table over latin-1-decoded bytes
BASE_SYMBOLS = [*BYTE_ENCODER.values(), *(c + '</w>' for c in BYTE_ENCODER.values())]


def _clean(text):
    """clean_text, skipping ftfy (the costliest step) where it is the identity; None is an empty text."""
    if text is None:
        return ''
    if not isinstance(text, str):
        raise TypeError(f"expected a caption of type str, got {type(text).__name__}; decode bytes / convert it first")
    return ' '.join(text.split()).lower() if _PLAIN.fullmatch(text) else clean_text(text)


def _symbols(word):
    """A pre-token as byte symbols, the last one marked '</w>'; lone surrogates keep their bytes."""
    symbols = list(word.encode('utf-8', 'surrogatepass').decode('latin-1').translate(BYTE_ENCODER))
    symbols[-1] += '</w>'
    return symbols


def load_merges(path):
    """The first MAX_MERGES merges of a CLIP-format file, plain or gzip: a header line, then one 'a b' per line.
    path may also be the file's bytes (the copy a checkpoint carries)."""
    data, path = (path, 'in the checkpoint') if isinstance(path, bytes) else (None, Path(path))
    if data is None and not path.is_file():
        raise UserError(f"BPE merges file {path} not found; expected a CLIP merges file (.txt or .txt.gz) "
                        f"such as bpe_simple_vocab_16e6.txt.gz")
    try:
        data = path.read_bytes() if data is None else data
        lines = (gzip.decompress(data) if data[:2] == b'\x1f\x8b' else data).decode('utf-8').split('\n')
    except (OSError, EOFError, zlib.error, UnicodeError) as e:
        raise UserError(f"cannot read BPE merges file {path} ({e}); expected UTF-8 text, optionally gzipped") from None
    lines = lines[1:MAX_MERGES + 1]
    if lines and not lines[-1]:
        lines.pop()  # the final newline
    merges, known = [], set(BASE_SYMBOLS)
    for n, line in enumerate(lines, 2):
        merge = tuple(line.split())
        if len(merge) != 2 or not known.issuperset(merge):
            raise UserError(f"{path} line {n}: expected a merge 'a b' of known BPE symbols, got {line[:80]!r}")
        merges.append(merge)
        known.add(merge[0] + merge[1])
    if not merges:
        raise UserError(f"BPE merges file {path} has no merges; expected a header line, then one 'a b' per line")
    return merges


class _WordCache(dict):
    """word -> BPE ids; a miss runs bpe. Emptied when full, so that a hit is one C-level dict lookup."""

    def __init__(self, bpe, max_size=1 << 18):
        super().__init__()
        self.bpe, self.max_size = bpe, max_size

    def __missing__(self, word):
        if len(self) >= self.max_size:
            self.clear()
        ids = self[word] = self.bpe(word)
        return ids


class Tokenizer:
    """CLIP's BPE tokenizer: encode/decode one text; tokenizer(texts) -> (N, context_length) LongTensor."""

    def __init__(self, bpe_path, context_length=77):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for SOT and EOT; use >= 2 (CLIP: 77)")
        self.merges = load_merges(bpe_path)
        self.ranks = {merge: rank for rank, merge in enumerate(self.merges)}
        vocab = BASE_SYMBOLS + [a + b for a, b in self.merges] + list(SPECIAL_TOKENS)
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}  # a repeated symbol keeps its last id, as CLIP
        self.vocab_size, self.context_length = len(vocab), context_length
        self.sot_token, self.eot_token = self.encoder[SPECIAL_TOKENS[0]], self.encoder[SPECIAL_TOKENS[1]]
        # bytes of each id; a word's last symbol (marked '</w>') and a special token are followed by a space
        byte_decoder = {c: b for b, c in BYTE_ENCODER.items()}
        self.decoder = {i: bytes(byte_decoder[c] for c in s.removesuffix('</w>')) + b' ' * s.endswith('</w>')
                        for i, s in enumerate(vocab[:-2])}
        self.decoder.update({self.encoder[s]: s.encode() + b' ' for s in SPECIAL_TOKENS})
        self.cache = _WordCache(self.bpe)

    def bpe(self, word):
        """Ids of one pre-token by CLIP's rule (merge the lowest-ranked pair everywhere, left to right, repeat),
        with a heap of (rank, position) and a linked list so that a 100k-character word is fast too."""
        if word in SPECIAL_TOKENS:  # as CLIP, special-token text in a caption becomes that token
            return (self.encoder[word],)
        symbols = _symbols(word)
        n = len(symbols)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(self.ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in self.ranks]
        heapq.heapify(heap)
        while heap:
            rank, positions = heap[0][0], []
            while heap and heap[0][0] == rank:  # all positions of this pair: CLIP merges them in one pass
                positions.append(heapq.heappop(heap)[1])
            for i in positions:
                j = nxt[i]
                if j == n or (symbols[i], symbols[j]) != self.merges[rank]:
                    continue  # stale: a neighbour was merged since this entry was pushed
                symbols[i], symbols[j] = symbols[i] + symbols[j], ''
                nxt[i] = nxt[j]
                if nxt[i] < n:
                    prv[nxt[i]] = i
                for left, right in ((prv[i], i), (i, nxt[i])):
                    new_rank = self.ranks.get((symbols[left], symbols[right])) if left >= 0 and right < n else None
                    if new_rank is not None:
                        heapq.heappush(heap, (new_rank, left))
        return tuple(self.encoder[s] for s in symbols if s)

    def encode(self, text):
        """BPE ids of one text, cleaned as CLIP does (no SOT/EOT; None is an empty text)."""
        return list(itertools.chain.from_iterable(map(self.cache.__getitem__, PATTERN.findall(_clean(text)))))

    def decode(self, ids):
        """Text of token ids: the words of encode joined by single spaces (invalid UTF-8 becomes U+FFFD)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        try:
            data = b''.join([self.decoder[i] for i in ids])
        except (KeyError, TypeError):
            raise ValueError(f"cannot decode {ids!r:.80}: expected a list of token ids in [0, {self.vocab_size})") \
                from None
        return data.decode('utf-8', 'replace').removesuffix(' ')

    def __call__(self, texts):
        """(N, context_length) LongTensor of [SOT, ids, EOT, 0...]; a long text keeps EOT in its last slot."""
        if isinstance(texts, str) or texts is None:
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        keep = self.context_length - 2
        tokens = np.zeros((len(texts), self.context_length), np.int64)  # (N, L), zero-padded; numpy fills rows fastest
        for row, text in zip(tokens, texts):
            ids = self.encode(text)[:keep]
            row[:len(ids) + 2] = [self.sot_token, *ids, self.eot_token]
        return torch.from_numpy(tokens)


# --- Vocabularies ---
def learn_bpe(texts, vocab_size):
    """BPE merges learned from texts with CLIP's cleaning and pre-tokenisation; vocab_size = 512 + merges + 2.
    The most frequent pair wins, ties go to the smallest (a, b) in string order: the result is deterministic."""
    # each merge updates the counts of only the words holding its pair (a pair -> words index, a lazy max-heap)
    if not 514 <= vocab_size <= 514 + MAX_MERGES:
        raise ValueError(f"vocab_size={vocab_size} must be in [514, {514 + MAX_MERGES}] (512 byte symbols + merges + "
                         f"SOT and EOT; CLIP: 49408)")
    counts = collections.Counter(w for text in texts for w in PATTERN.findall(_clean(text)) if w not in SPECIAL_TOKENS)
    words, freqs = [_symbols(w) for w in counts], list(counts.values())
    pair_counts, where = collections.Counter(), collections.defaultdict(set)  # pair -> count, pair -> word indices
    for k, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += freqs[k]
            where[pair].add(k)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges, merged = [], set()
    while heap and len(merges) < vocab_size - 514:
        count, pair = heapq.heappop(heap)
        if -count != pair_counts[pair] or pair in merged:
            continue  # stale (every count change pushed the new count), or re-formed after its merge
        merges.append(pair)
        merged.add(pair)
        a, b = pair
        changed = set()
        for k in where.pop(pair):
            old, new, i = words[k], [], 0
            while i < len(old):  # merge left to right, as the tokenizer does
                if old[i] == a and i + 1 < len(old) and old[i + 1] == b:
                    new.append(a + b)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            for p in zip(old, old[1:]):
                pair_counts[p] -= freqs[k]
            for p in zip(new, new[1:]):
                pair_counts[p] += freqs[k]
                where[p].add(k)
            changed.update(zip(old, old[1:]), zip(new, new[1:]))
            words[k] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def merges_text(merges):
    """Merges in CLIP's file format (a header line, then 'a b' per line), as UTF-8 bytes."""
    return '\n'.join(['#version: 0.2', *(f'{a} {b}' for a, b in merges), '']).encode('utf-8')


def save_merges(merges, path):
    """Write merges in CLIP's format, gzipped when path ends with .gz."""
    data = merges_text(merges)
    data = gzip.compress(data, mtime=0) if str(path).endswith('.gz') else data
    atomic_write(path, lambda f: f.write(data))


def write_vocab(texts, vocab_size, out):
    """learn_bpe of texts saved to out; a vocab_size out of range is a usage error. Returns the merges."""
    try:
        merges = learn_bpe(texts, vocab_size)
    except ValueError as e:
        raise ConfigError(f"--vocab_size: {e}") from None
    save_merges(merges, out)
    return merges


DEMO_BPE_PATH = Path(__file__).resolve().parent / 'assets' / 'demo_bpe.txt.gz'
DEMO_VOCAB_SIZE = 1024


def build_tokenizer(cfg):
    """Tokenizer of cfg.bpe_path; only a dataset whose row names a vocabulary (the demo's) may leave it empty."""
    default = READERS[cfg.dataset].vocabulary
    if not cfg.bpe_path and default is None:
        raise UserError(f"--dataset={cfg.dataset} needs --bpe_path: CLIP's merges file bpe_simple_vocab_16e6.txt.gz "
                        f"ships with OpenAI CLIP and inside the open_clip_torch wheel (open_clip/), or learn one "
                        f"with python data.py build-vocab captions.txt")
    path = Path(cfg.bpe_path or default).expanduser()
    if not path.is_file():
        raise UserError(f"--bpe_path={path} not found; give a CLIP BPE merges file (.txt or .txt.gz)" if cfg.bpe_path
                        else f"demo vocabulary {path} missing; run python data.py build-demo-vocab")
    return Tokenizer(str(path), cfg.context_length)


@functools.lru_cache(maxsize=4)
def checkpoint_merges(bpe_path):
    """The merges a tokenizer of bpe_path uses (empty: the demo vocabulary), gzipped (~210 KB for CLIP's), read
    once per run: checkpoints carry them so that they evaluate on any machine."""
    return gzip.compress(merges_text(load_merges(Path(bpe_path or DEMO_BPE_PATH).expanduser())), mtime=0)


# --- Images ---
# everything a corrupt or missing image, archive or caption raises while being read
BAD_SAMPLE = (OSError, ValueError, SyntaxError, EOFError, KeyError, zipfile.BadZipFile, tarfile.TarError,
              Image.DecompressionBombError)
MAX_BAD_IN_A_ROW = 100


QUIET_BOMB = ('ignore', None, Image.DecompressionBombWarning, None, 0)  # the entry warnings.filterwarnings makes


def open_image(data, max_pixels=0):
    """PIL image from encoded bytes, upright by its EXIF orientation (phone photos are often stored sideways with
    such a tag); an image over max_pixels (0: no limit) is bounded by fit_pixels before anything is decoded."""
    # decoded here, so that a bad file fails now, except an upright JPEG: the views decode it at the DCT scale their
    # crops allow (augment.draft) and raise UnreadableImage there. Deviation from recipe §4.1 (truncated JPEGs
    # allowed): a truncated image is a bad sample, skipped and counted.
    # the budget decides (fit_pixels): PIL's DecompressionBombWarning at 89M pixels would repeat it. Filtered once per
    # process, not around each image: leaving a catch_warnings resets which warnings were shown, so every other PIL
    # warning (corrupt EXIF, ...) would print again for each image
    if max_pixels and warnings.filters[:1] != [QUIET_BOMB]:
        warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
    img = Image.open(io.BytesIO(data))
    if max_pixels and img.width * img.height > max_pixels:
        fit_pixels(img, max_pixels)
    if img.getexif().get(0x0112, 1) != 1:  # the EXIF orientation tag
        img.load()
        return ImageOps.exif_transpose(img)  # crops are drawn on the upright size, so no draft decoding here
    if img.format != 'JPEG':
        img.load()
    return img


def fit_pixels(img, max_pixels):
    """Set a JPEG over max_pixels to decode at the largest DCT scale (1/2, 1/4, 1/8) that fits; any other image is a
    bad sample (ValueError), never decoded: one huge file (a flat 12000x12000 PNG is 450 KB) would cost a worker GBs."""
    w, h = img.size
    k = next((k for k in (2, 4, 8) if -(-w // k) * -(-h // k) <= max_pixels), None)
    if img.format != 'JPEG' or k is None or img.draft(img.mode, (-(-w // k), -(-h // k))) is None:
        raise ValueError(f"a {w}x{h} {img.format} image is over --max_image_pixels={max_pixels}")


def load_image(path, max_pixels=0):
    """open_image of a file: the one decode of training and evaluation."""
    return open_image(Path(path).read_bytes(), max_pixels)


# --- Format checks ---
def existing(path, flag, expected):
    """Path(path), or one line naming the missing path and what was expected there."""
    if not path:
        raise ConfigError(f"--{flag} is empty; give {expected}")
    if not Path(path).expanduser().exists():
        raise UserError(f"--{flag}={path} not found; expected {expected}")
    return Path(path).expanduser()


def bad_format(cfg, problem):
    return UserError(f"--metadata={cfg.metadata} ({problem}): expected {READERS[cfg.dataset].expects}")


# magic bytes at the start of a file -> (kind, what it looks like)
MAGIC = [(b'\x93NUMPY', 'npy', 'a NumPy .npy array'), (b'PK\x03\x04', 'zip', 'a zip archive (.zip or .npz)'),
         (b'PK\x05\x06', 'zip', 'an empty zip archive'), (b'\x1f\x8b', 'gzip', 'gzip-compressed data'),
         (b'BZh', 'bzip2', 'bzip2-compressed data'), (b'\xfd7zXZ\x00', 'xz', 'xz-compressed data'),
         (b'PAR1', 'parquet', 'a Parquet table'), (b'\xff\xd8\xff', 'jpeg', 'a JPEG image'),
         (b'\x89PNG', 'png', 'a PNG image'), (b'SQLite format 3', 'sqlite', 'an SQLite database'),
         *((b'\x80' + bytes([protocol]), 'pickle', 'a Python pickle') for protocol in (2, 3, 4, 5))]


def sniff(path):
    """(kind, description) of a file from its first 4 KiB: what it looks like, for one-line format errors."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    if not head:
        return 'empty', 'an empty file'
    for magic, kind, what in MAGIC:
        if head.startswith(magic):
            return kind, what
    if head[257:262] == b'ustar':
        return 'tar', 'a tar archive'
    if b'\x00' in head:
        return 'binary', f'binary data starting 0x{head[:8].hex()}'
    try:
        kind, what, text = 'text', 'text', head.decode('utf-8') if len(head) < 4096 else head[:-3].decode('utf-8')
    except UnicodeDecodeError:
        kind, what, text = 'latin', 'non-UTF-8 text', head.decode('latin-1')
    return kind, f'{what} starting {text.lstrip().splitlines()[0][:60] if text.strip() else text[:20]!r}'


def check_format(path, cfg, name=None):
    """Raise one line naming the file, what it looks like and what --dataset expects, when the kinds differ."""
    kind, what = sniff(path)
    if kind not in READERS[cfg.dataset].kinds:
        raise UserError(f"{name or f'--metadata={path}'} looks like {what}, but --dataset={cfg.dataset} expects "
                        f"{READERS[cfg.dataset].expects}")


# --- Compact metadata ---
# Millions of str objects would be copied page by page into every data-loader worker as their reference counts
# are touched (copy-on-read); flat numpy arrays are shared. SEP never occurs in UTF-8, so an entry's captions
# join into one string exactly; NOT_TEXT (never in UTF-8 either) marks an entry whose captions are not text.
SEP, NOT_TEXT = b'\xff', b'\xfe'


def utf8(text):
    return text.encode('utf-8', 'surrogatepass')  # lone surrogates (rare in scraped text) keep their bytes


def join_captions(value):
    """The SEP-joined UTF-8 of an entry's candidate captions (a str or a non-empty list of str), else NOT_TEXT."""
    if isinstance(value, str):
        return utf8(value)
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        try:
            return SEP.join([c.encode('utf-8', 'surrogatepass') for c in value])  # inlined: millions of entries
        except AttributeError:  # an item that is not text (a number, None, bytes)
            pass
    return NOT_TEXT


class Strings:
    """A read-only list of str as the arrays name.data (one UTF-8 byte buffer) and name.offsets (int64, 8 bytes
    per item beyond the text)."""
    encode = staticmethod(utf8)

    def __init__(self, arrays, name):
        self.data, self.offsets = arrays[f'{name}.data'], arrays[f'{name}.offsets']

    @classmethod
    def arrays(cls, name, items):
        encoded = [cls.encode(item) for item in items]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        offsets[1:] = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        return {f'{name}.data': np.frombuffer(b''.join(encoded), np.uint8), f'{name}.offsets': offsets}

    def __len__(self):
        return len(self.offsets) - 1

    def raw(self, i):
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def __getitem__(self, i):
        return self.raw(i).decode('utf-8', 'surrogatepass')


class CaptionLists(Strings):
    """Each entry's candidate captions as one SEP-joined string; [i] -> tuple of str, or ValueError (a bad
    sample) for an entry whose captions were not text."""
    encode = staticmethod(join_captions)

    def __getitem__(self, i):
        raw = self.raw(i)
        if raw == NOT_TEXT:
            raise ValueError(f"captions of entry {i} are not text")
        return tuple(c.decode('utf-8', 'surrogatepass') for c in raw.split(SEP))


def cache_files(source, output_dir, name):
    """Where a cache of the file `source` lives: beside it, or in output_dir when that folder is read-only."""
    return [Path(source).resolve().parent / name, Path(output_dir).resolve() / name]


def write_cache(files, write):
    """write(file) for the first of files whose folder can be made and written; that file, or None."""
    for file in files:
        with contextlib.suppress(OSError):
            file.parent.mkdir(parents=True, exist_ok=True)
            write(file)
            return file
    return None


def cached_arrays(metadata, output_dir, how, build):
    """The arrays {name: array} build() makes from the file metadata, cached as .npy files (cache_files) and
    memory-mapped while its size, mtime and `how` it is read are unchanged: a restart skips the parsing."""
    # the ranks of a node share the mapped pages; each file is replaced atomically and the stamp last
    st = os.stat(metadata)
    stamp = {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'how': how}
    folders = cache_files(metadata, output_dir, Path(metadata).resolve().name + '.arrays')
    stamps = [folder / 'stamp.json' for folder in folders]
    for file in stamps:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(file.read_text()) == stamp:
                return {f.stem: np.load(f, mmap_mode='r') for f in file.parent.glob('*.npy')}
    arrays = build()

    def write(file):
        for name, array in arrays.items():
            atomic_write(file.with_name(f'{name}.npy'), lambda f: np.save(f, array))
        atomic_write(file, lambda f: f.write(json.dumps(stamp).encode()))
    write_cache(stamps, write)
    return arrays


# --- Zip central directory ---
ZIP_END, ZIP_ENTRY, ZIP_LOCAL = struct.Struct('<4s4H2IH'), struct.Struct('<4s6H3I5H2I'), struct.Struct('<4s5H3I2H')


def read_zip_member(path, name):
    """Bytes of member `name` of a zip archive with four reads and no parsing of the other entries' records
    (zipfile.ZipFile parses all of them: ~4 ms for a 1,000-member archive)."""
    # archives with a comment, zip64, encryption or an unusual compression are read by zipfile
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        end = os.pread(f.fileno(), ZIP_END.size, max(0, size - ZIP_END.size))
        sig, _, _, _, entries, dir_size, dir_offset, comment = ZIP_END.unpack(end) if len(end) == ZIP_END.size \
            else (b'', 0, 0, 0, 0, 0, 0, 0)
        if sig != b'PK\x05\x06' or comment or entries == 0xFFFF or dir_offset == 0xFFFFFFFF:
            with zipfile.ZipFile(f) as zf:
                return zf.read(name)
        start = size - ZIP_END.size - dir_size  # data prepended to the archive shifts offsets by start - dir_offset
        directory, needle, pos = os.pread(f.fileno(), dir_size, start), name.encode(), -1
        while True:  # the entry whose name field is exactly `name`
            pos = directory.find(needle, pos + 1)
            if pos < 0:
                raise KeyError(f"there is no member {name} in {path}")
            if pos >= ZIP_ENTRY.size and directory[pos - ZIP_ENTRY.size:pos - ZIP_ENTRY.size + 4] == b'PK\x01\x02':
                entry = ZIP_ENTRY.unpack_from(directory, pos - ZIP_ENTRY.size)
                if entry[10] == len(needle):
                    break
        flags, method, crc, stored, length, local = entry[3], entry[4], entry[7], entry[8], entry[9], entry[16]
        if flags & 1 or method not in (0, 8) or 0xFFFFFFFF in (stored, length, local):
            with zipfile.ZipFile(f) as zf:
                return zf.read(name)
        local += start - dir_offset
        header = ZIP_LOCAL.unpack(os.pread(f.fileno(), ZIP_LOCAL.size, local))
        if header[0] != b'PK\x03\x04':
            raise zipfile.BadZipFile(f"bad local header of {name} in {path}")
        data = os.pread(f.fileno(), stored, local + ZIP_LOCAL.size + header[9] + header[10])
    data = zlib.decompress(data, -15) if method == 8 else data
    if len(data) != length or zlib.crc32(data) != crc:
        raise zipfile.BadZipFile(f"{name} in {path} is truncated or corrupt (size or CRC mismatch)")
    return data


# --- Tar header scan and shard index ---
def expand_braces(pattern):
    """'d/{000..002}.tar' -> ['d/000.tar', 'd/001.tar', 'd/002.tar'] (zero padding kept; several ranges allowed)."""
    m = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
    if m is None:
        return [pattern]
    lo, hi = m.groups()
    return [p for i in range(int(lo), int(hi) + 1)
            for p in expand_braces(pattern[:m.start()] + str(i).zfill(len(lo)) + pattern[m.end():])]


def member_key(name):
    """WebDataset convention: 'dir/0001.jpg' -> ('dir/0001', 'jpg'); the extension starts at the first dot."""
    folder, _, base = name.rpartition('/')
    stem, _, ext = base.partition('.')
    return f'{folder}/{stem}' if folder else stem, ext.lower()


# typeflags of regular files (tarfile's isfile() also counts 'S', sparse files, which scan_keys leaves to tarfile)
REGULAR = b'07\x00'


def scan_keys(path):
    """Sample keys of a plain ustar/GNU tar from its 512-byte headers alone (4x faster than tarfile); None where
    tarfile must read it: compressed, pax or GNU long-name headers, links, sparse members, base-256 sizes."""
    keys, pos = set(), 0
    with open(path, 'rb') as f:
        while True:
            header = os.pread(f.fileno(), 512, pos)
            if len(header) < 512 or not header.strip(b'\0'):
                return keys if pos else None  # the end, or a truncated archive: what it holds so far, as tarfile
            stored = header[148:156].strip(b' \0')  # the checksum counts its own field as 8 spaces (256)
            if not stored.isdigit() or int(stored, 8) != sum(header) - sum(header[148:156]) + 256:
                return None if pos == 0 else keys
            kind, size = header[156], header[124:136]
            if kind not in REGULAR and kind != ord('5') or size[0] & 0x80:
                return None
            name = header[:100].split(b'\0', 1)[0]
            if header[257:265] == b'ustar\x0000' and header[345]:
                name = header[345:500].split(b'\0', 1)[0] + b'/' + name
            if kind in REGULAR:
                keys.add(member_key(name.decode('utf-8', 'surrogateescape'))[0])
            pos += 512 + (int(size.strip(b' \0') or b'0', 8) + 511) // 512 * 512


def count_samples(path):
    """Number of sample keys in a shard (header scan, no data read); unreadable shards count what they hold."""
    keys = set()
    with contextlib.suppress(tarfile.TarError, OSError, EOFError, ValueError):
        scanned = scan_keys(path)
        if scanned is not None:
            return len(scanned)
        with tarfile.open(path) as tar:
            keys.update(member_key(m.name)[0] for m in tar if m.isfile())
    return len(keys)


def count_shard(path):
    """A shard's sample count: `successes` of the NNNNN_stats.json img2dataset writes beside it, else count_samples."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(Path(path).with_name(Path(path).name.split('.')[0] + '_stats.json')) as f:
            count = json.load(f).get('successes')
        if isinstance(count, int) and count >= 0:
            return count
    return count_samples(path)


PARALLEL_BYTES = 64 << 20  # shards smaller than this in all are counted in-process: a pool would cost more


def count_in_parallel(paths, nbytes):
    """count_shard of each path, over this rank's share of the CPUs (forked processes: the scan holds the GIL)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    procs = min(len(paths), max(1, cpus // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
    if procs <= 1 or nbytes < PARALLEL_BYTES:
        return [count_shard(p) for p in paths]
    with multiprocessing.get_context('fork').Pool(procs) as pool:
        return pool.map(count_shard, paths, chunksize=max(1, len(paths) // (4 * procs)))


SHARD_INDEX = 'shard_index.json'


def shard_counts(shards, stats, output_dir, rank=0, world_size=1):
    """Sample counts of tar shards, computed once: rank 0 reuses the index entries whose shard size and mtime are
    unchanged, the ranks count disjoint slices of the other shards, rank 0 writes the updated index."""
    # a cached start costs one stat per shard (taken by the caller)
    dist = torch.distributed
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    files = cache_files(shards[0], output_dir, SHARD_INDEX)
    keys = [str(Path(s).resolve()) for s in shards]
    index, lead = {}, rank == 0 or not distributed  # without a group, each rank alone
    if lead:
        for file in reversed(files):  # entries beside the shards win
            with contextlib.suppress(OSError, ValueError):
                index.update(json.loads(file.read_text()))
    known = [entry[2] if isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns] else None
             for entry, st in zip(map(index.get, keys), stats)]
    todo = [i for i, n in enumerate(known) if n is None]
    if distributed:
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    mine = todo[rank::world_size] if distributed else todo
    counted = dict(zip(mine, count_in_parallel([shards[i] for i in mine], sum(stats[i].st_size for i in mine))))
    if distributed:
        parts = [None] * world_size
        dist.all_gather_object(parts, counted)
        counted = {i: n for part in parts for i, n in part.items()}
    for i, n in counted.items():
        known[i] = n
    if lead and todo:  # other shard lists sharing the folder keep their entries
        index.update({key: [st.st_size, st.st_mtime_ns, n] for key, st, n in zip(keys, stats, known)})
        write_index(index, files)
    if distributed:
        box = [known]
        dist.broadcast_object_list(box, src=0)
        known = box[0]
    return known


def write_index(index, files):
    """Write the index atomically to the first writable place of files; say where when it is not the first."""
    data = json.dumps(index, separators=(',', ':')).encode()
    file = write_cache(files, lambda file: atomic_write(file, lambda f: f.write(data)))
    if file not in (None, files[0]):
        print(f"shard counts cached in {file} ({files[0].parent} is read-only)", file=sys.stderr)
    return file


# --- Readers ---
class FileReader:
    """Images stored as files: load(i) -> (image, captions) of root / paths[i], from compact metadata arrays."""

    def __init__(self, root, arrays, max_pixels=0):
        self.root, self.max_pixels, self.captions = Path(root), max_pixels, CaptionLists(arrays, 'captions')
        self.paths = Strings(arrays, 'paths')

    def __len__(self):
        return len(self.captions)

    def load(self, i):
        return load_image(self.root / self.paths[i], self.max_pixels), self.captions[i]

    def name(self, i):
        return str(self.root / self.paths[i])


class YfccReader(FileReader):
    """YFCC15M (recipe §4.1): id XXYYYZZZ is member ZZZ.jpg of root/images/XX/YYY.zip; the captions are the
    non-empty ones of (title, description)."""

    def __init__(self, root, arrays, max_pixels=0):
        self.root, self.max_pixels, self.captions = Path(root), max_pixels, CaptionLists(arrays, 'captions')
        self.ids = arrays['ids']

    def load(self, i):
        data = read_zip_member(*self.member(i))
        return open_image(data, self.max_pixels), tuple(c for c in self.captions[i] if c) or ('',)

    def member(self, i):
        name = f'{int(self.ids[i]):08d}'
        return self.root / 'images' / name[:2] / f'{name[2:5]}.zip', f'{name[5:]}.jpg'

    def name(self, i):
        return '{}:{}'.format(*self.member(i))


class MergedReader:
    """Concatenation of readers through a precomputed offset table (recipe §8.21)."""

    def __init__(self, readers):
        self.readers, self.starts = readers, [0, *np.cumsum([len(r) for r in readers]).tolist()]

    def __len__(self):
        return self.starts[-1]

    def load(self, i):
        k = bisect.bisect_right(self.starts, i) - 1
        return self.readers[k].load(i - self.starts[k])

    def name(self, i):
        k = bisect.bisect_right(self.starts, i) - 1
        return self.readers[k].name(i - self.starts[k])


def metadata_arrays(cfg, parse, *how):
    """The arrays {name: array} parse(path) makes of --metadata, once it exists and looks like its format, cached by
    how it is read and the code reading it (cached_arrays); a parse error is one line naming the file and format."""
    path = existing(cfg.metadata, 'metadata', READERS[cfg.dataset].expects)
    check_format(path, cfg)

    def build():
        try:
            return parse(path)
        except UserError:
            raise
        except Exception as e:  # unpickling or parsing foreign data can raise almost any exception type
            raise bad_format(cfg, f'{type(e).__name__}: {e}') from None
    code = ''.join(inspect.getsource(getattr(f, 'func', f)) for f in (READERS[cfg.dataset].read, parse))
    return cached_arrays(path, cfg.output_dir, [cfg.dataset, hashlib.sha256(code.encode()).hexdigest(), *how], build)


def read_npy(cfg, key):
    """CC3M ('image_id') or CC12M ('image_name'): a .npy object array of dicts {key: image path, 'captions': [...]}."""
    def parse(path):
        meta = np.load(path, allow_pickle=True)
        return {**Strings.arrays('paths', [str(d[key]) for d in meta]),
                **CaptionLists.arrays('captions', [d['captions'] for d in meta])}
    arrays = metadata_arrays(cfg, parse)
    return FileReader(existing(cfg.root, 'root', 'the folder holding the images'), arrays, cfg.max_image_pixels)


def read_yfcc(cfg):
    """YFCC15M: a pickled list of (image_id, title, description)."""
    def parse(path):
        with open(path, 'rb') as f:
            items = pickle.load(f)
        if not isinstance(items, (list, tuple, np.ndarray)) or not all(
                isinstance(t, (list, tuple)) and len(t) == 3 and isinstance(t[0], (int, np.integer)) for t in items):
            raise bad_format(cfg, 'entries are not (int, str, str) triples')
        ids = np.asarray([t[0] for t in items], np.int64)
        ids = ids.astype(np.uint32) if len(ids) and 0 <= ids.min() and ids.max() < 2 ** 32 else ids  # half the bytes
        return {'ids': ids, **CaptionLists.arrays('captions', [t[1:] for t in items])}
    arrays = metadata_arrays(cfg, parse)
    return YfccReader(existing(cfg.root, 'root', 'the folder holding images/XX/YYY.zip'), arrays, cfg.max_image_pixels)


def read_csv(cfg):
    """(image path, caption) rows; ',' or tab separated by extension; paths relative to --root or the file."""
    keys, suffix = (cfg.csv_image_key, cfg.csv_caption_key), Path(cfg.metadata).suffix.lower()

    def parse(path):
        try:
            with open(path, newline='', encoding='utf-8-sig') as f:  # -sig: a BOM (Excel) is not a column name
                rows = csv.reader(f, delimiter='\t' if suffix == '.tsv' else ',')
                header = next(rows, [])
                missing = [k for k in keys if k not in header]
                if missing:
                    raise bad_format(cfg, f"no column {missing[0]!r} among {header}")
                a, b = map(header.index, keys)
                rows = [(r[a] if a < len(r) else '', r[b] if b < len(r) else None) for r in rows if r]
        except UnicodeDecodeError as e:
            raise bad_format(cfg, f"not UTF-8 text: {e.reason} in {e.object[e.start:e.start + 8]!r}") from None
        return {**Strings.arrays('paths', [r[0] for r in rows]),
                **CaptionLists.arrays('captions', [r[1] for r in rows])}
    arrays = metadata_arrays(cfg, parse, *keys, suffix)
    root = existing(cfg.root, 'root', 'the folder holding the images') if cfg.root else \
        Path(cfg.metadata).expanduser().parent
    return FileReader(root, arrays, cfg.max_image_pixels)


MERGED = ('cc3m', 'cc12m', 'yfcc15m')  # the parts of merged29m, in the order of its --metadata and --root values


def read_merged(cfg):
    """Merged 29M (recipe §8.21): the readers of its parts, each read as its own row, concatenated."""
    metadata, roots = cfg.metadata.split('---'), cfg.root.split('---')
    if len(metadata) != len(MERGED) or len(roots) != len(MERGED):
        raise ConfigError(f"--dataset={cfg.dataset} needs {len(MERGED)} --metadata and {len(MERGED)} --root values "
                          f"joined by '---', in the order {'---'.join(MERGED)}")
    return MergedReader([READERS[part].read(dataclasses.replace(cfg, dataset=part, metadata=m, root=r))
                         for part, m, r in zip(MERGED, metadata, roots)])


def read_shards(cfg, rank=0, world_size=1):
    """Shard paths and sample counts of the brace pattern cfg.metadata (under --root), checked before any
    worker starts."""
    pattern, expects = str(Path(cfg.root) / cfg.metadata) if cfg.root else cfg.metadata, READERS[cfg.dataset].expects
    if not cfg.metadata:
        raise ConfigError(f"--metadata is empty; give {expects}")
    shards = expand_braces(pattern)
    stats, missing = [], []
    for s in shards:
        try:
            stats.append(os.stat(s))
        except OSError:
            missing.append(s)
    if missing:
        raise UserError(f"--metadata={cfg.metadata}: the pattern {pattern} matches {len(stats)} files, "
                        f"{len(missing)} of {len(shards)} shards not found (e.g. {missing[0]}); expected {expects}")
    check_format(shards[0], cfg, f'shard {shards[0]} of --metadata={cfg.metadata}')
    counts = shard_counts(shards, stats, cfg.output_dir, rank, world_size)
    if sum(counts) == 0:
        raise bad_format(cfg, 'no readable tar members')
    workers = max(1, cfg.workers)
    if len(shards) < world_size * workers:
        raise ConfigError(f"{len(shards)} shards cannot feed {world_size} ranks x {workers} workers; "
                          f"lower --workers or write more shards")
    return shards, counts


# A data format is one row: read(cfg) -> its reader (len, load(i) -> (image, candidate captions), name(i) -> where
# sample i lives, for the list of skipped samples); a streamed format's read(cfg, rank, world_size) -> (shard paths,
# sample counts) for TarShards. `expects` says what --metadata must be (in every format error), `kinds` what sniff
# may find it to be, `vocabulary` the merges used when --bpe_path is empty. A new format: its read function and a
# row here (a config.RECIPES row for settings).
Reader = collections.namedtuple('Reader', 'read expects kinds streamed vocabulary', defaults=(False, None))
READERS = {
    # the demo's reader is defined with the demo, below: the lambda looks it up when called
    'demo': Reader(lambda cfg: DemoReader(cfg), 'no metadata: the scenes are drawn on the fly', (),
                   vocabulary=DEMO_BPE_PATH),
    'cc3m': Reader(functools.partial(read_npy, key='image_id'), "a .npy object array of dicts "
                   "{'image_id': image path under --root, 'captions': [str, ...]}", {'npy', 'pickle'}),
    'cc12m': Reader(functools.partial(read_npy, key='image_name'), "a .npy object array of dicts "
                    "{'image_name': image path under --root, 'captions': [str, ...]}", {'npy', 'pickle'}),
    # pickles of protocol 0 are text, of protocol 1 binary
    'yfcc15m': Reader(read_yfcc, "a pickled list of (image_id: int, title: str, description: str), images in "
                      "--root/images/XX/YYY.zip", {'pickle', 'text', 'latin', 'binary'}),
    'merged29m': Reader(read_merged, f"the {', '.join(MERGED)} metadata joined by '---'", ()),
    'csv': Reader(read_csv, "a UTF-8 .csv or .tsv with a header naming the --csv_image_key and --csv_caption_key "
                  "columns", {'text'}),
    'wds': Reader(read_shards, "tar shards given by a pattern such as dir/{00000..00099}.tar, each holding "
                  "key.jpg + key.txt", {'tar', 'gzip', 'bzip2', 'xz'}, streamed=True),
}
if set(RECIPES) - set(READERS):
    raise TypeError(f"config.RECIPES has rows without a reader: {', '.join(sorted(set(RECIPES) - set(READERS)))}; "
                    f"add their rows to data.READERS or remove the recipes")


def build_reader(cfg):
    """The map-style reader of cfg.dataset's row; bad paths or metadata raise one line before any worker starts."""
    reader = READERS[cfg.dataset].read(cfg)
    if len(reader) == 0:
        raise ConfigError(f"--metadata={cfg.metadata} lists no samples")
    errors = []
    for i in range(min(len(reader), 16)):
        try:
            reader.load(i)[0].load()  # a JPEG too: the loaders decode it later
            return reader
        except BAD_SAMPLE as e:
            errors.append(e)
    raise ConfigError(f"none of the first {len(errors)} samples of --metadata={cfg.metadata} is readable "
                      f"({errors[-1]!r}); check --root={cfg.root}")


# --- Samples ---
def sample_seed(*keys):
    """A 64-bit seed mixed from integers (NumPy SeedSequence): per-sample randomness independent of workers."""
    return int(np.random.SeedSequence([k & (2 ** 64 - 1) for k in keys]).generate_state(1, np.uint64)[0])


class SampleMaker:
    """(image, candidate captions) -> the CL2L training sample (recipe §4.3). All randomness comes from
    (cfg.seed, epoch, index), so a sample is the same whichever rank or worker makes it."""

    def __init__(self, cfg, tokenizer):
        self.image_views, self.text_views, self.tokenizer = ImageViews(cfg), TextViews(cfg), tokenizer
        self.seed, self.single = cfg.seed, cfg.caption_sampling == 'single'
        self.defer = cfg.augment_device != 'cpu'  # the training step finishes the views (augment.finish_views)

    def __call__(self, image, captions, epoch, index, skipped):
        seed = sample_seed(self.seed, epoch, index)
        rng = random.Random(seed)
        if self.single:  # recipe §4.2: one caption for every text view
            captions = (rng.choice(captions),)
        gen = torch.Generator().manual_seed(seed)  # the caller's generators are left alone (workers=0)
        if self.defer:  # the step crops and finishes the views (augment.finish_views)
            images, boxes, columns = self.image_views.draw_for_step(image, gen)
            views = {'images': images, 'boxes': boxes, 'photometric': columns}
        else:
            weak, strong = self.image_views(image, gen)
            views = {'weak': weak, 'strong': strong}
        tokens = self.tokenizer(self.text_views(captions, rng))  # (1+A, 77)
        return {**views, 'tokens': tokens, 'skipped': skipped}


def read_sample(load, make_sample, epoch, index, bad):
    """(sample, None) from load()'s (image, captions), or (None, error) when the sample cannot be read or decoded. The
    sample counts and names (as JSON) the unreadable samples `bad` ([where, why] pairs) that it replaces or follows."""
    try:
        image, captions = load()
        captions = tuple(c for c in captions if _clean(c))
        if not captions:
            raise ValueError("the captions are empty (after cleaning)")
    except BAD_SAMPLE as e:
        return None, e
    try:
        sample = make_sample(image, captions, epoch, index, len(bad))
    except UnreadableImage as e:  # a JPEG, decoded by the views at the scale their crops allow
        return None, e
    sample['skipped_files'] = json.dumps(bad)
    return sample, None


def bad_sample(where, error):
    """[where, why] of an unreadable sample, for the log and output_dir/skipped.jsonl."""
    return [where, f'{type(error).__name__}: {first_line(error)}']


class TrainDataset(torch.utils.data.Dataset):
    """Map-style samples keyed by (epoch, index). An unreadable sample is counted and named, and replaced by rows drawn
    from (seed, epoch, index, attempt): the same whichever worker draws them and on resume, and a run of k unreadable
    rows costs O(k) reads. A drawn row that fails is not counted here: it is counted at its own turn in the epoch."""

    def __init__(self, reader, make_sample, seed):
        self.reader, self.make_sample, self.seed = reader, make_sample, seed

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, key):
        epoch, index = key
        row, bad = index, []
        for attempt in range(1, MAX_BAD_IN_A_ROW + 1):
            sample, error = read_sample(functools.partial(self.reader.load, row), self.make_sample, epoch, index, bad)
            if sample is not None:
                return sample
            bad = bad or [bad_sample(self.reader.name(row), error)]
            row = sample_seed(self.seed, epoch, index, attempt) % len(self.reader)
        raise UserError(f"{MAX_BAD_IN_A_ROW} unreadable samples in a row for index {index} ({error!r}): most of the "
                        f"data cannot be read; check --root and --metadata")


def read_shard(path):
    """Yield (key, {ext: bytes}) per sample of a tar shard, streamed; a broken tail yields (None, {}) and stops."""
    key, group = None, {}
    try:
        with tarfile.open(path, 'r|*') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = member_key(member.name)
                if k != key and key is not None:
                    yield key, group
                    group = {}
                key, group[ext] = k, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        yield None, {}
        return
    if key is not None:
        yield key, group


def decode_group(group, max_pixels=0):
    """(image, captions) of one tar sample; a missing part, a bad image or non-UTF-8 text raises a BAD_SAMPLE."""
    image = next((group[e] for e in ('jpg', 'jpeg', 'png', 'webp') if e in group), None)
    if image is None or 'txt' not in group:
        raise KeyError(f"sample has {sorted(group)}, needs jpg/png/webp + txt")
    return open_image(image, max_pixels), (group['txt'].decode('utf-8'),)


SHUFFLE_BUFFER = 1000


class TarShards(torch.utils.data.IterableDataset):
    """WebDataset-style shards streamed with tarfile: each epoch shuffled (seed, epoch), split across ranks then
    workers, through a shuffle buffer. set_epoch(epoch, start_batch) resumes by shard: consumed ones are not read."""
    # Every worker yields a fixed number of full batches (its shards are re-read if they run short, extra samples
    # wait for the next epoch), so all ranks run len(loader) batches; with equal shards that divide evenly, each
    # sample is seen once per epoch.

    def __init__(self, shards, counts, make_sample, cfg, rank, world_size):
        self.shards, self.counts, self.make_sample = shards, counts, make_sample
        self.starts = [0, *np.cumsum(counts).tolist()]  # global sample index = shard start + position
        self.seed, self.batch_size, self.rank, self.world_size = cfg.seed, cfg.batch_size, rank, world_size
        self.batches = sum(counts) // world_size // cfg.batch_size
        self.epoch, self.start_batch, self.max_pixels = 0, 0, cfg.max_image_pixels

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches * self.batch_size  # samples this rank yields per epoch

    def groups(self, shards, skip):
        """(index, where, group) forever, cycling over shards; the first pass starts after `skip` samples' worth of
        whole shards."""
        skip %= max(1, sum(self.counts[s] for s in shards))
        while True:
            read = 0
            for s in shards:
                if skip >= self.counts[s]:
                    skip -= self.counts[s]
                    continue
                skip = 0
                for position, (key, group) in enumerate(read_shard(self.shards[s])):
                    read += 1
                    yield self.starts[s] + position, f'{self.shards[s]}:{key or "(unreadable from here)"}', group
            if read == 0:
                raise UserError(f"shards {[self.shards[s] for s in shards][:3]} hold no readable samples; check them")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order.tolist()[self.rank::self.world_size][worker::workers]
        # batch b of the epoch comes from worker b % workers (the DataLoader's round robin)
        quota, done = len(range(worker, self.batches, workers)), len(range(worker, self.start_batch, workers))
        rng = random.Random(sample_seed(self.seed, self.epoch, self.rank, worker))
        stream, buffer = self.groups(mine, done * self.batch_size), []
        left, bad = (quota - done) * self.batch_size, []
        while left > 0:
            while len(buffer) < min(SHUFFLE_BUFFER, left):  # never read more than this epoch still needs
                buffer.append(next(stream))
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            index, where, group = buffer.pop()
            sample, error = read_sample(functools.partial(decode_group, group, self.max_pixels), self.make_sample,
                                        self.epoch, index, bad)
            if sample is None:  # read past: each unreadable member is read and counted once
                bad.append(bad_sample(where, error))
                if len(bad) == MAX_BAD_IN_A_ROW:
                    raise UserError(f"{len(bad)} unreadable tar samples in a row ({error!r}); check the shards")
                continue
            yield sample
            bad, left = [], left - 1


def samples_read(delivered, skipped, cfg):
    """The distinct samples read this epoch, `skipped` of them unreadable: a map-style epoch replaces an unreadable
    sample by a drawn one that has its own turn (so `delivered`), a stream reads on past it (delivered + skipped)."""
    return delivered + skipped if READERS[cfg.dataset].streamed else delivered


def check_bad_fraction(skipped, seen, cfg):
    """Raise when more than cfg.bad_sample_threshold of the samples read this epoch were unreadable."""
    if seen and skipped / seen > cfg.bad_sample_threshold:
        raise UserError(f"{skipped} of {seen} samples read this epoch ({100 * skipped / seen:.2f}%) were unreadable "
                        f"(missing, corrupt or non-text), above --bad_sample_threshold={cfg.bad_sample_threshold}; "
                        f"fix the data or raise --bad_sample_threshold")


# --- Shared memory ---
# Loader workers hand their batches to the training process through /dev/shm, PREFETCH batches each ahead of use;
# one that cannot hold them (Docker's default is 64 MB) ends the run with "Bus error" at the first batch
PREFETCH = 2  # batches each worker keeps ready: the DataLoader's prefetch_factor
VIEW_BYTES = 1  # bytes per pixel channel of the image views the workers ship (uint8)
TOKEN_BYTES = 8  # int64 token ids
SHM = '/dev/shm'


def batch_bytes(cfg, view_bytes=VIEW_BYTES):
    """Bytes of one training batch in shared memory: per sample the weak view (3 S^2), the A strong views (A 3 R^2;
    with --augment_device=cuda the region their crops cover, up to REGION_LIMIT x those pixels) and the tokens."""
    pixels = 3 * cfg.image_size ** 2 + cfg.num_augs * 3 * cfg.local_crop_size ** 2
    if cfg.augment_device == 'cuda':
        pixels *= REGION_LIMIT
    return cfg.batch_size * (pixels * view_bytes + (1 + cfg.num_augs) * cfg.context_length * TOKEN_BYTES)


def shm_free():
    """Free bytes in /dev/shm; None where there is none."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_shared_memory(cfg, local_world_size=1):
    """One line when /dev/shm cannot hold the batches that the loader workers of this node's ranks keep ready,
    naming the --workers that fits and how a container gets more."""
    free, batch = shm_free(), batch_bytes(cfg)
    per_worker = PREFETCH * batch * local_world_size  # one worker on every rank of the node
    if cfg.workers == 0 or free is None or per_worker * cfg.workers <= free:
        return
    need, fits = per_worker * cfg.workers, free // per_worker
    slow = " (loading in the training process: slow)" if fits == 0 else ''
    raise UserError(f"{SHM} has {free / 2**20:,.0f} MiB free, but {local_world_size} rank(s) x {cfg.workers} loader "
                    f"workers x {PREFETCH} batches of {batch / 2**20:,.1f} MiB need {need / 2**20:,.0f} MiB there "
                    f"('Bus error' at the first batch); pass --workers={fits}{slow}, or give the container more: "
                    f"docker run --shm-size={math.ceil(need / 2**30) + 1}g (or --ipc=host)", every_rank=True)


# --- Loaders ---
class EpochSampler(torch.utils.data.DistributedSampler):
    """This rank's (epoch, index) keys in DistributedSampler's order. set_epoch(epoch, start_batch) starts at batch
    start_batch without producing the keys of the skipped samples, so they are never read or decoded."""

    def __init__(self, size, batch_size, seed, rank, world_size):
        super().__init__(range(size), world_size, rank, shuffle=True, seed=seed)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        for index in itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None):
            yield self.epoch, index


def init_worker(worker_id):
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the main process, end when it ends, and freeze the objects they
    inherit from it."""
    # The main process saves a checkpoint before exiting (SLURM and a Ctrl-C signal the whole process group). The
    # kernel's parent-death signal ends a worker where the main process dies without its exit hooks (os._exit,
    # kill -9; else end_workers_at_exit). Frozen, the inherited objects' pages are never written (so copied) by the
    # garbage collector (measured: ~80 MB per worker with torch alone, all of a metadata list's objects;
    # python -m bench.metadata).
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform == 'linux':
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    gc.freeze()


def end_workers_at_exit():
    """At interpreter exit multiprocessing terminates daemonic children (loader workers) with SIGTERM, then joins
    them: workers ignoring SIGTERM would never end, and neither would the main process. Kill them first."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join()


atexit.register(end_workers_at_exit)  # after multiprocessing's own exit hook, so it runs before it


def trim_tokens(tokens):
    """(..., L) token ids -> (..., L'): the zero padding that follows every row's end dropped. The causal text
    transformer's EOT features never see that padding, so batches of short captions cost fewer FLOPs."""
    used = tokens.reshape(-1, tokens.shape[-1]).ne(0).any(dim=0)  # (L,) columns holding a token in any row
    return tokens[..., :int(used.nonzero().max()) + 1 if used.any() else 1]


def collate(samples):
    """default_collate with the tokens trimmed to the batch's longest caption; --augment_device=cuda's images of
    different sizes, their crop boxes and photometric columns are packed into three tensors (augment.pack_views)."""
    images = [s.pop('images') for s in samples if 'images' in s]
    batch = torch.utils.data.default_collate(samples)
    batch['tokens'] = trim_tokens(batch['tokens'])
    if images:
        batch.update(pack_views(images, batch.pop('boxes'), batch.pop('photometric')))
    return batch


def build_train_loader(cfg, tokenizer, rank=0, world_size=1):
    """Training batches of this rank (recipe §4.4): shuffled per epoch, drop_last, loader.sampler.set_epoch."""
    check_shared_memory(cfg, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    make_sample, row = SampleMaker(cfg, tokenizer), READERS[cfg.dataset]
    if row.streamed:  # workers restart each epoch (not persistent) so that they see the epoch set on the dataset
        dataset, options = TarShards(*row.read(cfg, rank, world_size), make_sample, cfg, rank, world_size), {}
    else:
        dataset = TrainDataset(build_reader(cfg), make_sample, cfg.seed)
        options = dict(sampler=EpochSampler(len(dataset), cfg.batch_size, cfg.seed, rank, world_size),
                       persistent_workers=cfg.workers > 0)
    loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, num_workers=cfg.workers, drop_last=True,
                                         pin_memory=cfg.device != 'cpu' and torch.cuda.is_available(),
                                         collate_fn=collate, worker_init_fn=init_worker, **options)
    if row.streamed:  # the map-style loader's interface; the stream splits and shuffles by the epoch it is set
        loader.sampler.set_epoch = dataset.set_epoch
    if len(loader) == 0:
        raise ConfigError(f"--dataset={cfg.dataset} gives each of {world_size} rank(s) less than one batch of "
                          f"--batch_size={cfg.batch_size} (--global_batch={cfg.global_batch}); lower --global_batch or "
                          f"add data")
    return loader


def build_eval_loader(dataset, cfg, rank=0, world_size=1):
    """Batches of this rank's contiguous slice of dataset: exact and unpadded, the ranks' union is the whole set."""
    n = len(dataset)
    part = range(rank * n // world_size, (rank + 1) * n // world_size)
    return torch.utils.data.DataLoader(dataset, cfg.eval_batch_size, sampler=part, num_workers=cfg.workers,
                                       pin_memory=cfg.device != 'cpu' and torch.cuda.is_available())


# --- Demo dataset ---
# Procedural scenes of one or two coloured shapes; some colour+shape combinations are held out of training
# so that zero-shot evaluation can test composition.
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 90, 230), 'yellow': (240, 220, 40),
           'purple': (150, 60, 200), 'orange': (250, 140, 20), 'white': (240, 240, 240)}
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'heart')
COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES)
HELD_OUT = frozenset({('red', 'star'), ('green', 'heart'), ('blue', 'triangle'), ('yellow', 'cross'),
                      ('purple', 'circle'), ('orange', 'square'), ('white', 'star')})
SIZES = {'small': 0.16, 'large': 0.21}  # radius as a fraction of the canvas
POSITIONS = {'left': (0.25, 0.5), 'right': (0.75, 0.5), 'top': (0.5, 0.25), 'bottom': (0.5, 0.75), 'centre': (0.5, 0.5)}
RELATIONS = {('left', 'right'): 'to the left of', ('right', 'left'): 'to the right of',
             ('top', 'bottom'): 'above', ('bottom', 'top'): 'below'}
# split: (id, objects per scene, allowed combinations)
DEMO_SPLITS = {'train': (0, (1, 2), tuple(c for c in COMBOS if c not in HELD_OUT)), 'single': (1, (1,), COMBOS),
               'unseen': (2, (1,), tuple(c for c in COMBOS if c in HELD_OUT)), 'retrieval': (3, (1, 2), COMBOS),
               'single_train': (4, (1,), COMBOS), 'unseen_train': (5, (1,), tuple(c for c in COMBOS if c in HELD_OUT))}
DEMO_CAPTIONS = 3  # candidate captions per image


def _unit_polygons():
    """Vertices of each polygonal shape around (0, 0) with radius ~1 (y points down)."""
    star = [(r * math.cos(a), r * math.sin(a)) for k in range(10)
            for a, r in [(-math.pi / 2 + k * math.pi / 5, 1.0 if k % 2 == 0 else 0.45)]]
    w = 0.32
    cross = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    heart = [(16 * math.sin(t) ** 3 / 17, 0.15 - (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                  - math.cos(4 * t)) / 17)
             for t in np.linspace(0, 2 * math.pi, 28, endpoint=False)]
    triangle = [(1.1 * math.cos(a), 1.1 * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return {'square': [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], 'triangle': triangle,
            'star': star, 'cross': cross, 'heart': heart}


POLYGONS = _unit_polygons()
Obj = collections.namedtuple('Obj', 'colour shape size position x y radius angle rgb')  # x, y, radius: canvas fractions
Scene = collections.namedtuple('Scene', 'objects background')  # background: (kind, rgb1, rgb2, noise seed, vertical)


def demo_scene(seed, split, index):
    """The attribute record of demo image `index` of `split`: a pure function of (seed, split, index)."""
    split_id, counts, combos = DEMO_SPLITS[split]
    rng = random.Random(sample_seed(seed, split_id, index))
    first = rng.choice(combos)
    if rng.choice(counts) == 1:
        picks, places = [first], [rng.choice(list(POSITIONS))]
    else:
        picks, places = [first, rng.choice([c for c in combos if c != first])], rng.choice(list(RELATIONS))
    objects = []
    for (colour, shape), place in zip(picks, places):
        size = rng.choice(list(SIZES))
        x, y = (v + rng.uniform(-0.03, 0.03) for v in POSITIONS[place])
        rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[colour])
        objects.append(Obj(colour, shape, size, place, x, y, SIZES[size] * rng.uniform(0.9, 1.1),
                           rng.uniform(-20, 20), rgb))
    dark = [tuple(rng.randint(0, 100) for _ in range(3)) for _ in range(2)]
    background = (rng.choice(('solid', 'gradient', 'noise')), *dark, rng.getrandbits(32), rng.random() < 0.5)
    return Scene(tuple(objects), background)


def draw_scene(scene, canvas):
    """Render a scene record as a canvas x canvas RGB image (dark solid, gradient or noise background)."""
    kind, rgb1, rgb2, noise_seed, vertical = scene.background
    if kind == 'solid':
        pixels = np.array(rgb1, dtype=np.float32)
    elif kind == 'gradient':
        t = np.linspace(0, 1, canvas, dtype=np.float32).reshape((-1, 1, 1) if vertical else (1, -1, 1))
        pixels = np.array(rgb1) * (1 - t) + np.array(rgb2) * t  # (canvas, 1, 3) or (1, canvas, 3)
    else:
        pixels = np.array(rgb1) + np.random.default_rng(noise_seed).normal(0, 24, (canvas, canvas, 3))
    pixels = np.broadcast_to(np.clip(pixels, 0, 255).astype(np.uint8), (canvas, canvas, 3))
    img = Image.fromarray(np.ascontiguousarray(pixels), 'RGB')
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x, y, r = o.x * canvas, o.y * canvas, o.radius * canvas
        if o.shape == 'circle':
            draw.ellipse([x - r, y - r, x + r, y + r], fill=o.rgb)
        else:
            c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
            draw.polygon([(x + r * (u * c - v * s), y + r * (u * s + v * c)) for u, v in POLYGONS[o.shape]], fill=o.rgb)
    return img


PLACE_WORDS = {'left': ('on the left', 'to the left', 'on the left side'),
               'right': ('on the right', 'to the right', 'on the right side'),
               'top': ('at the top', 'near the top', 'in the upper part'),
               'bottom': ('at the bottom', 'near the bottom', 'in the lower part'),
               'centre': ('in the centre', 'in the middle', 'at the center')}
SINGLE_TEMPLATES = ('{np}', '{np} {pos}', 'a photo of {np}', 'a photo of {np} {pos}', 'there is {np} {pos}',
                    '{pos} there is {np}', '{the} is {pos}', 'an image showing {np}')
PAIR_TEMPLATES = ('{np} and {np2}', 'a photo of {np} and {np2}', '{np} {pos} and {np2} {pos2}',
                  'there is {np} {rel} {np2}', '{the} is {rel} {the2}', '{np} {pos}, {np2} {pos2}',
                  'two shapes: {np} and {np2}')


def noun_phrase(obj, rng):
    """Words naming an object: 'small red circle', 'circle in red', 'star coloured blue', or, half of the time,
    the shape alone ('large heart')."""
    # captions without the colour can only be matched by shape, which colour overshadows otherwise (held-out shape
    # after 3 epochs at lr 5e-4: 23% without them, 31% with a quarter)
    size = [obj.size] if rng.random() < 0.5 else []
    if rng.random() < 0.5:
        return size + [obj.shape]
    return rng.choice([size + [obj.colour, obj.shape], size + [obj.shape, 'in', obj.colour],
                       size + [obj.shape, 'coloured', obj.colour]])


def describe(objects, rng):
    """One caption of a scene: a random template, attributes in varied order and wording."""
    objects = rng.sample(objects, len(objects))  # either object may be named first
    fields = {}
    for suffix, o in zip(('', '2'), objects):
        words = noun_phrase(o, rng)
        fields['np' + suffix] = ('an ' if words[0][0] in 'aeiou' else 'a ') + ' '.join(words)
        fields['the' + suffix] = 'the ' + ' '.join(words)
        fields['pos' + suffix] = rng.choice(PLACE_WORDS[o.position])
    if len(objects) == 2:
        fields['rel'] = RELATIONS[objects[0].position, objects[1].position]
    return rng.choice(SINGLE_TEMPLATES if len(objects) == 1 else PAIR_TEMPLATES).format(**fields)


def demo_captions(seed, split, index, n=DEMO_CAPTIONS):
    """n captions of demo image `index` (their own random stream, so they need no drawing)."""
    rng = random.Random(sample_seed(seed, DEMO_SPLITS[split][0], index, 1))
    objects = demo_scene(seed, split, index).objects
    return tuple(describe(objects, rng) for _ in range(n))


def demo_canvas(cfg):
    """Scenes are drawn at 1.25x the crop size and left to the crops and the eval resize."""
    return round(1.25 * max(cfg.image_size, cfg.local_crop_size))


class DemoReader:
    """The demo training split as a reader: load(i) draws image i and its captions on the fly."""

    def __init__(self, cfg):
        self.seed, self.size, self.canvas = cfg.seed, cfg.demo_train_size, demo_canvas(cfg)

    def __len__(self):
        return self.size

    def load(self, i):
        return draw_scene(demo_scene(self.seed, 'train', i), self.canvas), demo_captions(self.seed, 'train', i)

    def name(self, i):
        return f'demo scene {i}'


class DemoImages(torch.utils.data.Dataset):
    """Held-out demo images through eval_transform, with label 'shape', 'colour', 'colour_shape' or 'index'."""

    def __init__(self, cfg, split, label):
        self.seed, self.split, self.label, self.size = cfg.seed, split, label, cfg.demo_val_size
        self.canvas, self.transform = demo_canvas(cfg), eval_transform(cfg)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        scene = demo_scene(self.seed, self.split, i)
        o = scene.objects[0]
        label = {'shape': SHAPES.index(o.shape), 'colour': list(COLOURS).index(o.colour),
                 'colour_shape': COMBOS.index((o.colour, o.shape)), 'index': i}[self.label]
        return self.transform(draw_scene(scene, self.canvas)), label


EvalTask = collections.namedtuple('EvalTask', 'name classnames templates dataset metric', defaults=('acc',))


def demo_eval_tasks(cfg):
    """Zero-shot tasks on held-out single-object images: shape, colour, and colour+shape over all 42 names
    with images of the combinations never seen in training."""
    # a shape prompt is averaged over the colours and a colour prompt over the shapes: captions name both
    return [EvalTask('shape', list(SHAPES), [f'the {c} {{}}' for c in COLOURS], DemoImages(cfg, 'single', 'shape')),
            EvalTask('colour', list(COLOURS), [f'the {{}} {s}' for s in SHAPES], DemoImages(cfg, 'single', 'colour')),
            EvalTask('colour_shape_unseen', [f'{c} {s}' for c, s in COMBOS], ['the {}', 'a photo of the {}', '{}'],
                     DemoImages(cfg, 'unseen', 'colour_shape'))]


def demo_probe_train(cfg, task):
    """The train split of a demo eval task for the linear probe: scenes of the same kind from their own stream."""
    return DemoImages(cfg, f'{task.dataset.split}_train', task.dataset.label)


def demo_retrieval(cfg):
    """(images: Dataset of (image, image_id), captions: list[str], caption_ids: list[int]) on held-out
    scenes, DEMO_CAPTIONS captions per image."""
    captions = [(c, i) for i in range(cfg.demo_val_size) for c in demo_captions(cfg.seed, 'retrieval', i)]
    return DemoImages(cfg, 'retrieval', 'index'), [c for c, _ in captions], [i for _, i in captions]


# --- Command line ---
USAGE = ("python data.py build-vocab captions.txt [--vocab_size=49408] [--out=vocab.txt.gz] | "
         "python data.py build-demo-vocab [--vocab_size=1024] [--out=assets/demo_bpe.txt.gz]")
HELP = f"""usage: {USAGE}
build-vocab learns BPE merges from a file of one caption a line; build-demo-vocab regenerates the demo vocabulary.
--vocab_size: 512 byte symbols + merges + SOT and EOT (CLIP: 49408); --out is gzipped when it ends with .gz"""


def usage_error(message):
    raise ConfigError(f"{message}; usage: {USAGE}")


def command_flags(argv, takes, vocab_size, out, positional=False):
    """(positional arguments, --vocab_size, --out) of a data.py command, by config.parse_flags; a flag it does not
    take, or a vocab_size that is not a number, is one line saying what it `takes`."""
    known = ('vocab_size', 'out')
    try:
        args, flags = parse_flags(argv, known, positional=positional)
    except ConfigError as e:
        bad = [a for a in argv if a.startswith('--') and a[2:].partition('=')[0].replace('-', '_') not in known]
        usage_error(f"unrecognized arguments: {' '.join(bad)}; {takes}" if bad else f"{e}; {takes}")
    if not flags.get('vocab_size', '0').isdigit():
        usage_error(f"--vocab_size={flags['vocab_size']} is not a whole number; {takes}")
    return args, int(flags.get('vocab_size', vocab_size)), flags.get('out', out)


def build_vocab_main(argv):
    """python data.py build-vocab captions.txt [--vocab_size=49408] [--out=vocab.txt.gz]: one caption a line."""
    args, vocab_size, out = command_flags(argv, 'build-vocab takes captions.txt, --vocab_size=N and --out=PATH',
                                          49408, 'vocab.txt.gz', positional=True)
    if not args:
        usage_error("the following arguments are required: captions")
    if len(args) > 1:
        usage_error(f"unrecognized arguments: {' '.join(args[1:])}")
    captions = Path(args[0])
    if not captions.is_file():
        raise UserError(f"captions file {captions} not found; give a text file with one caption a line")
    texts = captions.read_text(encoding='utf-8', errors='replace').splitlines()
    merges = write_vocab(texts, vocab_size, out)
    print(f"learned {len(merges)} merges (vocab_size {len(merges) + 514}) from {len(texts)} captions: {out}")


def build_demo_vocab_main(argv, samples=2000):
    """python data.py build-demo-vocab [--vocab_size=1024] [--out=assets/demo_bpe.txt.gz]: the demo vocabulary,
    learned from the captions of the first demo training images (seed 0)."""
    _, vocab_size, out = command_flags(argv, 'build-demo-vocab takes --vocab_size=N and --out=PATH',
                                       DEMO_VOCAB_SIZE, DEMO_BPE_PATH)
    # learning stops early, at 128 merges, once every demo word is one token
    write_vocab([c for i in range(samples) for c in demo_captions(0, 'train', i)], vocab_size, out)
    print(f"wrote {out}")


def main(argv):
    """python data.py COMMAND [...]: build-vocab or build-demo-vocab."""
    commands = {'build-vocab': build_vocab_main, 'build-demo-vocab': build_demo_vocab_main}
    if {'-h', '--help'} & set(argv):  # anywhere, as argparse took it
        print(HELP)
        return
    if argv[:1] not in ([c] for c in commands):
        usage_error(f"expected a command, build-vocab or build-demo-vocab (got {' '.join(argv) or 'none'})")
    commands[argv[0]](argv[1:])


if __name__ == '__main__':
    run_cli(main)
