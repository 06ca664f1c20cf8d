"""generate(): original and unlearned PNGs from the same noise, plus the labelled grid."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_sae
from saeuron.concepts import ConceptTable
from saeuron.generate import generate
from saeuron.images import image_grid, save_png
from saeuron.patching import get_patch, patch, unpatch

UP = "up_blocks.1.attentions.1"


def _checkpoint(path):
    make_sae(32, 128, 4, seed=1).save(path / UP)
    mu = torch.rand(2, 2, 128, generator=torch.Generator().manual_seed(0)) * 1e-3
    ConceptTable(["cat", "dog"], [2, 2], [501.0, 1.0], {UP: mu}, defaults={"top_n": 32, "multiplier": -3.0}).save(path)
    return path


def test_generate_writes_pngs_and_grid(pipe, tmp_path):
    ck = _checkpoint(tmp_path / "ck")
    prompts, seeds = ["a cat", "a dog in the house"], [0, 7]
    res = generate(pipe, prompts, tmp_path / "out", concepts="cat", checkpoint=ck, seeds=seeds,
                   num_inference_steps=2, guidance_scale=7.5, progress=False)
    assert len(res["original"]) == len(res["unlearned"]) == len(res["pairs"]) == 4
    assert [p for p, _, _ in res["pairs"]] == ["a cat", "a cat", "a dog in the house", "a dog in the house"]
    changed = []
    for a, b in zip(res["original"], res["unlearned"]):
        ia, ib = Image.open(a), Image.open(b)
        assert ia.size == ib.size == (64, 64) and ia.format == "PNG"
        assert "original" in a and "unlearned" in b
        changed.append(np.abs(np.asarray(ia, np.float32) - np.asarray(ib, np.float32)).max())
    assert max(changed) > 0  # the edit changed the images
    grid = Image.open(res["grid"])
    assert grid.width > 2 * 64 and grid.height >= 4 * 64
    # the original is what the plain pipeline makes from the same seed
    plain = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(7)).images[0]
    diff = np.abs(np.asarray(plain, np.int16) - np.asarray(Image.open(res["original"][1]), np.int16))
    assert diff.max() <= 1
    assert get_patch(pipe) is None


def test_generate_restores_previous_patch_and_checks_first(pipe, tmp_path):
    ck = _checkpoint(tmp_path / "ck")
    prev = patch(pipe, "dog", ck)
    try:
        generate(pipe, "a cat", tmp_path / "out", concepts=["cat"], checkpoint=ck, num_inference_steps=2,
                 progress=False)
        assert get_patch(pipe) is prev
        with pytest.raises(ValueError, match="unknown concept 'kat'"):
            generate(pipe, "a cat", tmp_path / "bad", concepts="kat", checkpoint=ck, progress=False)
        assert not (tmp_path / "bad").exists() and get_patch(pipe) is prev
    finally:
        unpatch(pipe)


def test_image_grid_layout(tmp_path):
    ims = [[Image.new("RGB", (20, 10), c) for c in ("red", "blue", "green")] for _ in range(2)]
    g = image_grid(ims, row_labels=["one", "two"], col_labels=["a", "b", "c"], pad=2, label_width=30)
    assert g.width == 30 + 2 + 3 * 22 + 2 and g.height > 2 * 12
    assert g.getpixel((32 + 2 + 5, g.height - 2 - 5)) == (255, 0, 0)  # bottom-left image cell
    plain = image_grid(ims, pad=0)
    assert plain.size == (60, 20)
    path = save_png(g, tmp_path / "sub" / "g.png")
    assert Image.open(path).size == g.size
    with pytest.raises(ValueError, match="row labels"):
        image_grid(ims, row_labels=["x"])


def test_generate_refuses_a_folder_another_process_writes(pipe, tmp_path):
    import subprocess
    import sys

    from saeuron.utils import FolderBusyError

    ck, out = _checkpoint(tmp_path / "ck"), tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom saeuron.utils import FolderLock\n"
                               f"with FolderLock({str(out)!r}, 'a test'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError):
            generate(pipe, ["a cat"], out, concepts="cat", checkpoint=ck, seeds=[0], num_inference_steps=1,
                     progress=False)
        assert not (out / "grid.png").exists()
    finally:
        holder.kill()
        holder.wait()
    res = generate(pipe, ["a cat"], out, concepts="cat", checkpoint=ck, seeds=[0], num_inference_steps=1,
                   progress=False)  # the lock died with its process
    assert (out / "grid.png").is_file() and res["grid"].endswith("grid.png")
