"""A user's own evaluation sets: --datasets=folder:PATH or a --catalog entry, an ImageFolder whose class folders are
all candidates (with images or not), class names and templates from files or the folder names."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from augment import eval_transform
from config import Config
from data import Tokenizer, checkpoint_merges
from model import FORMAT, CLIPModel

CLASSES = ['blue_square', 'green_circle', 'red_triangle']  # green_circle has no images
COLOURS = {'blue_square': (20, 40, 220), 'red_triangle': (220, 30, 30)}


@pytest.fixture
def setup(tmp_path):
    """(checkpoint path, model, tokenizer, cfg, set root) of a small random model and a 3-class folder set."""
    cfg = dataclasses.replace(Config(), vision_width=32, vision_layers=1, vision_heads=2, patch_size=8, image_size=16,
                              local_crop_size=16, text_width=32, text_heads=2, text_layers=1, embed_dim=16,
                              mlp_hidden_dim=16, context_length=32, method='clip', num_augs=0)
    merges = checkpoint_merges('')
    torch.manual_seed(4)
    model = CLIPModel(cfg, Tokenizer(merges).vocab_size).eval()
    path = tmp_path / 'ckpt.pt'
    torch.save({'format': FORMAT, 'config': cfg.to_dict(), 'model': model.state_dict(), 'epoch': 1,
                'bpe_merges': merges}, path)
    root = tmp_path / 'shapes'
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    for name, colour in COLOURS.items():
        for i in range(8):
            noise = (torch.rand(20, 24, 3, generator=g) * 120).to(torch.uint8)
            pixels = (torch.tensor(colour, dtype=torch.uint8) // 2 + noise).numpy()
            Image.fromarray(pixels).save(root / name / f'{i}.png')
    return path, model, Tokenizer(merges, cfg.context_length), cfg, root


def reference_top1(model, tokenizer, cfg, root, classnames, templates):
    """Top-1 in percent of zero-shot over every class name as a candidate, computed here from the encoders."""
    with torch.no_grad():
        classes = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])),
                                                       dim=-1).mean(0), dim=0) for c in classnames])
        files = [(f, i) for i, c in enumerate(CLASSES) for f in sorted((root / c).glob('*.png'))]
        images = torch.stack([eval_transform(cfg)(Image.open(f)) for f, _ in files])
        predicted = (F.normalize(model.encode_image(images), dim=-1) @ classes.T).argmax(1)
    labels = torch.tensor([i for _, i in files])
    return 100 * (predicted == labels).double().mean().item(), predicted


def test_folder_set_keeps_empty_classes_as_candidates(setup, tmp_path):
    path, model, tokenizer, cfg, root = setup
    pairs = tmp_path / 'pairs.csv'  # a retrieval set in the same run keeps working
    pairs.write_text('image,caption\nshapes/blue_square/0.png,a blue square\nshapes/red_triangle/0.png,a red one\n')
    records = evaluate.main([str(path), f'--datasets=folder:{root}', f'--retrieval={pairs}', '--workers=0',
                             f'--out={tmp_path / "results.json"}'])
    shapes = records[0]['results']['shapes']
    top1, predicted = reference_top1(model, tokenizer, cfg, root, [c.replace('_', ' ') for c in CLASSES],
                                     evaluate.FOLDER_TEMPLATES)
    assert (predicted == 1).any()  # the empty class wins some images: dropping it would change the result
    assert shapes['classes'] == 3 and shapes['images'] == 16 and shapes['acc1_z'] == pytest.approx(top1, abs=1e-9)
    assert records[0]['results']['retrieval']['captions'] == 2


def test_catalogue_entry_with_classnames_and_templates_files(setup, tmp_path):
    path, model, tokenizer, cfg, root = setup
    names, templates = ['a blue square', 'a green circle', 'a red triangle'], ['a drawing of {}.', '{}, a shape.']
    (tmp_path / 'names.txt').write_text('\n'.join(names) + '\n')
    catalog = {'my_shapes': {'path': str(root), 'classnames': str(tmp_path / 'names.txt'), 'templates': templates}}
    (tmp_path / 'catalog.json').write_text(json.dumps(catalog))
    records = evaluate.main([str(path), '--datasets=my_shapes', f'--catalog={tmp_path / "catalog.json"}',
                             '--workers=0', f'--out={tmp_path / "results.json"}'])
    result = records[0]['results']['my_shapes']
    assert result['classes'] == 3
    assert result['acc1_z'] == pytest.approx(reference_top1(model, tokenizer, cfg, root, names, templates)[0], abs=1e-9)


def test_custom_set_errors_are_one_line(setup, tmp_path, capsys):
    path, _, _, _, root = setup
    (root / 'classnames.txt').write_text('one\ntwo\n')
    with pytest.raises(SystemExit):
        evaluate.main([str(path), f'--datasets=folder:{root}', '--workers=0', f'--out={tmp_path / "r.json"}'])
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'shapes failed' in err
    result = json.loads((tmp_path / 'r.json').read_text())[0]['results']['shapes']
    assert '3 class folders but 2 class names' in result['error']
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(path), '--datasets=shapes'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown dataset 'shapes'" in err and 'folder:PATH' in err
