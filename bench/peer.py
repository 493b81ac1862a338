"""open_clip's own trainer and ours side by side: the same images and captions, the same model, the same recipe.

    python -m bench.peer                                   # open_clip and ours, seeds 0 1 2, the demo export
    python -m bench.peer --rows=ours,ours+old_vit_init --seeds=0,1,2
    python -m bench.peer --csv=pairs.csv --bpe_path=bpe_simple_vocab_16e6.txt.gz \
        --eval_datasets=folder:heldout --retrieval=heldout.csv --image_size=64 --batch_size=128 --lr=3e-3 ...

Data: by default the demo's training images (seed 0), exported once as PNG + TSV (one caption each) under --cache
and scored on the held-out demo tasks. Or yours: --csv takes any file `train.py --dataset=csv` takes (comma, or tab
for .tsv; --csv_image_key, --csv_caption_key, paths relative to --root or the file), --bpe_path your merges file
(default: the copy inside the open_clip wheel), --eval_datasets any `evaluate.py --datasets` value (folder:PATH
sets; catalogue sets with --data_root) and --retrieval a CSV of image,caption. Ours reads your file as train.py does;
open_clip reads the rows our reader found, written as a TSV with absolute paths (its CsvDataset resolves paths from the
working directory and reads one separator) to the images or, where its convert('RGB') would see other pixels than
ours (alpha, EXIF turns, 16-bit data), to PNGs of our decode under --cache/flat, and tokenises with the same merges.
Steps per epoch: rows // batch.

One description (SPEC) builds open_clip's model config and trainer flags (`open_clip_train.main`) and our train.py
flags: an OpenAI-style ViT with QuickGELU on both sides, CLIP's BPE, AdamW, warmup + cosine, fp32 on the CPU,
`--method=clip` on ours, and one training crop (RandomResizedCrop, bicubic, ratio 3/4-4/3, area s-1 of the
image: open_clip's `--aug-cfg scale=(s, 1.0)`, our `--weak_min_scale=s`; s defaults to the demo recipe's). Each run
is a fresh process with one torch thread and one loader worker; the rows of a seed run one after another
(interleaved, so machine load falls on every row alike). Both checkpoints are then scored by one evaluator, ours
(`evaluate.evaluate`; open_clip's state dict through our importer, head counts passed explicitly). Printed per run
and as means over seeds: final-window training loss (mean of the last WINDOW steps), zero-shot top-1 per task,
retrieval R@1 and R@5 both ways, training samples/s (steps after the first SKIP) and peak memory (the training
process's max RSS). Rows other than `open_clip` and `ours` are ablations: ours with one or more PATCHES (changes
applied in its process) and/or flags. Finished runs are cached in --cache/results.jsonl by (row, spec, data, seed)
and reused; --fresh runs them again.
"""
import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import config

ROOT = Path(__file__).resolve().parent.parent
WINDOW, SKIP = 20, 10  # final-window loss over the last 20 steps; samples/s after the first 10 steps

# --- One description of the run ---
SPEC = dict(train_size=12000, val_size=1000, image_size=64, patch_size=16, vision_width=128, vision_layers=4,
            vision_heads=4, text_width=128, text_layers=3, text_heads=4, context_length=32, embed_dim=64,
            batch_size=64, lr=2.5e-4, weight_decay=0.1, beta1=0.9, beta2=0.98, eps=1e-8, warmup_steps=56, epochs=1,
            weak_min_scale=config.RECIPES['demo']['weak_min_scale'])


def openclip_model_config(spec, data):
    """open_clip's model config JSON for SPEC's towers (OpenAI's ViT and text transformer, QuickGELU) and the data's
    merges (open_clip's tokenizer reads gzip only: data['bpe_gz'])."""
    return {'embed_dim': spec['embed_dim'], 'quick_gelu': True,
            'vision_cfg': {'image_size': spec['image_size'], 'layers': spec['vision_layers'],
                           'width': spec['vision_width'], 'patch_size': spec['patch_size'],
                           'head_width': spec['vision_width'] // spec['vision_heads']},
            'text_cfg': {'context_length': spec['context_length'], 'vocab_size': data['vocab_size'],
                         'width': spec['text_width'], 'heads': spec['text_heads'], 'layers': spec['text_layers'],
                         'tokenizer_kwargs': {'bpe_path': data['bpe_gz']}}}


def openclip_argv(spec, tsv, logs, seed):
    return ['--train-data', str(tsv), '--dataset-type', 'csv', '--csv-separator', '\t', '--csv-img-key', 'filepath',
            '--csv-caption-key', 'title', '--model', 'peer', '--batch-size', str(spec['batch_size']),
            '--lr', str(spec['lr']), '--wd', str(spec['weight_decay']), '--beta1', str(spec['beta1']),
            '--beta2', str(spec['beta2']), '--eps', str(spec['eps']), '--warmup', str(spec['warmup_steps']),
            '--epochs', str(spec['epochs']), '--precision', 'fp32', '--device', 'cpu', '--workers', '1',
            '--seed', str(seed), '--logs', str(logs), '--name', 'run', '--log-every-n-steps', '1',
            '--save-frequency', str(spec['epochs']), '--report-to', '',
            '--aug-cfg', f"scale=({spec['weak_min_scale']}, 1.0)"]  # its train crop is bicubic, ratio 3/4-4/3 as ours


def ours_argv(spec, data, out, seed):
    """train.py's flags: the user's file as --dataset=csv reads it, and SPEC."""
    steps = data['rows'] // spec['batch_size']
    keys = ('image_size', 'patch_size', 'vision_width', 'vision_layers', 'vision_heads', 'text_width', 'text_layers',
            'text_heads', 'context_length', 'embed_dim', 'batch_size', 'lr', 'weight_decay', 'beta1', 'beta2', 'eps',
            'epochs', 'weak_min_scale')
    return ['--dataset=csv', f"--metadata={data['csv']}", f"--csv_image_key={data['image_key']}",
            f"--csv_caption_key={data['caption_key']}", f"--root={data['root']}", f"--bpe_path={data['bpe']}",
            '--method=clip', '--vit_style=openai', '--vision_act=quickgelu', '--text_act=quickgelu',
            f"--local_crop_size={spec['image_size']}", *(f'--{k}={spec[k]}' for k in keys),
            f"--warmup_epochs={(spec['warmup_steps'] + 0.5) / steps}",  # int(warmup_epochs * steps) = warmup_steps
            '--precision=fp32', '--device=cpu', '--workers=1', '--threads=1', f'--seed={seed}', f'--output_dir={out}',
            '--overwrite', '--eval_every=0', '--log_every=1', '--save_every=0']


# --- Demo export ---
def export_demo(cache, size):
    """The first `size` demo training scenes (seed 0) as PNGs drawn at the demo's canvas, with each image's first
    caption in train.tsv; done once per size."""
    from data import demo_captions, demo_scene, draw_scene
    folder = Path(cache).resolve() / f'demo{size}'
    tsv = folder / 'train.tsv'
    if tsv.exists():
        return tsv
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    canvas = round(1.25 * SPEC['image_size'])  # data.demo_canvas at 64 px
    rows = ['filepath\ttitle']
    for i in range(size):
        path = folder / 'images' / f'{i:05d}.png'
        draw_scene(demo_scene(0, 'train', i), canvas).save(path)
        rows.append(f'{path}\t{demo_captions(0, "train", i)[0]}')
    tmp = tsv.with_suffix('.tmp')
    tmp.write_text('\n'.join(rows) + '\n')
    os.replace(tmp, tsv)
    return tsv


# --- The data: the demo export or a user's CSV, as each side reads it ---
RECALLS = ('i2t_r1', 't2i_r1', 'i2t_r5', 't2i_r5')


def default_bpe():
    """CLIP's merges as the open_clip wheel ships them: both sides' vocabulary unless --bpe_path names another."""
    from open_clip.tokenizer import default_bpe
    return default_bpe()


def gzipped(bpe, cache):
    """The merges file as gzip, which is all open_clip's tokenizer reads: itself, or a gzipped copy under cache."""
    raw = Path(bpe).read_bytes()
    if raw[:2] == b'\x1f\x8b':
        return str(Path(bpe).resolve())
    out = Path(cache).resolve() / f'bpe-{hashlib.sha1(raw).hexdigest()[:12]}.txt.gz'
    if not out.exists():
        config.atomic_write(out, lambda f: f.write(gzip.compress(raw)))
    return str(out)


PLAIN_MODES = ('1', 'L', 'P', 'RGB', 'CMYK', 'YCbCr')  # modes whose PIL convert('RGB') is our decode's too


def as_we_decode(path, cache, background):
    """The file open_clip reads for an image: itself where its convert('RGB') gives our pixels, else a PNG of our
    decode under cache/flat (data.load_image, augment.to_rgb: upright by EXIF, 16-bit rescaled, alpha composited onto
    background) -- open_clip drops alpha, which shows the colour a transparent pixel stores (often black)."""
    from augment import to_rgb
    from data import BAD_SAMPLE, load_image
    from PIL import Image
    try:
        with Image.open(path) as img:
            if (img.mode in PLAIN_MODES and 'transparency' not in img.info
                    and img.getexif().get(0x0112, 1) == 1):  # no alpha, no EXIF turn
                return path
        raw = Path(path).read_bytes()
        flat = Path(cache).resolve() / 'flat' / f"{hashlib.sha1(raw + bytes(background)).hexdigest()[:16]}.png"
        if not flat.exists():
            rgb = to_rgb(load_image(path), background)
            flat.parent.mkdir(parents=True, exist_ok=True)
            config.atomic_write(flat, lambda f: rgb.save(f, format='PNG', compress_level=1))
        return flat
    except BAD_SAMPLE:  # unreadable: as given (ours skips it; open_clip fails on it)
        return path


def openclip_rows(reader, cache, background):
    """(open_clip's TSV of our reader's rows: absolute image path (as_we_decode), caption; the rows it could not read,
    which are left out: no caption text or no image file, where its CsvDataset would fail and ours skips the sample)."""
    text, left_out = io.StringIO(), 0
    out = csv.writer(text, delimiter='\t', lineterminator='\n')  # quotes tabs, newlines and '"' as pandas reads them
    out.writerow(['filepath', 'title'])
    for i in range(len(reader)):
        path = reader.root / reader.paths[i]
        try:
            caption = reader.captions[i][0]
        except ValueError:  # a cell that is not text
            caption = ''
        if caption.strip() and path.is_file():
            out.writerow([os.path.abspath(as_we_decode(path, cache, background)), caption])
        else:
            left_out += 1
    return text.getvalue(), left_out


def check_eval_sets(datasets, retrieval):
    """Refuse, before any training, evaluation sets that evaluate.py would not find."""
    from evaluate import FOLDER, check_datasets
    check_datasets(datasets)
    for path in [d[len(FOLDER):] for d in datasets if d.startswith(FOLDER)] + ([retrieval] if retrieval else []):
        if not Path(path).exists():
            raise config.UserError(f"evaluation set {path} not found; give --eval_datasets=folder:PATH (an "
                                   f"ImageFolder) and --retrieval=CSV (columns image,caption)")


def prepare_data(a, spec, cache):
    """The run's data: --csv (or the demo export) read by our --dataset=csv reader, open_clip's TSV of the same rows,
    the merges and the evaluation sets, with a key over all of them for the results cache."""
    from data import Tokenizer, read_csv
    demo = not a.csv
    source = export_demo(cache, spec['train_size']) if demo else Path(a.csv).expanduser().resolve()
    keys = ('filepath', 'title') if demo else (a.csv_image_key, a.csv_caption_key)
    root = '' if demo or not a.root else str(Path(a.root).expanduser().resolve())
    cfg = config.Config(dataset='csv', metadata=str(source), csv_image_key=keys[0], csv_caption_key=keys[1], root=root,
                        output_dir=str(cache))
    reader = read_csv(cfg)
    bpe = str(Path(a.bpe_path or default_bpe()).expanduser().resolve())
    vocab_size = Tokenizer(bpe).vocab_size
    datasets = ['demo'] if demo else [d.strip() for d in a.eval_datasets.split(',') if d.strip()]
    retrieval = '' if demo or not a.retrieval else str(Path(a.retrieval).expanduser().resolve())
    check_eval_sets(datasets, retrieval)
    text, left_out = openclip_rows(reader, cache, cfg.alpha_background)
    if left_out:
        print(f"open_clip's TSV leaves out {left_out} of {len(reader)} rows without caption text or image file "
              f"(ours skips them as unreadable)")
    key = hashlib.sha1(json.dumps([text, Path(bpe).read_bytes().hex(), datasets, retrieval, a.data_root,
                                   Path(retrieval).read_text() if retrieval else '']).encode()).hexdigest()[:16]
    tsv = Path(cache).resolve() / f'data-{key}' / 'openclip.tsv'
    tsv.parent.mkdir(parents=True, exist_ok=True)
    config.atomic_write(tsv, lambda f: f.write(text.encode()))
    return dict(demo=demo, csv=str(source), image_key=keys[0], caption_key=keys[1], root=root, rows=len(reader),
                tsv=str(tsv), bpe=bpe, bpe_gz=gzipped(bpe, cache), vocab_size=vocab_size, datasets=datasets,
                retrieval=retrieval, data_root=a.data_root, key=key)


# --- Ablation patches: changes applied to ours in its training process ---
def patch_old_vit_init():
    """The ViT init before the open_clip comparison, for every style: timm's trunc-normal 0.02 for every Linear
    of the blocks (zero biases), class token std 1e-6, position embedding 0.02."""
    import model
    original = model.VisionTransformer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model.init_timm_vit(self)
    model.VisionTransformer.__init__ = init


def patch_openclip_vit_init():
    """open_clip's ViT init: class and position embeddings std width^-0.5, xavier-uniform in-projection with zero
    bias, zero out-projection bias, PyTorch's default for the other Linears."""
    import model
    import torch.nn as nn
    original = model.VisionTransformer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        nn.init.normal_(self.class_embedding, std=self.width ** -0.5)
        nn.init.normal_(self.positional_embedding, std=self.width ** -0.5)
        for block in self.transformer.resblocks:
            for linear in (block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
                linear.reset_parameters()
            nn.init.xavier_uniform_(block.attn.in_proj.weight)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.zeros_(block.attn.out_proj.bias)
    model.VisionTransformer.__init__ = init


def patch_decay_class_token():
    """Weight decay on every tensor with ndim >= 2, the (1, 1, D) class token included (the old groups)."""
    import train

    def groups(model, weight_decay):
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        return [{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}]
    train.param_groups = groups


def patch_openclip_decay():
    """open_clip's groups: no decay where ndim < 2 or the name holds bn, ln, bias or logit_scale; its class token is
    1-D, so ours (1, 1, D) is left undecayed too."""
    import train

    def groups(model, weight_decay):
        def exclude(n, p):
            return p.ndim < 2 or any(s in n for s in ('bn', 'ln', 'bias', 'logit_scale', 'class_embedding'))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{'params': [p for n, p in named if not exclude(n, p)], 'weight_decay': weight_decay},
                {'params': [p for n, p in named if exclude(n, p)], 'weight_decay': 0.0}]
    train.param_groups = groups


def patch_pil_resize():
    """open_clip's training resize: the weak view cut and resized by PIL from the image in its own mode (torchvision's
    RandomResizedCrop on a PIL image: bicubic, but nearest for palette images, and RGBA / LA resized with premultiplied
    alpha), then made RGB as ours makes it (augment.to_rgb on the run's background), instead of resized from the RGB
    tensor by torch's antialiased bicubic."""
    import augment
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    def draw(self, img, gen=None):
        x, boxes, params = self.draw_boxes(img, gen)  # the image is decoded at x's size: the boxes fit it
        top, left, h, w = boxes[0]
        weak = img.crop((left, top, left + w, top + h)).resize((self.sizes[0],) * 2, Image.Resampling.BICUBIC)
        strong = [augment.resized_crop(x, box, size) for box, size in zip(boxes[1:], self.sizes[1:])]
        return pil_to_tensor(augment.to_rgb(weak, self.background)), strong, params
    augment.ImageViews.draw = draw


def patch_openclip_data():
    """open_clip's training data path in ours, on the images the open_clip row reads (as_we_decode): its train
    transform (torchvision's RandomResizedCrop on the PIL image, then RGB), the step's normalisation with
    --image_mean/--image_std (its ToTensor and Normalize), each caption tokenised whole, and a loader reshuffled every
    epoch from torch's global generator (RandomSampler)."""
    import data
    import train
    from augment import to_rgb
    from open_clip.transform import image_transform
    from torchvision.transforms import Compose
    from torchvision.transforms.v2.functional import pil_to_tensor

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, reader, transform, tokenizer, background):
            self.reader, self.transform, self.tokenizer, self.background = reader, transform, tokenizer, background

        def __len__(self):
            return len(self.reader)

        def __getitem__(self, i):
            image = to_rgb(data.load_image(self.reader.root / self.reader.paths[i]), self.background)
            weak = pil_to_tensor(self.transform(image))  # (3, S, S) uint8: the step normalises it
            return {'weak': weak, 'strong': [], 'skipped': 0, 'skipped_files': '[]',
                    'tokens': self.tokenizer(self.reader.captions[i][0])}  # (1, L): the weak caption only

    class Sampler(torch.utils.data.RandomSampler):
        def set_epoch(self, epoch, start_batch=0):  # a fresh permutation every epoch, as open_clip's
            pass

    def build_train_loader(cfg, tokenizer, rank=0, world_size=1):
        crop, rgb, _, _ = image_transform(cfg.image_size, is_train=True, mean=cfg.image_mean, std=cfg.image_std,
                                          aug_cfg={'scale': (cfg.weak_min_scale, 1.0)}).transforms
        pairs = Pairs(data.build_reader(cfg), Compose([crop, rgb]), tokenizer, cfg.alpha_background)
        return torch.utils.data.DataLoader(pairs, cfg.batch_size, sampler=Sampler(pairs), num_workers=cfg.workers,
                                           drop_last=True, collate_fn=data.collate)
    train.build_train_loader = build_train_loader


PATCHES = {'old_vit_init': patch_old_vit_init, 'openclip_vit_init': patch_openclip_vit_init,
           'decay_class_token': patch_decay_class_token, 'openclip_decay': patch_openclip_decay,
           'pil_resize': patch_pil_resize, 'openclip_data': patch_openclip_data}

OPENAI_NORM = ('--image_mean=0.48145466,0.4578275,0.40821073', '--image_std=0.26862954,0.26130258,0.27577711')
# row: (side, patches, extra train.py flags); 'lr_like_openclip' gives ours open_clip's schedule ends (warmup from
# lr / warmup_steps, cosine to 0)
ROWS = {
    'open_clip': ('open_clip', (), ()),
    'ours': ('ours', (), ()),
    'ours+old_vit_init': ('ours', ('old_vit_init',), ()),
    'ours+openclip_vit_init': ('ours', ('openclip_vit_init',), ()),
    'ours+decay_class_token': ('ours', ('decay_class_token',), ()),
    'ours+openclip_decay': ('ours', ('openclip_decay',), ()),
    'ours+crop_0.5': ('ours', (), ('--weak_min_scale=0.5',)),
    'ours+openai_norm': ('ours', (), OPENAI_NORM),
    'ours+lr_like_openclip': ('ours', (), ('--lr_end=0', 'LR_START')),
    'ours+pil_resize': ('ours', ('pil_resize',), ()),
    'ours+openclip_data': ('ours', ('openclip_data',), OPENAI_NORM),
    'ours+all_openclip': ('ours', ('openclip_vit_init', 'openclip_decay'),
                          (*OPENAI_NORM, '--lr_end=0', 'LR_START')),
}


def row_flags(row, spec):
    """The extra train.py flags of a row, LR_START resolved against the spec."""
    return [f"--lr_start={spec['lr'] / spec['warmup_steps']}" if f == 'LR_START' else f for f in ROWS[row][2]]


# --- Child processes: one training run each ---
def child_main(argv):
    """`python -m bench.peer --child=open_clip|ours [--config=JSON] [--patches=a,b] -- ARGS`: one training run in this
    process; its last line is the peak RSS."""
    sep = argv.index('--')
    opts = dict(a[2:].split('=', 1) for a in argv[:sep])
    args = argv[sep + 1:]
    torch.set_num_threads(1)
    if opts['child'] == 'open_clip':
        import open_clip
        from open_clip_train.main import main
        open_clip.add_model_config(opts['config'])
        main(args)
    else:
        sys.path.insert(0, str(ROOT))
        for name in filter(None, opts.get('patches', '').split(',')):
            PATCHES[name]()
        import config
        import train
        config.run_cli(train.main, args)
    print(f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}", flush=True)


def run_child(args, log, timeout):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    with open(log, 'w') as f:
        proc = subprocess.run([sys.executable, '-m', 'bench.peer', *args], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=timeout)
    text = Path(log).read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}); last lines of {log}:\n"
                           + '\n'.join(text.splitlines()[-15:]))
    return text


def peak_rss(text):
    return float(re.findall(r'peak_rss_mb=([\d.]+)', text)[-1])


def train_openclip(spec, data, work, seed, timeout):
    """(checkpoint path, per-step losses, per-step seconds, peak RSS MB) of one open_clip run."""
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / 'config').mkdir()
    (work / 'config' / 'peer.json').write_text(json.dumps(openclip_model_config(spec, data)))
    text = run_child(['--child=open_clip', f"--config={work / 'config'}", '--',
                      *openclip_argv(spec, data['tsv'], work / 'logs', seed)], work / 'train.log', timeout)
    steps = re.findall(r'Batch \(t\): ([\d.]+),.*?Contrastive_loss: ([\d.]+)', text)
    ckpt = work / 'logs' / 'run' / 'checkpoints' / f"epoch_{spec['epochs']}.pt"
    return ckpt, [float(loss) for _, loss in steps], [float(t) for t, _ in steps], peak_rss(text)


def train_ours(spec, data, work, seed, patches, flags, timeout):
    """(checkpoint path, per-step losses, per-step seconds, peak RSS MB) of one run of ours."""
    work.mkdir(parents=True, exist_ok=True)
    text = run_child(['--child=ours', f"--patches={','.join(patches)}", '--',
                      *ours_argv(spec, data, work / 'out', seed), *flags], work / 'train.log', timeout)
    records = [json.loads(line) for line in (work / 'out' / 'log.jsonl').read_text().splitlines()]
    records = [r for r in records if r['type'] == 'train']
    return (work / 'out' / 'checkpoint.pt', [r['loss'] for r in records],
            [spec['batch_size'] / r['samples_per_s'] for r in records], peak_rss(text))


# --- One evaluator for both ---
def evaluate_checkpoint(path, side, spec, data):
    """{zero-shot task: top-1 %, ..., 'tasks': their names, 'i2t_r1', 't2i_r1', 'i2t_r5', 't2i_r5', 'parameters'} by
    our evaluate.evaluate (z head) on the data's evaluation sets: the held-out demo tasks (seed 0) for the demo."""
    sys.path.insert(0, str(ROOT))
    from evaluate import evaluate, model_from_checkpoint, read_checkpoint
    overrides = {'vision_heads': spec['vision_heads'], 'text_heads': spec['text_heads'], 'bpe_path': data['bpe']}
    ckpt = read_checkpoint(path, overrides if side == 'open_clip' else None)
    cfg, model, tokenizer = model_from_checkpoint(ckpt, path, 'cpu')
    out = {'parameters': sum(p.numel() for p in model.parameters()), 'tasks': []}
    if not data['datasets'] and not data['retrieval']:
        return out
    cfg.seed, cfg.demo_val_size, cfg.workers, cfg.device = 0, spec['val_size'], 0, 'cpu'
    cfg.dataset, cfg.data_root = 'demo' if data['demo'] else 'csv', data['data_root']
    results = evaluate(model, tokenizer, cfg, datasets=data['datasets'] or None,
                       retrieval_csv=data['retrieval'] or None)
    if data['retrieval']:
        out['val_loss'] = heldout_loss(model, tokenizer, cfg, data['retrieval'])
    for name, r in results.items():
        if 'error' in r:
            raise config.UserError(r['error'])
        if 'i2t_r1_z' in r:
            out.update({k: r[f'{k}_z'] for k in RECALLS})
        elif 'acc1_z' in r:
            task = name.removeprefix('demo_')
            out[task] = r['acc1_z']
            out['tasks'].append(task)
    return out


@torch.no_grad()
def heldout_loss(model, tokenizer, cfg, path):
    """CLIP's loss (model.clip_loss, at the model's own logit scale) of the retrieval CSV's pairs in one batch: a
    held-out loss that uses every rank, where R@1 counts a few hits."""
    from evaluate import embeddings, eval_transform, read_retrieval_csv
    from model import clip_loss
    images, captions, caption_ids = read_retrieval_csv(path, eval_transform(cfg))
    image_emb, image_ids, _ = embeddings(model, cfg, images, ['z'], model.encode_image_heads)
    row = {int(i): n for n, i in enumerate(image_ids)}
    keep = [j for j, i in enumerate(caption_ids) if i in row]  # the captions of decodable images
    image = image_emb['z'][[row[caption_ids[j]] for j in keep]]  # (M, D), the image of each caption
    text = model.encode_text(tokenizer([captions[j] for j in keep]))  # (M, D)
    return clip_loss(image, text, model.logit_scale.exp())['loss'].item()


# --- Runs and the table ---
MODULES = ('config.py', 'data.py', 'augment.py', 'model.py', 'train.py', 'evaluate.py')


def code_hash(read=lambda name: (ROOT / name).read_bytes()):
    """A hash of the six modules: a run of ours is reused only while they are unchanged."""
    return hashlib.sha1(b''.join(read(name) for name in MODULES)).hexdigest()[:12]


def spec_key(row, spec, data, seed, code=None):
    side, patches, _ = ROWS[row]
    code = '' if side == 'open_clip' else code or code_hash()
    text = json.dumps([side, patches, row_flags(row, spec), spec, data['key'], seed, code], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_row(row, spec, data, cache, seed, timeout):
    """Train one row at one seed and evaluate it: the figures of the run."""
    side, patches, _ = ROWS[row]
    key = spec_key(row, spec, data, seed)
    work = Path(cache) / 'runs' / f"{row}-{key}"
    if side == 'open_clip':
        ckpt, losses, seconds, rss = train_openclip(spec, data, work, seed, timeout)
    else:
        ckpt, losses, seconds, rss = train_ours(spec, data, work, seed, patches, row_flags(row, spec), timeout)
    timed = seconds[SKIP:] if len(seconds) > SKIP else seconds
    return {'row': row, 'seed': seed, 'key': key, 'steps': len(losses),
            'code': '' if side == 'open_clip' else code_hash(), 'loss': statistics.fmean(losses[-WINDOW:]),
            'samples_per_s': spec['batch_size'] * len(timed) / sum(timed), 'peak_mb': rss,
            **evaluate_checkpoint(ckpt, side, spec, data)}


def columns(results):
    """(key, name, format) of the table: loss, every zero-shot task, recalls where measured, speed and memory."""
    runs = list(results.values())
    tasks = list(dict.fromkeys(t for r in runs for t in r['tasks']))
    recalls = [(k, k.replace('_r', '@'), '.1f') for k in RECALLS if any(k in r for r in runs)]
    held = [('val_loss', 'val loss', '.3f')] if any('val_loss' in r for r in runs) else []
    return [('loss', 'loss', '.3f'), *held, *((t, t[:11], '.1f') for t in tasks), *recalls,
            ('samples_per_s', 'samples/s', '.0f'), ('peak_mb', 'peak MB', '.0f')]


def cell(values, fmt):
    """'mean ± half range' of the values, '-' when there are none."""
    if not values:
        return '-'
    return f"{format(statistics.fmean(values), fmt)} ± {format((max(values) - min(values)) / 2, fmt)}"


def print_table(results, rows, seeds):
    """Per-seed rows, then per row the mean ± half the range over its seeds."""
    cols = columns(results)
    print(f"{'row':<26}{'seed':>6}" + ''.join(f"{name:>12}" for _, name, _ in cols))
    for row in rows:
        for seed in seeds:
            r = results.get((row, seed))
            if r:
                print(f"{row:<26}{seed:>6}" + ''.join(f"{format(r[k], fmt) if k in r else '-':>12}"
                                                    for k, _, fmt in cols))
    print()
    print(f"{'mean ± half range':<32}" + ''.join(f"{name:>16}" for _, name, _ in cols))
    for row in rows:
        runs = [results[(row, s)] for s in seeds if (row, s) in results]
        if runs:
            cells = [cell([r[k] for r in runs if k in r], fmt) for k, _, fmt in cols]
            print(f"{row + f' (n={len(runs)})':<32}" + ''.join(f"{c:>16}" for c in cells))


def load_results(path):
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            results[r['key']] = r
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith('--child='):
        return child_main(argv)
    p = argparse.ArgumentParser(prog='python -m bench.peer', description=__doc__.split('\n\n')[0])
    p.add_argument('--rows', default='open_clip,ours', help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--cache', default=str(ROOT / 'out_peer'), help='export, runs and results.jsonl')
    p.add_argument('--csv', default='', help='your training CSV or TSV (as train.py --dataset=csv reads it) instead '
                                             'of the demo export')
    p.add_argument('--csv_image_key', default='filepath', help='its column of image paths')
    p.add_argument('--csv_caption_key', default='title', help='its column of captions')
    p.add_argument('--root', default='', help='folder its image paths are relative to (default: its own)')
    p.add_argument('--bpe_path', default='', help="CLIP-format merges for both sides (default: the open_clip wheel's)")
    p.add_argument('--eval_datasets', default='', help='with --csv: evaluate.py --datasets values, e.g. '
                                                       'folder:PATH (an ImageFolder)')
    p.add_argument('--retrieval', default='', help='with --csv: a retrieval CSV (columns image,caption)')
    p.add_argument('--data_root', default='', help="root of evaluate.py's catalogue sets, if --eval_datasets names any")
    p.add_argument('--fresh', action='store_true', help='run again what results.jsonl already holds')
    p.add_argument('--timeout', type=float, default=3600, help='seconds per training run')
    for k, v in SPEC.items():
        p.add_argument(f'--{k}', type=type(v), default=v)
    a = p.parse_args(argv)
    rows, seeds = a.rows.split(','), [int(s) for s in a.seeds.split(',')]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(ROWS)}")
    spec = {k: getattr(a, k) for k in SPEC}
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(a, spec, cache)
    except config.UserError as e:
        sys.exit(f"error: {e}")
    if data['rows'] < spec['batch_size']:
        sys.exit(f"error: {data['csv']} has {data['rows']} rows, less than one batch of {spec['batch_size']}")
    store = cache / 'results.jsonl'
    done = load_results(store)
    results = {}
    for seed in seeds:  # the rows of one seed in turn: interleaved, so load on the machine hits every row alike
        for row in rows:
            key = spec_key(row, spec, data, seed)
            if key in done and not a.fresh:
                results[(row, seed)] = done[key]
                continue
            start = time.perf_counter()
            r = run_row(row, spec, data, cache, seed, a.timeout)
            r['wall_s'] = time.perf_counter() - start
            with open(store, 'a') as f:
                f.write(json.dumps(r) + '\n')
            results[(row, seed)] = r
            print(f"{row} seed {seed}: " + ', '.join(f"{name} {r[k]:{fmt}}" for k, name, fmt in columns({0: r}))
                  + f" ({r['wall_s']:.0f} s, {r['parameters']:,} parameters)", flush=True)
    print()
    print_table(results, rows, seeds)
    return results


if __name__ == '__main__':
    main()
