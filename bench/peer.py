"""open_clip's own trainer and ours side by side: the same images and captions, the same model, the same recipe.

    python -m bench.peer                                   # open_clip and ours, seeds 0 1 2, the demo export
    python -m bench.peer --rows=ours,ours+old_vit_init --seeds=0,1,2
    python -m bench.peer --csv=pairs.tsv                   # a TSV of yours (columns filepath, title)

The demo's training images (seed 0) are exported once as PNG + TSV (one caption each) under --cache. One
description (SPEC) builds open_clip's model config and trainer flags (`open_clip_train.main`) and our train.py
flags: an OpenAI-style ViT with QuickGELU on both sides, CLIP's BPE, AdamW, warmup + cosine, fp32 on the CPU,
`--method=clip` on ours, and one training crop (RandomResizedCrop, bicubic, ratio 3/4-4/3, area s-1 of the
image: open_clip's `--aug-cfg scale=(s, 1.0)`, our `--weak_min_scale=s`; s defaults to the demo recipe's). Each run
is a fresh process with one torch thread and one loader worker; the rows of a seed run one after another
(interleaved, so machine load falls on every row alike). Both checkpoints are then scored by one evaluator, ours
(`evaluate.evaluate` on the held-out demo tasks; open_clip's state dict through our importer, head counts passed
explicitly). Printed per run and as means over seeds: final-window training loss
(mean of the last WINDOW steps), zero-shot top-1 per demo task, retrieval R@1, training samples/s (steps after the
first SKIP) and peak memory (the training process's max RSS). Rows other than `open_clip` and `ours` are
ablations: ours with one or more PATCHES (changes applied in its process) and/or flags. Finished runs are cached
in --cache/results.jsonl by (row, spec, seed) and reused; --fresh runs them again.
"""
import argparse
import hashlib
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
CLIP_BPE = ROOT.parent / 'shared' / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'
WINDOW, SKIP = 20, 10  # final-window loss over the last 20 steps; samples/s after the first 10 steps
TASKS = ('shape', 'colour', 'colour_shape_unseen')

# --- One description of the run ---
SPEC = dict(train_size=12000, val_size=1000, image_size=64, patch_size=16, vision_width=128, vision_layers=4,
            vision_heads=4, text_width=128, text_layers=3, text_heads=4, context_length=32, embed_dim=64,
            batch_size=64, lr=2.5e-4, weight_decay=0.1, beta1=0.9, beta2=0.98, eps=1e-8, warmup_steps=56, epochs=1,
            weak_min_scale=config.RECIPES['demo']['weak_min_scale'])


def openclip_model_config(spec):
    """open_clip's model config JSON for SPEC's towers (OpenAI's ViT and text transformer, QuickGELU)."""
    return {'embed_dim': spec['embed_dim'], 'quick_gelu': True,
            'vision_cfg': {'image_size': spec['image_size'], 'layers': spec['vision_layers'],
                           'width': spec['vision_width'], 'patch_size': spec['patch_size'],
                           'head_width': spec['vision_width'] // spec['vision_heads']},
            'text_cfg': {'context_length': spec['context_length'], 'vocab_size': 49408, 'width': spec['text_width'],
                         'heads': spec['text_heads'], 'layers': spec['text_layers']}}


def openclip_argv(spec, tsv, logs, seed):
    return ['--train-data', str(tsv), '--dataset-type', 'csv', '--csv-separator', '\t', '--csv-img-key', 'filepath',
            '--csv-caption-key', 'title', '--model', 'peer', '--batch-size', str(spec['batch_size']),
            '--lr', str(spec['lr']), '--wd', str(spec['weight_decay']), '--beta1', str(spec['beta1']),
            '--beta2', str(spec['beta2']), '--eps', str(spec['eps']), '--warmup', str(spec['warmup_steps']),
            '--epochs', str(spec['epochs']), '--precision', 'fp32', '--device', 'cpu', '--workers', '1',
            '--seed', str(seed), '--logs', str(logs), '--name', 'run', '--log-every-n-steps', '1',
            '--save-frequency', str(spec['epochs']), '--report-to', '',
            '--aug-cfg', f"scale=({spec['weak_min_scale']}, 1.0)"]  # its train crop is bicubic, ratio 3/4-4/3 as ours


def ours_argv(spec, tsv, out, seed):
    steps = spec['train_size'] // spec['batch_size']
    keys = ('image_size', 'patch_size', 'vision_width', 'vision_layers', 'vision_heads', 'text_width', 'text_layers',
            'text_heads', 'context_length', 'embed_dim', 'batch_size', 'lr', 'weight_decay', 'beta1', 'beta2', 'eps',
            'epochs', 'weak_min_scale')
    return ['--dataset=csv', f'--metadata={tsv}', '--csv_image_key=filepath', '--csv_caption_key=title',
            f'--bpe_path={CLIP_BPE}', '--method=clip', '--vit_style=openai', '--vision_act=quickgelu',
            '--text_act=quickgelu', f"--local_crop_size={spec['image_size']}",
            *(f'--{k}={spec[k]}' for k in keys),
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


PATCHES = {'old_vit_init': patch_old_vit_init, 'openclip_vit_init': patch_openclip_vit_init,
           'decay_class_token': patch_decay_class_token, 'openclip_decay': patch_openclip_decay}

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


def train_openclip(spec, tsv, work, seed, timeout):
    """(checkpoint path, per-step losses, per-step seconds, peak RSS MB) of one open_clip run."""
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / 'config').mkdir()
    (work / 'config' / 'peer.json').write_text(json.dumps(openclip_model_config(spec)))
    text = run_child(['--child=open_clip', f"--config={work / 'config'}", '--',
                      *openclip_argv(spec, tsv, work / 'logs', seed)], work / 'train.log', timeout)
    steps = re.findall(r'Batch \(t\): ([\d.]+),.*?Contrastive_loss: ([\d.]+)', text)
    ckpt = work / 'logs' / 'run' / 'checkpoints' / f"epoch_{spec['epochs']}.pt"
    return ckpt, [float(loss) for _, loss in steps], [float(t) for t, _ in steps], peak_rss(text)


def train_ours(spec, tsv, work, seed, patches, flags, timeout):
    """(checkpoint path, per-step losses, per-step seconds, peak RSS MB) of one run of ours."""
    work.mkdir(parents=True, exist_ok=True)
    text = run_child(['--child=ours', f"--patches={','.join(patches)}", '--',
                      *ours_argv(spec, tsv, work / 'out', seed), *flags], work / 'train.log', timeout)
    records = [json.loads(line) for line in (work / 'out' / 'log.jsonl').read_text().splitlines()]
    records = [r for r in records if r['type'] == 'train']
    return (work / 'out' / 'checkpoint.pt', [r['loss'] for r in records],
            [spec['batch_size'] / r['samples_per_s'] for r in records], peak_rss(text))


# --- One evaluator for both ---
def evaluate_checkpoint(path, side, spec):
    """{task: top-1 %, 'i2t_r1', 't2i_r1'} on the held-out demo tasks (seed 0) by our evaluate.evaluate."""
    sys.path.insert(0, str(ROOT))
    from evaluate import evaluate, model_from_checkpoint, read_checkpoint
    overrides = {'vision_heads': spec['vision_heads'], 'text_heads': spec['text_heads'], 'bpe_path': str(CLIP_BPE)}
    ckpt = read_checkpoint(path, overrides if side == 'open_clip' else None)
    cfg, model, tokenizer = model_from_checkpoint(ckpt, path, 'cpu')
    cfg.dataset, cfg.seed, cfg.demo_val_size, cfg.workers, cfg.device = 'demo', 0, spec['val_size'], 0, 'cpu'
    results = evaluate(model, tokenizer, cfg, datasets=['demo'])
    out = {task: results[f'demo_{task}']['acc1_z'] for task in TASKS}
    out.update(i2t_r1=results['demo_retrieval']['i2t_r1_z'], t2i_r1=results['demo_retrieval']['t2i_r1_z'],
               parameters=sum(p.numel() for p in model.parameters()))
    return out


# --- Runs and the table ---
MODULES = ('config.py', 'data.py', 'augment.py', 'model.py', 'train.py', 'evaluate.py')


def code_hash(read=lambda name: (ROOT / name).read_bytes()):
    """A hash of the six modules: a run of ours is reused only while they are unchanged."""
    return hashlib.sha1(b''.join(read(name) for name in MODULES)).hexdigest()[:12]


def spec_key(row, spec, seed, code=None):
    side, patches, _ = ROWS[row]
    code = '' if side == 'open_clip' else code or code_hash()
    text = json.dumps([side, patches, row_flags(row, spec), spec, seed, code], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_row(row, spec, tsv, cache, seed, timeout):
    """Train one row at one seed and evaluate it: the figures of the run."""
    side, patches, _ = ROWS[row]
    work = Path(cache) / 'runs' / f"{row}-{spec_key(row, spec, seed)}"
    if side == 'open_clip':
        ckpt, losses, seconds, rss = train_openclip(spec, tsv, work, seed, timeout)
    else:
        ckpt, losses, seconds, rss = train_ours(spec, tsv, work, seed, patches, row_flags(row, spec), timeout)
    timed = seconds[SKIP:] if len(seconds) > SKIP else seconds
    figures = {'row': row, 'seed': seed, 'key': spec_key(row, spec, seed), 'steps': len(losses),
               'code': '' if side == 'open_clip' else code_hash(),
               'loss': statistics.fmean(losses[-WINDOW:]),
               'samples_per_s': spec['batch_size'] * len(timed) / sum(timed), 'peak_mb': rss,
               **evaluate_checkpoint(ckpt, side, spec)}
    return figures


COLUMNS = [('loss', 'loss', '.3f'), ('shape', 'shape', '.1f'), ('colour', 'colour', '.1f'),
           ('colour_shape_unseen', 'unseen', '.1f'), ('i2t_r1', 'i2t@1', '.1f'), ('t2i_r1', 't2i@1', '.1f'),
           ('samples_per_s', 'samples/s', '.0f'), ('peak_mb', 'peak MB', '.0f')]


def print_table(results, rows, seeds):
    """Per-seed rows, then per row the mean ± half the range over its seeds."""
    head = f"{'row':<26}{'seed':>6}" + ''.join(f"{name:>12}" for _, name, _ in COLUMNS)
    print(head)
    for row in rows:
        for seed in seeds:
            r = results.get((row, seed))
            if r:
                print(f"{row:<26}{seed:>6}" + ''.join(f"{r[k]:>12{fmt}}" for k, _, fmt in COLUMNS))
    print()
    print(f"{'mean ± half range':<32}" + ''.join(f"{name:>16}" for _, name, _ in COLUMNS))
    for row in rows:
        runs = [results[(row, s)] for s in seeds if (row, s) in results]
        if runs:
            cells = []
            for k, _, fmt in COLUMNS:
                values = [r[k] for r in runs]
                cells.append(f"{format(statistics.fmean(values), fmt)} ± {format((max(values) - min(values)) / 2, fmt)}")
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
    p.add_argument('--csv', default='', help='a TSV (filepath, title) to train on instead of the demo export')
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
    tsv = Path(a.csv) if a.csv else export_demo(cache, spec['train_size'])
    store = cache / 'results.jsonl'
    done = load_results(store)
    results = {}
    for seed in seeds:  # the rows of one seed in turn: interleaved, so load on the machine hits every row alike
        for row in rows:
            key = spec_key(row, spec, seed)
            if key in done and not a.fresh:
                results[(row, seed)] = done[key]
                continue
            start = time.perf_counter()
            r = run_row(row, spec, tsv, cache, seed, a.timeout)
            r['wall_s'] = time.perf_counter() - start
            with open(store, 'a') as f:
                f.write(json.dumps(r) + '\n')
            results[(row, seed)] = r
            print(f"{row} seed {seed}: " + ', '.join(f"{name} {r[k]:{fmt}}" for k, name, fmt in COLUMNS)
                  + f" ({r['wall_s']:.0f} s, {r['parameters']:,} parameters)", flush=True)
    print()
    print_table(results, rows, seeds)
    return results


if __name__ == '__main__':
    main()
