"""model.py: encoders against torchvision / timm / open_clip with the same weights, explicit attention math,
closed-form parameter counts and init statistics, causality and EOT pooling, checkpointing / channels_last
equivalence, local-mode dropout, and the forward dict of every method."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
from config import Config
from model import Attention, CLIPModel, ResNet50, TextTransformer, VisionTransformer, build_model, patch_dropout

VOCAB, L = 100, 16
EOT = VOCAB - 1
TINY = dict(vision='vit', vision_width=32, vision_layers=2, vision_heads=2, patch_size=8, image_size=32,
            local_crop_size=32, text_width=32, text_heads=2, text_layers=2, context_length=L, embed_dim=16,
            mlp_hidden_dim=32, barlip_hidden_dim=48, barlip_proj_dim=40, siamlip_hidden_dim=36, siamlip_proj_dim=24)


def tiny_cfg(method='rocket', **overrides):
    """A small validated config with the method's preset (clip: num_augs 0) under the overrides."""
    return config.validate(Config(**{**TINY, **config.method_preset(method), 'method': method, **overrides}))


def captions(*shape):
    """Random token rows (..., L): ids below EOT, one EOT at a random position, zero padding after it."""
    tokens = torch.randint(1, EOT, (*shape, L))
    eot = torch.randint(2, L, shape)
    positions = torch.arange(L)
    tokens[positions == eot[..., None]] = EOT
    tokens[positions > eot[..., None]] = 0
    return tokens, eot


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-5):
    """Same keys, every tensor equal up to tol times its largest magnitude."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol * b[k].abs().max().item() + 1e-12, rtol=0, msg=k)


@pytest.fixture(scope='module')
def resnet():
    torch.manual_seed(0)
    return ResNet50()


# --- ResNet-50 ---
def test_resnet50_is_torchvisions_resnet50(resnet):
    """Same parameter count (23,508,032 without fc), same names and shapes, same outputs with the same weights."""
    torchvision = pytest.importorskip('torchvision')
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()
    assert sum(p.numel() for p in resnet.parameters()) == 23_508_032
    reference.load_state_dict(resnet.state_dict())  # strict: every name and shape matches
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):  # eval first: a train-mode forward updates the running statistics
        ours, theirs = copy.deepcopy(resnet).train(train), reference.train(train)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_resnet50_init(resnet):
    """Kaiming-normal fan_out convs, BN 1/0 except the zero-initialised last BN of every bottleneck."""
    for name, m in resnet.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 100_000:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.03), name
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0 if name.endswith('bn3') else 1)) and torch.all(m.bias == 0), name


# --- ViT ---
def vit_param_count(width, layers, patch, grid):
    """Closed form: conv patch embedding, CLS, position embedding, blocks (qkv, proj, fc1, fc2, 2 LN), final LN."""
    return 3 * patch * patch * width + width + width + (1 + grid * grid) * width + layers * (12 * width ** 2 + 13 * width) \
        + 2 * width


def test_vit_parameter_counts_and_full_size_shapes_on_meta():
    """Every ViT preset at 224 px: the closed-form count (ViT-B/16 = timm's 85,798,656) and (B, width) outputs at
    the native 224 px and at 192 px (interpolated position embeddings); the meta device skips the arithmetic."""
    for name, preset in config.MODELS.items():
        if preset['vision'] != 'vit':
            continue
        w, depth, p = preset['vision_width'], preset['vision_layers'], preset['patch_size']
        with torch.device('meta'):
            vit = VisionTransformer(224, p, w, depth, preset['vision_heads'])
            assert sum(q.numel() for q in vit.parameters()) == vit_param_count(w, depth, p, 224 // p), name
            for size in {224, 192 // p * p}:
                assert vit(torch.empty(2, 3, size, size)).shape == (2, w), (name, size)
    with torch.device('meta'):
        assert sum(q.numel() for q in VisionTransformer(224, 16, 768, 12, 12).parameters()) == 85_798_656


def test_every_preset_builds_and_runs_the_full_rocket_forward_on_meta():
    """Each model preset at its paper size (224 px, 256-d heads, 12-layer text, 49408 tokens): output shapes."""
    for name in config.MODELS:
        cfg = config.resolve({'model': name, 'dataset': 'cc12m'}, verbose=False)
        with torch.device('meta'):
            model = CLIPModel(cfg, 49408)
            w, layers = cfg.text_width, cfg.text_layers
            assert sum(p.numel() for p in model.text.parameters()) == \
                49408 * w + 77 * w + layers * (12 * w ** 2 + 13 * w) + 2 * w  # 63,165,952 at 512 x 12 (OpenAI's)
            out = model(torch.empty(2, 3, 224, 224), torch.zeros(2, 3, 77, dtype=torch.long),
                        [torch.empty(2, 3, 224, 224)] * 2)
        assert out['z_image'].shape == out['z_text'].shape == (2, cfg.embed_dim), name
        assert [h.shape for h in out['h_image'] + out['h_text']] == [(2, cfg.embed_dim)] * 4, name
    assert cfg.embed_dim == 256 and w == 512 and layers == 12


def test_vit_is_timms_vision_transformer():
    """Same outputs as timm's ViT (num_classes=0, CLS pooling) once its weights are renamed to ours."""
    timm_vit = pytest.importorskip('timm.models.vision_transformer')
    theirs = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    renames = [('cls_token', 'class_embedding'), ('pos_embed', 'positional_embedding'), ('patch_embed.proj', 'conv1'),
               ('blocks', 'transformer.resblocks'), ('norm1', 'ln_1'), ('norm2', 'ln_2'), ('attn.qkv', 'attn.in_proj'),
               ('attn.proj', 'attn.out_proj'), ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj'), ('norm.', 'ln_post.')]
    state = {}
    for k, v in theirs.state_dict().items():
        for old, new in renames:
            k = k.replace(old, new)
        state[k] = v
    ours = VisionTransformer(32, 8, 32, 2, 4)
    ours.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('causal', [False, True])
def test_attention_is_explicit_softmax_attention(causal):
    """SDPA path == softmax(q k^T / sqrt(d_head) + mask) v per head with the packed projections, in float64."""
    attn = Attention(24, 3, causal).double()
    x = torch.randn(2, 5, 24, dtype=torch.double)
    q, k, v = (x @ attn.in_proj.weight.T + attn.in_proj.bias).split(24, dim=-1)
    heads = []
    for h in range(3):
        s = slice(8 * h, 8 * h + 8)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8)
        if causal:
            scores = scores + torch.full((5, 5), float('-inf'), dtype=torch.double).triu(1)
        heads.append(scores.softmax(-1) @ v[..., s])
    expected = torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    torch.testing.assert_close(attn(x), expected)
    index = torch.tensor([3, 1])  # the pooled-token path: those query rows only
    torch.testing.assert_close(attn(x, index)[:, 0], expected[torch.arange(2), index])


def test_vit_output_is_the_cls_token_after_the_final_ln():
    """The encoder (whose last block runs the CLS query only) == ln_post of the CLS row of the full computation."""
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 32, 2, 4)
    x = torch.randn(3, 3, 32, 32)
    patches = vit.conv1(x).flatten(2).transpose(1, 2)  # (3, 16, 32)
    tokens = torch.cat([vit.class_embedding.expand(3, 1, 32), patches], 1) + vit.positional_embedding
    torch.testing.assert_close(vit(x), vit.ln_post(vit.transformer(tokens))[:, 0])


def test_vit_forward_flops_match_the_closed_form():
    """FlopCounterMode over the math attention kernel (how bench.step counts MFU's numerator) == the closed form:
    patch conv, full blocks 24*B*T*D^2 + 4*B*T^2*D, and a last block whose CLS-only query, attention,
    out-projection and MLP cost what one token's do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    B, S, p, D, layers = 3, 32, 8, 32, 3
    N = (S // p) ** 2
    T = 1 + N
    vit = VisionTransformer(S, p, D, layers, 4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit(torch.randn(B, 3, S, S))
    conv = 2 * B * N * 3 * p * p * D
    full = 24 * B * T * D ** 2 + 4 * B * T ** 2 * D
    last = 2 * B * T * D * 3 * D + 4 * B * T * D + 2 * B * D ** 2 + 16 * B * D ** 2
    assert counter.get_total_flops() == conv + (layers - 1) * full + last


def test_vit_init():
    """timm style: Linear weights truncated normal std 0.02 with zero biases, position embedding std 0.02, CLS std 1e-6."""
    torch.manual_seed(0)
    vit = VisionTransformer(64, 8, 192, 2, 3)
    for name, m in vit.transformer.named_modules():
        if isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.03) and torch.all(m.bias == 0), name
    assert vit.positional_embedding.std().item() == pytest.approx(0.02, rel=0.05)
    assert 0 < vit.class_embedding.abs().max().item() < 1e-5
    assert vit.no_weight_decay() == set()


def test_openai_vit_init_is_open_clips():
    """OpenAI style, as OpenAI CLIP and open_clip: class and position embeddings std width^-1/2, xavier-uniform
    in-projection (std sqrt(2 / (w + 3w))) with zero bias, zero out-projection bias, PyTorch's Linear default
    (std 1/sqrt(3 fan_in)) elsewhere, MLP biases U(+-1/sqrt(fan_in)); compared with open_clip's own tower."""
    torch.manual_seed(0)
    w = 256
    vit = VisionTransformer(64, 8, w, 2, 4, style='openai')
    assert vit.class_embedding.std().item() == pytest.approx(w ** -0.5, rel=0.2)
    assert vit.positional_embedding.std().item() == pytest.approx(w ** -0.5, rel=0.05)
    for block in vit.transformer.resblocks:
        assert block.attn.in_proj.weight.std().item() == pytest.approx((2 / (4 * w)) ** 0.5, rel=0.03)
        assert torch.all(block.attn.in_proj.bias == 0) and torch.all(block.attn.out_proj.bias == 0)
        for linear, fan_in in ((block.attn.out_proj, w), (block.mlp.c_fc, w), (block.mlp.c_proj, 4 * w)):
            assert linear.weight.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.03)
        assert 0 < block.mlp.c_fc.bias.abs().max().item() <= w ** -0.5
    assert vit.no_weight_decay() == {'class_embedding'}
    open_clip = pytest.importorskip('open_clip.transformer')
    theirs = open_clip.VisionTransformer(64, 8, w, 2, 4, 4.0, output_dim=64)
    ours = dict(vit.named_parameters())
    pairs = [('class_embedding', 'class_embedding'), ('positional_embedding', 'positional_embedding')]
    for i in range(2):
        pairs += [(f'transformer.resblocks.{i}.attn.in_proj.weight', f'transformer.resblocks.{i}.attn.in_proj_weight'),
                  (f'transformer.resblocks.{i}.attn.out_proj.weight', f'transformer.resblocks.{i}.attn.out_proj.weight'),
                  (f'transformer.resblocks.{i}.mlp.c_fc.weight', f'transformer.resblocks.{i}.mlp.c_fc.weight'),
                  (f'transformer.resblocks.{i}.mlp.c_proj.weight', f'transformer.resblocks.{i}.mlp.c_proj.weight')]
    theirs = dict(theirs.named_parameters())
    for a, b in pairs:
        assert ours[a].std().item() == pytest.approx(theirs[b].std().item(), rel=0.2), a


def test_position_embedding_interpolation():
    """Identity (the parameter itself) at the native grid; elsewhere CLS kept, a per-channel constant grid stays
    constant (bicubic weights sum to 1), any multiple of the patch runs, other sizes get one clear error."""
    vit = VisionTransformer(32, 8, 16, 1, 2)
    assert vit.interpolate_pos_embed(4, 4) is vit.positional_embedding
    constant = torch.randn(1, 1, 16)
    with torch.no_grad():
        vit.positional_embedding[:, 1:] = constant
    resized = vit.interpolate_pos_embed(3, 6)
    assert resized.shape == (1, 1 + 18, 16)
    torch.testing.assert_close(resized[:, :1], vit.positional_embedding[:, :1])
    torch.testing.assert_close(resized[:, 1:], constant.expand(1, 18, 16))
    assert vit(torch.randn(2, 3, 24, 48)).shape == (2, 16)
    with pytest.raises(ValueError, match='not a multiple of the ViT patch size 8'):
        vit(torch.randn(1, 3, 30, 32))


def test_patch_dropout_keeps_cls_and_a_uniformly_random_subset():
    """Tokens carrying their own index: CLS first, then `keep` distinct patches in raster order, every one of the
    C(8, 3) = 56 subsets equally likely (chi-square), a fresh draw for every sample and every call."""
    torch.manual_seed(0)
    B, N, keep = 28000, 8, 3
    x = torch.arange(1 + N, dtype=torch.float).expand(B, -1)[..., None]  # (B, 1+N, 1), token i holds i
    kept = patch_dropout(x, keep)[..., 0].long()  # (B, 1+keep)
    assert kept.shape == (B, 1 + keep) and (kept[:, 0] == 0).all()
    assert ((kept[:, 1:] >= 1) & (kept[:, 1:] <= N)).all() and (kept[:, 2:] > kept[:, 1:-1]).all()
    counts = torch.bincount(((kept[:, 1:] - 1) * N ** torch.arange(keep)).sum(1), minlength=N ** keep).float()
    counts = counts[counts > 0]
    assert len(counts) == math.comb(N, keep)  # every subset drawn, nothing else
    expected = B / math.comb(N, keep)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 55 + 6 * math.sqrt(2 * 55), chi2  # 55 degrees of freedom: mean 55, sd 10.5
    assert not torch.equal(kept, patch_dropout(x, keep)[..., 0].long())


@pytest.mark.parametrize('size', [32, 24])
def test_patch_dropout_encodes_the_kept_patches_alone(size):
    """ViT in training with patch dropout == the plain transformer on CLS and the kept patches alone, each patch
    embedded from its own pixels with the position embedding of its place in the grid (interpolated at 24 px).
    The draw is torch's global RNG: replaying the seed replays it."""
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 32, 2, 4).train()
    B, g, p = 3, size // 8, 8
    images = torch.randn(B, 3, size, size)
    keep = int(g * g * (1 - 0.5))
    torch.manual_seed(1)
    got = vit(images, 0.5)
    torch.manual_seed(1)
    kept = patch_dropout(torch.arange(1 + g * g, dtype=torch.float).expand(B, -1)[..., None], keep)[:, 1:, 0].long() - 1
    assert len({tuple(k) for k in kept.tolist()}) > 1  # the samples drew different subsets
    pos = vit.interpolate_pos_embed(g, g)[0]  # (1+g*g, D)
    weight = vit.conv1.weight.flatten(1)  # (D, 3*p*p)
    for b in range(B):
        tokens = [vit.class_embedding[0, 0] + pos[0]]
        for j in kept[b].tolist():
            r, c = divmod(j, g)
            patch = images[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].flatten()
            tokens.append(weight @ patch + vit.conv1.bias + pos[1 + j])
        expected = vit.ln_post(vit.transformer(torch.stack(tokens)[None]))[0, 0]
        torch.testing.assert_close(got[b], expected, rtol=1e-4, atol=1e-5)


def test_patch_dropout_zero_and_eval_mode_change_nothing():
    """Fraction 0 (training) and any fraction in eval mode: the exact outputs of the plain model, and no random
    number drawn. In training the weak view drops patch_dropout_weak of its patches and the strong ones
    patch_dropout_strong (token counts at the transformer's input)."""
    torch.manual_seed(0)
    plain = CLIPModel(tiny_cfg(), VOCAB)
    dropping = CLIPModel(tiny_cfg(patch_dropout_weak=0.25, patch_dropout_strong=0.75), VOCAB)
    dropping.load_state_dict(plain.state_dict())
    tokens, _ = captions(4, 3)
    images = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    for model in (plain.train(), dropping.eval()):
        state = torch.get_rng_state()
        out = model(images[0], tokens, images[1:])
        assert torch.equal(torch.get_rng_state(), state)  # no draw: nothing random happened
        with torch.no_grad():
            features = [model.visual(images[0])] + list(model.visual(torch.cat(images[1:])).chunk(2))
        assert torch.equal(out['z_image'], model.image_heads['z'](features[0]))
        if model is plain:
            reference = out
        else:  # eval: BN of the h heads in eval mode too, so compare the z embeddings and the trunk itself
            assert torch.equal(out['z_image'], reference['z_image'].detach())
    lengths = []
    hook = dropping.visual.transformer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[:2]))
    dropping.train()(images[0], tokens, images[1:])
    hook.remove()
    assert lengths == [(4, 1 + 12), (8, 1 + 4)]  # 16 patches at 32 px: keep 12 of the weak, 4 of each strong


def test_patch_dropout_is_for_the_vit_only():
    with pytest.raises(config.ConfigError, match='applies to the ViT only'):
        tiny_cfg(vision='resnet50', patch_dropout_strong=0.5)
    with pytest.raises(config.ConfigError, match=r'must be in \[0, 1\)'):
        tiny_cfg(patch_dropout_weak=1.0)


# --- Text transformer ---
def test_text_transformer_is_open_clips_text_tower():
    """Same EOT features as open_clip's TextTransformer (QuickGELU, causal mask, argmax pooling) with our weights."""
    transformer = pytest.importorskip('open_clip.transformer')
    theirs = transformer.TextTransformer(context_length=L, vocab_size=VOCAB, width=32, heads=2, layers=2, output_dim=32,
                                         act_layer=transformer.QuickGELU)
    ours = TextTransformer(VOCAB, L, 32, 2, 2)
    state = {k.replace('attn.in_proj.', 'attn.in_proj_'): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict({**state, 'text_projection': torch.eye(32)})
    tokens, _ = captions(4)
    torch.testing.assert_close(ours(tokens), theirs(tokens), atol=1e-5, rtol=1e-4)


def test_text_init_is_openais():
    """Token N(0, .02²), position N(0, .01²), in-proj std w^-½, out-proj and fc2 std w^-½ (2 layers)^-½, fc1 (2w)^-½."""
    torch.manual_seed(0)
    w, layers = 256, 4
    text = TextTransformer(1000, 77, w, layers, 4)
    proj = w ** -0.5 * (2 * layers) ** -0.5
    assert text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert text.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    for block in text.transformer.resblocks:
        for weight, std in ((block.attn.in_proj.weight, w ** -0.5), (block.attn.out_proj.weight, proj),
                            (block.mlp.c_fc.weight, (2 * w) ** -0.5), (block.mlp.c_proj.weight, proj)):
            assert weight.std().item() == pytest.approx(std, rel=0.03)
        assert torch.all(block.attn.in_proj.bias == 0) and torch.all(block.attn.out_proj.bias == 0)


def per_position_features(text, tokens):
    """(B, L, D) final-LN features at every position, computed outside TextTransformer.forward."""
    return text.ln_final(text.transformer(text.token_embedding(tokens) + text.positional_embedding[:tokens.shape[1]]))


def test_text_is_causal():
    """Changing the tokens after position t leaves the features at positions <= t unchanged, and only those."""
    torch.manual_seed(0)
    text = TextTransformer(VOCAB, L, 32, 2, 2).eval()
    a = torch.randint(1, VOCAB, (3, L))
    for t in (0, 5, L - 2):
        b = a.clone()
        b[:, t + 1:] = a[:, t + 1:] % (VOCAB - 1) + 1  # a different id at every later position
        fa, fb = per_position_features(text, a), per_position_features(text, b)
        torch.testing.assert_close(fa[:, :t + 1], fb[:, :t + 1], atol=1e-6, rtol=1e-5)
        assert (fa[:, t + 1:] - fb[:, t + 1:]).abs().amax(-1).min() > 1e-3


def test_eot_pooling_and_padding_invariance():
    """The embedding is the feature at the EOT token (the largest id), whatever follows it: zero padding, random
    ids, or nothing (a shorter context)."""
    torch.manual_seed(0)
    text = TextTransformer(VOCAB, L, 32, 2, 2).eval()
    tokens, eot = captions(4)
    pooled = text(tokens)
    torch.testing.assert_close(pooled, per_position_features(text, tokens)[torch.arange(4), eot])
    junk = tokens.clone()
    after = torch.arange(L) > eot[:, None]
    junk[after] = torch.randint(1, EOT, (int(after.sum()),))
    torch.testing.assert_close(text(junk), pooled, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(text(tokens[:, :int(eot.max()) + 1]), pooled, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match='at most 16'):
        text(torch.zeros(1, L + 1, dtype=torch.long))


def test_local_mode_dropout_only_in_training_and_only_for_local_rows():
    """Global row: no dropout. Local rows in training: Dropout_p of the residual stream at the start of every block
    (checked against an explicit loop with the same RNG). In eval: no dropout anywhere."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_cfg(text_dropout=0.5), VOCAB).train()
    tokens, eot = captions(4, 3)
    images = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    torch.manual_seed(1)
    out = model(images[0], tokens, images[1:])
    torch.testing.assert_close(out['z_text'], model.text_heads['z'](model.text(tokens[:, 0])))
    local_rows = tokens[:, 1:].transpose(0, 1).flatten(0, 1)  # (A*B, L), view-major as the model batches them
    no_dropout = model.text(local_rows).chunk(2)
    assert all(not torch.allclose(h, model.text_heads['h'](f)) for h, f in zip(out['h_text'], no_dropout))

    torch.manual_seed(2)
    got = model.text(local_rows, 0.5)
    torch.manual_seed(2)
    x = model.text.token_embedding(local_rows) + model.text.positional_embedding
    for block in model.text.transformer.resblocks:
        x = block(F.dropout(x, 0.5, training=True))
    expected = model.text.ln_final(x)[torch.arange(8), local_rows.argmax(-1)]
    torch.testing.assert_close(got, expected)

    model.eval()
    out = model(images[0], tokens, images[1:])
    for a in range(2):
        torch.testing.assert_close(out['h_text'][a], model.encode_text(tokens[:, 1 + a], head='h'))


# --- Gradient checkpointing and channels_last ---
def test_resnet_checkpointing_and_channels_last_match_the_plain_path(resnet):
    """Same output, same gradients, and (checkpointing) the same BN running statistics: the recomputation in the
    backward pass must not update them a second time. Float64: BN over tiny batches amplifies fp32 rounding."""
    x, weight = torch.randn(2, 3, 64, 64, dtype=torch.double), torch.randn(2, 2048, dtype=torch.double)
    base = copy.deepcopy(resnet).double()
    with torch.no_grad():  # no zero-init: every branch gets a gradient
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    results = []
    for checkpointing, channels_last in ((False, False), (True, False), (False, True)):
        model = copy.deepcopy(base).train()
        model.grad_checkpointing = checkpointing
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        out = model(x.contiguous(memory_format=fmt))
        (out * weight).sum().backward()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results.append((out, grads(model), buffers))
    plain = results[0]
    for out, g, buffers in results[1:]:
        assert_same({'out': out.detach(), **g, **buffers}, {'out': plain[0].detach(), **plain[1], **plain[2]}, tol=1e-9)


@pytest.mark.parametrize('method', ['rocket', 'siamlip'])
def test_model_checkpointing_matches_with_text_dropout(method):
    """Per-block checkpointing of both transformers: same outputs and gradients, dropout masks (text and patch)
    included."""
    torch.manual_seed(0)
    plain = CLIPModel(tiny_cfg(method, text_dropout=0.3, patch_dropout_strong=0.5), VOCAB).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.text.transformer.grad_checkpointing and checkpointed.visual.transformer.grad_checkpointing
    tokens, _ = captions(4, 3)
    images = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    outs = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        out = model(images[0], tokens, images[1:])
        sum((t.square().mean() for v in out.values() for t in (v if isinstance(v, list) else [v]))).backward()
        outs.append((torch.cat([out['z_text'], *out['h_text'], *out['h_image']]), grads(model)))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert_same(outs[0][1], outs[1][1])


# --- CLIP 🚀 model ---
# the outputs of each kind of method head (the local h heads and the logit biases are checked apart)
HEAD_KEYS = {'slip': {'slip_image'}, 'barlip': {'barlip_image', 'barlip_text'},
             'siam': {'siam_proj_image', 'siam_proj_text', 'siam_pred_image', 'siam_pred_text'}}
EXTRA_KEYS = {name: set().union(*(HEAD_KEYS.get(head, ()) for head in method.heads))
              for name, method in config.METHODS.items()}
EXTRA_DIMS = {'slip_image': 256, 'barlip_image': 40, 'barlip_text': 40}


@pytest.mark.parametrize('method,A', [(m, None) for m in config.METHODS] + [('rocket', 0)])
def test_forward_keys_and_shapes_per_method(method, A):
    """Exactly the contract's keys for each method (A = 0: only the global ones), list lengths, widths, scales."""
    cfg = tiny_cfg(method) if A is None else tiny_cfg(method, num_augs=A)
    model = build_model(cfg, VOCAB).train()
    A, B = cfg.num_augs, 4
    out = model(torch.randn(B, 3, 32, 32), captions(B, 1 + A)[0], [torch.randn(B, 3, 32, 32) for _ in range(A)])
    local = {'h_image', 'h_text', 'l2l_logit_scale'} if 'h' in config.METHODS[method].heads and A > 0 else set()
    biases = set() if 'bias' not in config.METHODS[method].heads else {'logit_bias'} | (
        {'l2l_logit_bias'} if local else set())
    assert set(out) == {'z_image', 'z_text', 'logit_scale'} | local | EXTRA_KEYS[method] | biases
    assert model.heads == (('z', 'h') if local else ('z',))
    assert out['z_image'].shape == out['z_text'].shape == (B, 16)
    assert out['logit_scale'].ndim == 0 and out['logit_scale'].item() == pytest.approx(math.exp(cfg.logit_scale_init))
    assert model.logit_scale.ndim == 0 and isinstance(model.logit_scale, nn.Parameter)
    assert all(out[k].ndim == 0 and out[k].item() == -10 and isinstance(out[k], nn.Parameter) for k in biases)
    if local:
        assert out['l2l_logit_scale'].item() == pytest.approx(math.exp(cfg.l2l_logit_scale_init))
    else:
        assert not hasattr(model, 'l2l_logit_scale')
    for key in local - {'l2l_logit_scale'} | EXTRA_KEYS[method]:
        views = A if key.startswith(('h_', 'slip')) else 1 + A
        assert [t.shape for t in out[key]] == [(B, EXTRA_DIMS.get(key, 24 if 'siam' in key else 16))] * views, key


@pytest.mark.parametrize('vision', ['vit', 'resnet50'])
def test_each_strong_view_is_its_own_batch(vision):
    """h of strong view a == the h head on the backbone features of view a alone, both in train mode: separate BN
    batches for the ResNet and the MLP heads; concatenating the ViT's views (no BN) changes nothing."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_cfg('barlip', vision=vision), VOCAB).train()
    tokens, _ = captions(3, 3)
    images = [torch.randn(3, 3, 32, 32) for _ in range(3)]
    out = model(images[0], tokens, images[1:])
    for a in range(2):
        features = model.visual(images[1 + a])
        assert_same({'h': out['h_image'][a], 'barlip': out['barlip_image'][1 + a]},
                    {'h': model.image_heads['h'](features), 'barlip': model.barlip_image(features)}, tol=1e-4)


def test_encoders_heads_and_bad_input():
    """encode_* = head(trunk) with BN in eval mode, encode_*_heads gives every head from one pass; clear errors
    for a missing head and mismatched token rows."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_cfg(), VOCAB).eval()
    images, (tokens, _) = torch.randn(3, 3, 32, 32), captions(3)
    for head in ('z', 'h'):
        torch.testing.assert_close(model.encode_image(images, head), model.image_heads[head](model.visual(images)))
        torch.testing.assert_close(model.encode_text(tokens, head), model.text_heads[head](model.text(tokens)))
    assert model.encode_image(images, 'h').shape == model.encode_text(tokens).shape == (3, 16)
    image_heads, text_heads = model.encode_image_heads(images), model.encode_text_heads(tokens)
    assert list(image_heads) == list(text_heads) == ['z', 'h']
    for head in ('z', 'h'):  # one trunk pass for all heads == one per head
        torch.testing.assert_close(image_heads[head], model.encode_image(images, head))
        torch.testing.assert_close(text_heads[head], model.encode_text(tokens, head))
    clip = CLIPModel(tiny_cfg('clip'), VOCAB)
    with pytest.raises(ValueError, match="head 'h' is not in this model's heads"):
        clip.encode_text(tokens, head='h')
    with pytest.raises(ValueError, match='do not match 1 strong views'):
        model(images, captions(3, 3)[0], [images])
    with pytest.raises(ValueError, match='vocab_size=0'):
        CLIPModel(tiny_cfg(), 0)


def test_projector_init_and_structure():
    """z heads: bias-free, N(0, 1/in); h heads: Linear-BN-ReLU x2 then Linear, biased; SiamLIP: bias-free projector
    ending in a BN without affine, predictor with a final bias; BarLIP ends in an affine BN."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_cfg('siamlip', vision_width=256, mlp_hidden_dim=64), VOCAB)
    z = model.image_heads['z']
    assert z.bias is None and z.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    kinds = lambda seq: [type(m).__name__ for m in seq]
    assert kinds(model.image_heads['h']) == ['Linear', 'BatchNorm1d', 'ReLU'] * 2 + ['Linear']
    assert all(m.bias is not None for m in model.image_heads['h'] if isinstance(m, nn.Linear))
    assert kinds(model.siam_proj_text) == ['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d']
    assert model.siam_proj_text[-1].weight is None and model.siam_proj_text[0].bias is None
    assert model.siam_pred_image[0].bias is None and model.siam_pred_image[-1].bias is not None
    barlip = CLIPModel(tiny_cfg('barlip'), VOCAB).barlip_text
    assert isinstance(barlip[-1], nn.BatchNorm1d) and barlip[-1].weight is not None


def test_build_model_prints_the_parameter_count_of_each_part(capsys):
    model = build_model(tiny_cfg('slip'), VOCAB)
    line = capsys.readouterr().out
    total = sum(p.numel() for p in model.parameters())
    assert f"total {total:,}" in line
    for part in ('visual', 'text', 'image_heads', 'text_heads', 'slip_image'):
        assert f"{part} {sum(p.numel() for p in getattr(model, part).parameters()):,}" in line
