"""Issue 23, class 6: malformed files and values give one clear error naming what was wrong and what is valid."""
import json

import pytest
import torch

from conftest import make_sae
from saeuron.cli.common import parse_per_concept
from saeuron.collection import read_prompt_file
from saeuron.concepts import ConceptTable
from saeuron.patching import patch, unpatch
from saeuron.sae import SaeConfig, SparseAutoencoder
from saeuron.store import ActivationStore
from saeuron.trainer import METRICS_FILE, TrainConfig, train

HP = "up_blocks.1.attentions.1"


@pytest.mark.parametrize("text, match", [('{"cat": ["a cat",', r"not valid JSON: .* line 1"),
                                         ('{"cat": "a cat"}', "non-empty lists"), ("[]", "non-empty JSON list"),
                                         ('["a", 3]', "JSON list of prompts"), ('{"cat": [""]}', "non-empty strings")])
def test_malformed_prompt_files(tmp_path, text, match):
    from saeuron.cli.common import read_prompts

    p = tmp_path / "prompts.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_prompt_file(p)
    with pytest.raises(SystemExit, match=match):  # the CLI: one line, no traceback
        read_prompts(str(p))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    assert read_prompt_file(_write(tmp_path / "ok.json", {"cat": ["a cat"]})) == {"cat": ["a cat"]}


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("damage, match", [("{torn", r"store\.json is not valid JSON"),
                                           ({"done": "0"}, "'done' must be a list"),
                                           ({"hookpoints": {"hp": "4"}}, "'hookpoints' must be"),
                                           ({"labels": ["a"]}, "'labels' must be"), ([1, 2], "must hold a JSON object")])
def test_malformed_store_manifest(tmp_path, damage, match):
    ActivationStore.create(tmp_path, {"hp": 4}, ["a", "b"]).close()
    meta = json.loads((tmp_path / "store.json").read_text())
    if isinstance(damage, str):
        (tmp_path / "store.json").write_text(damage)
    elif isinstance(damage, list):
        _write(tmp_path / "store.json", damage)
    else:
        _write(tmp_path / "store.json", {**meta, **damage})
    with pytest.raises(ValueError, match=match):
        ActivationStore(tmp_path)


def test_torn_last_metrics_line_does_not_block_resume(tmp_path):
    cfg = TrainConfig(k=2, num_latents=16, batch_size=32, max_steps=4, save_every=2, log_every=1)
    x = torch.randn(256, 8)
    train(x, tmp_path, "hp", cfg, progress=False)
    log = tmp_path / "hp" / METRICS_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])  # a kill mid-write
    with pytest.warns(UserWarning, match=r"dropped 1 unreadable line\(s\) \(line 3\)"):
        train(x, tmp_path, "hp", cfg, progress=False)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("values, match", [(["cat=abc"], r"'abc' is not a finite number"), (["nan"], "finite"),
                                           (["cat=-1", "-5"], "NAME=NUMBER"), (["=3", "b=1"], "name before '='"),
                                           (["a=1", "a=2"], "given twice")])
def test_per_concept_cli_values(values, match):
    from saeuron.cli.common import per_concept

    with pytest.raises(ValueError, match=match):
        parse_per_concept(values, "multiplier")
    with pytest.raises(SystemExit, match=match):
        per_concept(values, "multiplier")
    assert parse_per_concept(["cat=-5", "dog=1e1"], "multiplier") == {"cat": -5.0, "dog": 10.0}
    assert parse_per_concept(["-2"], "multiplier") == -2.0 and parse_per_concept(None, "x") is None


@pytest.mark.parametrize("concepts, match", [(None, "concepts must be a concept name"), (3, "concepts must be"),
                                             ([], "no concepts"), (["cat", None], "non-empty strings")])
def test_patch_concepts_argument(tiny_pipe, concepts, match):
    table = ConceptTable(["cat", "dog"], [1, 1], [1.0], {HP: torch.rand(2, 1, 64)})
    with pytest.raises((TypeError, ValueError), match=match):
        patch(tiny_pipe, concepts, saes={HP: make_sae(32, 64, 4)}, table=table)
    assert unpatch(tiny_pipe) is False


def test_sae_on_the_meta_device_is_refused_at_patch_time(tiny_pipe):
    meta = SparseAutoencoder(SaeConfig(d_in=32, num_latents=64, k=4), device="meta")
    table = ConceptTable(["cat", "dog"], [1, 1], [1.0], {HP: torch.rand(2, 1, 64)})
    with pytest.raises(ValueError, match="meta device"):
        patch(tiny_pipe, "cat", saes={HP: meta}, table=table)
    assert unpatch(tiny_pipe) is False


@pytest.mark.parametrize("text", ["[1, 2]", "{torn", '{"format": "saeuron.concepts", "version": 1, "hookpoints": 3}'])
def test_malformed_concept_json(tmp_path, text):
    ConceptTable(["cat", "dog"], [1, 1], [1.0], {HP: torch.rand(2, 1, 8)}).save(tmp_path)
    (tmp_path / "concepts.json").write_text(text)
    with pytest.raises(ValueError, match="concept file"):
        ConceptTable.load(tmp_path)


@pytest.mark.parametrize("text", ["{torn", "[1]", "{\"d_in\": 8, \"k\": 2, \"expansion_factor\": -1}"])
def test_malformed_sae_config(tmp_path, text):
    make_sae(8, 16, 2).save(tmp_path)
    (tmp_path / "cfg.json").write_text(text)
    with pytest.raises(ValueError, match="corrupt checkpoint: .*not valid JSON" if text == "{torn" else
                       "SAE checkpoint .*(JSON object|expansion_factor)"):
        SparseAutoencoder.load(tmp_path)


def test_malformed_unlearncanvas_config(tmp_path):
    from saeuron.evaluate.unlearncanvas import read_config

    (tmp_path / "config.json").write_text("{torn")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="not an UnlearnCanvas run config"):
        read_config(tmp_path)
