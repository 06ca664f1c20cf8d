"""The command line: every stage's --help, and the whole data path through `saeuron <stage>`."""
import json
import os

import pytest

from saeuron.cli import build_parser, main

STAGES = ["hookpoints", "collect", "train", "select", "generate", "backend", "demo"]


@pytest.mark.parametrize("stage", STAGES)
def test_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    assert "usage: saeuron " + stage in capsys.readouterr().out


def test_top_level_help_lists_every_stage():
    text = build_parser().format_help()
    for stage in STAGES:
        assert stage in text


def test_stages_end_to_end(tmp_path, tiny_pipe, capsys):
    model = tmp_path / "model"
    tiny_pipe.save_pretrained(model)
    main(["hookpoints", "--model", str(model)])
    assert "up_blocks.1.attentions.1\t32" in capsys.readouterr().out

    prompts = tmp_path / "concepts.json"
    prompts.write_text(json.dumps({"cat": ["an image of a cat in photo style", "a cat in sketch style"],
                                   "dog": ["an image of a dog in photo style", "a dog in cartoon style"]}))
    hp = "up_blocks.1.attentions.1"
    main(["collect", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "acts"),
          "--hookpoints", hp, "--steps", "3", "--batch-size", "2", "--device", "cpu"])
    assert "rows" in capsys.readouterr().out
    main(["train", "--store", str(tmp_path / "acts"), "--out", str(tmp_path / "ckpt"), "--k", "4",
          "--num-latents", "64", "--batch-size", "64", "--device", "cpu", "--dead-tokens", "1000"])
    assert (tmp_path / "ckpt" / hp / "sae.safetensors").is_file()
    main(["select", "--store", str(tmp_path / "acts"), "--checkpoint", str(tmp_path / "ckpt"), "--top-n", "2",
          "--device", "cpu"])
    assert "cat, dog" in capsys.readouterr().out
    main(["generate", "--model", str(model), "--checkpoint", str(tmp_path / "ckpt"), "--concept", "cat",
          "--prompt", "a cat in photo style", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "img"),
          "--device", "cpu", "--multiplier", "cat=-3"])
    assert (tmp_path / "img" / "grid.png").is_file()
    main(["generate", "--model", str(model), "--checkpoint", str(tmp_path / "ckpt"), "--concept", "cat",
          "--prompt", "a cat in photo style", "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "img2"),
          "--device", "cpu", "--multiplier", "cat=-3", "--threshold", "1e12"])  # tau x1e12: nothing is edited
    out = tmp_path / "img2"
    for name in os.listdir(out / "original"):
        assert (out / "original" / name).read_bytes() == (out / "unlearned" / name).read_bytes()


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--checkpoint", "c", "--concept", "cat", "--out", "o"],
    ["attack", "--model", "m", "--concept", "cat", "--prompt", "p", "--target-images", "t", "--out", "o"],
    ["unlearncanvas", "generate", "--run", "r"],
    ["minicanvas", "eval"],
])
def test_edit_options_reach_patch(argv):
    from saeuron.cli.common import patch_kwargs

    a = build_parser().parse_args([*argv, "--multiplier", "-2", "--threshold", "cat=10", "dog=3"])
    assert patch_kwargs(a) == {"multiplier": -2.0, "threshold": {"cat": 10.0, "dog": 3.0}}
    assert patch_kwargs(build_parser().parse_args(argv)) == {}  # unset: the concept file's defaults


def test_unknown_dtype_and_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="unknown dtype"):
        main(["collect", "--model", str(tmp_path), "--prompts", "x.txt", "--out", "o", "--hookpoints", "h",
              "--dtype", "fp8"])
    with pytest.raises(SystemExit, match="not a diffusers pipeline"):
        main(["hookpoints", "--model", str(tmp_path)])
