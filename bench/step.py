"""Training-step speed of model.py against established implementations, and of the full CLIP 🚀 step.

    python -m bench.step                          # CPU: batch 8 at 224 px, 2 threads
    python -m bench.step --device cuda --batch 128

Encoder rows: forward + backward + AdamW step of ours and of the reference (torchvision ResNet-50, timm ViT-B/16
and B/32, open_clip's text tower; rows whose package is missing are skipped), fp32 and bf16 autocast, steps of
the two interleaved, median ms, ratio ours/theirs (< 1 = ours faster). Rocket rows: the full step (weak + A=2
strong views + 1+A caption rows, loss, backward, AdamW) in a fresh process each: samples/s, images/s, peak
memory and model FLOPs utilisation (MFU), plain / grad checkpointing / channels_last. Lever rows (--rows levers):
FLOPs per sample and samples/s of CLIP against rocket with strong-view patch dropout and small local crops.

MFU = FLOPs of one step as counted by torch's FlopCounterMode (matmuls, convolutions and attention, forward and
backward; attention through the math kernel so that it is counted on every device; recomputation under
checkpointing is not model FLOPs and is left out) / step time / the device's peak dense bf16 FLOP/s (a table of
datasheet values for CUDA devices, or --peak_tflops).
"""
import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import config
import model as model_lib

VOCAB, CONTEXT = 49408, 77


# --- Encoder rows ---
def build_pair(name):
    """(ours, reference or None, what the reference is) for one encoder row."""
    if name == 'resnet50':
        import torchvision
        theirs = torchvision.models.resnet50()
        theirs.fc = nn.Identity()
        ours = model_lib.ResNet50()
        theirs.load_state_dict(ours.state_dict())  # same names; same weights, e.g. the zero-initialised bn3
        return ours, theirs, 'torchvision'
    if name in ('vit_b16', 'vit_b32'):
        patch = int(name[-2:])
        ours = model_lib.VisionTransformer(224, patch, 768, 12, 12)
        try:
            import timm
        except ImportError:
            return ours, None, 'timm (not installed)'
        return ours, timm.create_model(f'vit_base_patch{patch}_224', num_classes=0), 'timm'
    # the text tower with a bias-free 512 -> 512 projection on both sides, as open_clip builds it
    ours = nn.Sequential(model_lib.TextTransformer(VOCAB, CONTEXT, 512, 12, 8), model_lib.linear_projection(512, 512))
    try:
        from open_clip.transformer import TextTransformer, QuickGELU
    except ImportError:
        return ours, None, 'open_clip (not installed)'
    return ours, TextTransformer(CONTEXT, VOCAB, 512, 8, 12, output_dim=512, act_layer=QuickGELU), 'open_clip'


def random_tokens(batch, device, vocab=VOCAB, context=CONTEXT):
    """Captions of random length: SOT, ids, EOT (the largest id) at a random position, zero padding."""
    tokens = torch.randint(1, vocab - 1, (batch, context))
    eot = torch.randint(5, context, (batch,))
    tokens[torch.arange(batch), eot] = vocab - 1
    tokens[torch.arange(context) > eot[:, None]] = 0
    return tokens.to(device)


def make_step(module, inputs, device, bf16):
    """A closure running one forward + backward + AdamW step of `module` on fixed inputs."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=device.type == 'cuda')

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = module(inputs).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t


def encoder_row(name, bf16, args, device):
    torch.manual_seed(0)
    ours, theirs, source = build_pair(name)
    inputs = (random_tokens(args.batch, device) if name == 'text'
              else torch.randn(args.batch, 3, 224, 224, device=device))
    label = f"{name:9s} {'bf16' if bf16 else 'fp32'}"
    if theirs is None:
        print(f"{label}  skipped: {source}")
        return
    steps = [make_step(m.to(device).train(), inputs, device, bf16) for m in (ours, theirs)]
    for _ in range(args.warmup):
        for step in steps:
            step()
    times = ([], [])
    for i in range(args.steps):  # interleaved, first one then the other first: load changes hit both alike
        for j in ((0, 1), (1, 0))[i % 2]:
            times[j].append(timed(steps[j], device))
    mine, ref = (1000 * statistics.median(t) for t in times)
    print(f"{label}  ours {mine:8.1f} ms  {source:11s} {ref:8.1f} ms  ratio {mine / ref:.3f}", flush=True)


# --- Rocket rows ---
# datasheet peak dense bf16 tensor TFLOP/s (no sparsity); the first key found in torch.cuda.get_device_name
# wins, so longer names come before their prefixes ('H100 NVL' before 'H100', 'L40' before 'L4')
PEAK_BF16_TFLOPS = {'H200 NVL': 835.0, 'H200': 989.4, 'H100 NVL': 835.0, 'H100 PCIe': 756.0, 'H100': 989.4,
                    'A100': 312.0, 'L40S': 362.1, 'L40': 181.0, 'L4': 121.0}


def peak_tflops(device, override):
    """The peak bf16 TFLOP/s used for MFU: --peak_tflops, else the table entry of the CUDA device, else None."""
    if override or device.type != 'cuda':
        return override or None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def count_flops(step):
    """FLOPs of one call of step(), attention included (the math kernel decomposes it into counted matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def rocket_case(model_name, batch, steps, warmup, threads, device, checkpointing, channels_last):
    """(samples/s, peak memory in MiB, FLOPs per step) of the full training step, measured in its own process."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    cfg = config.resolve({'model': model_name, 'method': 'rocket', 'image_size': '224', 'local_crop_size': '224',
                          'context_length': str(CONTEXT)}, verbose=False)  # not the demo recipe's 32 tokens
    torch.manual_seed(0)
    model = model_lib.CLIPModel(cfg, VOCAB).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == 'cuda')
    weak, *strong = [torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=memory_format)
                     for _ in range(1 + cfg.num_augs)]
    tokens = random_tokens(batch * (1 + cfg.num_augs), device).view(batch, 1 + cfg.num_augs, CONTEXT)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == 'cuda'):
            loss = model_lib.compute_loss(model(weak, tokens, strong), cfg)['loss']
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    model.set_grad_checkpointing(False)  # model FLOPs: recomputation is overhead, not work
    flops = count_flops(step)
    model.set_grad_checkpointing(checkpointing)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    seconds = statistics.median(timed(step, device) for _ in range(steps))
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # the process's peak resident set (model, optimizer state and activations); Linux reports KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
    return batch / seconds, peak, flops / seconds


# --- Lever rows: the strong views' cost against plain CLIP ---
def lever_variants(size, crop, drop):
    """(label, strong views, strong view size, patch dropout of the strong views) of each row."""
    return [('clip', 0, size, 0.0), ('rocket', 2, size, 0.0),
            (f'rocket, strong patch dropout {drop}', 2, size, drop),
            (f'rocket, strong patch dropout {max(drop, 0.75)}', 2, size, max(drop, 0.75)),
            (f'rocket, {crop} px local crops', 2, crop, 0.0),
            (f'rocket, {crop} px crops + dropout {drop}', 2, crop, drop)]


def lever_rows(args, device):
    """FLOPs per training sample (forward + backward, counted) and samples/s of CLIP and of rocket with each lever,
    one model whose steps are interleaved so that a busy machine slows every row alike. The CLIP row is the
    rocket model's global term alone (weak view, one caption row): its heads and step are CLIP's."""
    demo = args.lever_model == 'tiny'  # the quick start's shapes: 64 px, 32-token captions, the demo vocabulary
    size, context, vocab = (64, 32, 1024) if demo else (224, CONTEXT, VOCAB)
    crop, batch = args.lever_crop or size // 2, args.lever_batch or (64 if demo else 4)
    flags = {'model': args.lever_model, 'image_size': str(size), 'local_crop_size': str(crop),
             'context_length': str(context)}
    cfgs = {method: config.resolve({**flags, 'method': method}, verbose=False) for method in ('clip', 'rocket')}
    torch.manual_seed(0)
    model = model_lib.CLIPModel(cfgs['rocket'], vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == 'cuda')
    tokens = random_tokens(batch * 3, device, vocab, context).view(batch, 3, context)
    images = {s: [torch.randn(batch, 3, s, s, device=device) for _ in range(3)] for s in (size, crop)}

    def make(A, strong_size, drop):
        def step():
            model.patch_dropout['strong'] = drop
            cfg = cfgs['rocket' if A else 'clip']
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == 'cuda'):
                out = model(images[size][0], tokens[:, :1 + A], images[strong_size][1:1 + A])
                loss = model_lib.compute_loss(out, cfg)['loss']
            loss.backward()
            optimizer.step()  # parameters without a gradient (the local heads under CLIP) are skipped
            optimizer.zero_grad(set_to_none=True)
        return step
    variants = lever_variants(size, crop, args.lever_drop)
    steps = [make(A, strong_size, drop) for _, A, strong_size, drop in variants]
    flops = [count_flops(step) / batch for step in steps]  # the first call is also the warm-up
    times = [[] for _ in steps]
    for i in range(args.steps):
        for j in range(len(steps)) if i % 2 == 0 else reversed(range(len(steps))):
            times[j].append(timed(steps[j], device))
    rates = [batch / statistics.median(t) for t in times]
    print(f"levers: {args.lever_model}, batch {batch}, weak view at {size} px, {context}-token captions, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {args.steps} interleaved steps per row (median)")
    for (label, *_), f, rate in zip(variants, flops, rates):
        print(f"  {label:38s} {f / 1e9:9.3f} GFLOP/sample ({f / flops[0]:5.3f}x clip)  {rate:8.2f} samples/s "
              f"({rates[0] / rate:5.3f}x clip's time)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int, default=8, help='encoder rows batch')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per implementation (median)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--rocket_batch', type=int, default=0, help='full-step batch (0: 4 on CPU, --batch on GPU)')
    parser.add_argument('--rocket_model', default='resnet50', choices=list(config.MODELS))
    parser.add_argument('--peak_tflops', type=float, default=0, help='peak bf16 TFLOP/s for MFU (0: CUDA table)')
    parser.add_argument('--rows', default='resnet50,vit_b16,vit_b32,text,rocket',
                        help='comma-separated subset; levers: CLIP against rocket with patch dropout / local crops')
    parser.add_argument('--lever_model', default='vit_b16', choices=[m for m in config.MODELS if m != 'resnet50'])
    parser.add_argument('--lever_batch', type=int, default=0, help='lever rows batch (0: 64 for tiny, else 4)')
    parser.add_argument('--lever_crop', type=int, default=0, help='local crop size of the lever rows (0: half)')
    parser.add_argument('--lever_drop', type=float, default=0.5, help='strong-view patch dropout of the lever rows')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = args.rows.split(',')
    print(f"bench.step: {device}, torch {torch.__version__}, {args.threads} threads, batch {args.batch} at 224 px, "
          f"median of {args.steps} after {args.warmup} warm-up steps")
    for name in ('resnet50', 'vit_b16', 'vit_b32', 'text'):
        if name in rows:
            for bf16 in (False, True):
                encoder_row(name, bf16, args, device)
    if 'levers' in rows:
        lever_rows(args, device)
    if 'rocket' not in rows:
        return
    batch = args.rocket_batch or (args.batch if device.type == 'cuda' else 4)
    print(f"rocket step: {args.rocket_model}, batch {batch}, weak + 2 strong views at 224 px, 3 caption rows, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    peak_flops = peak_tflops(device, args.peak_tflops)
    cases = [('plain', False, False), ('grad checkpointing', True, False)]
    if args.rocket_model == 'resnet50':
        cases += [('channels_last', False, True), ('checkpointing + channels_last', True, True)]
    for label, checkpointing, channels_last in cases:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:  # fresh peak memory
            rate, peak, flop_rate = pool.submit(rocket_case, args.rocket_model, batch, max(args.steps // 2, 2), 1,
                                                args.threads, args.device, checkpointing, channels_last).result()
        mfu = f"MFU {100 * flop_rate / 1e12 / peak_flops:5.1f}%" if peak_flops else 'MFU n/a (give --peak_tflops)'
        print(f"  {label:30s} {rate:8.2f} samples/s {rate * (1 + 2):8.1f} images/s  peak "
              f"{'allocated' if device.type == 'cuda' else 'RSS'} {peak:8.0f} MiB  {flop_rate / 1e12:7.2f} TFLOP/s  "
              f"{mfu}", flush=True)


if __name__ == '__main__':
    sys.exit(main())
