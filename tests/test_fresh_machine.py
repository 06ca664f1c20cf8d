"""What a new user meets first: imports from the repository root, sampling defaults, prompt warnings, the CLI."""
import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saeuron import pipelines
from saeuron.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_installed_packages_import_from_the_repository_root():
    """`python -c` from the root puts the root first on sys.path: no folder there may hide an installed package."""
    r = _run_from_root("from diffusers import StableDiffusionPipeline\n"
                       "import transformers\nfrom transformers import CLIPTextModel\n"
                       "import importlib.util, os\n"
                       "spec = importlib.util.find_spec('kernels')\n"
                       "print('KERNELS', None if spec is None else (spec.origin or list(spec.submodule_search_locations)))")
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("KERNELS")][0]
    # the name 'kernels' is either the installed PyPI package or nothing: never the repository's folder
    assert str(ROOT / "kernels") not in line, line


def test_no_top_level_folder_is_a_package_but_the_project_ones():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert set(packages) <= {"saeuron", "tests", "benchmarks"}, packages


def test_kernels_and_csrc_are_reached_through_saeuron():
    import saeuron.extension as build
    from saeuron.kernels import backend

    for op in ("topk_encode", "sparse_decode", "edit_"):
        assert callable(getattr(backend, op))
    assert Path(backend.__file__).resolve().parent == (ROOT / "kernels").resolve()
    assert {p.name for p in build.sources(False)} >= {"bindings.cpp", "cpu_ops.cpp"}
    spec = importlib.util.find_spec("saeuron.csrc")
    assert spec is not None


def test_sampling_defaults_are_the_pipelines_own(tiny_pipe):
    from saeuron.minicanvas.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, build_pipeline

    mc = build_pipeline("micro")
    assert pipelines.sampling_defaults(mc) == {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    assert pipelines.sampling_defaults(tiny_pipe) == {"num_inference_steps": 50, "guidance_scale": 7.5}
    assert pipelines.resolve_sampling(mc, 3, None) == {"num_inference_steps": 3, "guidance_scale": DEFAULT_GUIDANCE}


def test_generate_without_steps_uses_the_pipeline_default(tmp_path, tiny_pipe):
    """`generate` with no steps or guidance runs the pipeline's own (the scheduler records the step count)."""
    import torch
    from conftest import make_sae

    from saeuron.concepts import ConceptTable
    from saeuron.generate import generate

    up = "up_blocks.1.attentions.1"
    make_sae(32, 128, 4, seed=1).save(tmp_path / "ck" / up)
    ConceptTable(["cat", "dog"], [2, 2], [501.0, 1.0], {up: torch.rand(2, 2, 128) * 1e-3},
                 defaults={"top_n": 4, "multiplier": -3.0}).save(tmp_path / "ck")
    tiny_pipe.set_progress_bar_config(disable=True)
    steps, orig = [], tiny_pipe.scheduler.set_timesteps

    def spy(n, *a, **k):
        steps.append(n)
        return orig(n, *a, **k)

    tiny_pipe.scheduler.set_timesteps = spy
    generate(tiny_pipe, ["a cat"], tmp_path / "out", concepts="cat", checkpoint=tmp_path / "ck", seeds=[0],
             progress=False)
    assert steps == [pipelines.sampling_defaults(tiny_pipe)["num_inference_steps"]] * 2 == [50, 50]


def test_minicanvas_warns_about_words_and_forms_it_does_not_know():
    from saeuron.minicanvas import data
    from saeuron.minicanvas.model import build_pipeline

    vocab = build_pipeline("micro").tokenizer.get_vocab()
    msgs = data.prompt_warnings(["a picture of a dragon drawn in sketch style"], vocab)
    assert any("'dragon'" in m and "An image of {object} in {style} style." in m for m in msgs), msgs
    assert any("other word orders" in m for m in msgs)
    assert data.prompt_warnings(["An image of heart in sketch style.", ""], vocab) == []
    assert data.prompt_warnings(["an  image of HEART in sketch style."], vocab) == []  # case and spaces
    only_form = data.prompt_warnings(["a heart in sketch style"], vocab)
    assert len(only_form) == 1 and "other word orders" in only_form[0]


def test_minicanvas_pipeline_call_warns_on_unknown_words():
    from saeuron.minicanvas.model import build_pipeline

    pipe = build_pipeline("micro")
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match="'unicorn'"):
        pipe("An image of unicorn in sketch style.", num_inference_steps=1)


def _actions(parser, path=("saeuron",)):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, path + (name,))
        else:
            yield path, a


def test_every_cli_option_has_help_text():
    missing = [f"{' '.join(p)} {a.option_strings or a.dest}" for p, a in _actions(build_parser())
               if a.dest != "help" and not (a.help and a.help.strip())]
    assert not missing, missing


def test_sampling_commands_default_to_the_shipped_model_and_the_pipeline_settings():
    p = build_parser()
    for argv in (["generate", "--concept", "x", "--prompt", "p", "--out", "o"],
                 ["collect", "--prompts", "p.txt", "--out", "o", "--hookpoints", "h"],
                 ["explain", "--concept", "x", "--out", "o"]):
        a = p.parse_args(argv)
        assert a.model == "minicanvas" and a.steps is None and a.guidance is None, argv
        assert getattr(a, "checkpoint", None) is None


@pytest.mark.parametrize("model", ["./no_such_sd15", "/no/such/folder", "~/no_such_model_dir", "a/b/c"])
def test_a_missing_local_folder_is_reported_as_missing(model, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipelines.load_pipeline(model, "cpu")
    with pytest.raises(SystemExit) as e:
        main(["hookpoints", "--model", model])
    assert "does not exist" in str(e.value) and "hub" not in str(e.value).split("does not exist")[0]


def test_a_folder_without_model_index_is_not_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        pipelines.load_pipeline(str(tmp_path), "cpu")
