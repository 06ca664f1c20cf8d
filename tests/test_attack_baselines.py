"""The UnlearnDiffAtk-style attack (through a patched UNet) and the UCE / ESD baselines on the tiny pipeline."""
import types

import pytest
import torch

from conftest import make_sae
from saeuron import reference
from saeuron.concepts import ConceptTable
from saeuron.evaluate.attack import (AttackTarget, attack, attack_eval, denoising_loss, encode, encode_prompts,
                                     generate_adversarial, prefixed_ids, to_latents)
from saeuron.evaluate.baselines import cross_attention_projections, esd_parameters, esd_train, uce_edit
from saeuron.patching import get_patch, patch

UP, MID = "up_blocks.1.attentions.1", "mid_block.attentions.0"
TS = [667.0, 334.0, 1.0]
PROMPT = "an image of a cat"


pytestmark = pytest.mark.usefixtures("unpatched_after")  # the module pipe of conftest, unpatched after each test


def _images(n=2, seed=1):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _table_and_saes():
    """A cat/dog table whose selected features fire (thresholds ~1e-3), and SAEs for its two hookpoints."""
    g = torch.Generator().manual_seed(0)
    mu = {hp: torch.rand(2, len(TS), m, generator=g) * 1e-3 for hp, m in ((UP, 128), (MID, 96))}
    table = ConceptTable(["cat", "dog"], [3, 4], TS, mu, defaults={"top_n": 24, "multiplier": -1.0})
    return table, {UP: make_sae(32, 128, 4, seed=1), MID: make_sae(64, 96, 4, seed=2)}


def _patch(pipe):
    table, saes = _table_and_saes()
    return patch(pipe, "cat", saes=saes, table=table)


# --------------------------------------------------------------------------- attack

def test_to_latents_vae_and_pixel_space(pipe):
    x = _images(1)
    with torch.no_grad():
        want = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(to_latents(pipe, x), want)
    assert torch.equal(to_latents(types.SimpleNamespace(unet=pipe.unet, vae=None), x), x)  # MiniCanvas: pixels
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_latents(pipe, torch.zeros(3))


def test_prefix_slots_follow_bos_and_splice_only_there(pipe):
    ids, start = prefixed_ids(pipe.tokenizer, PROMPT, 5)
    plain = pipe.tokenizer(PROMPT).input_ids
    assert start == 1 and ids.shape == (1, pipe.tokenizer.model_max_length)
    assert ids[0, 0] == plain[0] and ids[0, 6:6 + len(plain) - 1].tolist() == plain[1:]
    emb = pipe.text_encoder.get_input_embeddings()
    prefix = torch.randn(5, emb.embedding_dim)
    with torch.no_grad():
        a, b = encode(pipe, ids, prefix, start), encode(pipe, ids)
    assert torch.equal(a[:, 0], b[:, 0])  # causal: BOS does not see the prefix
    assert (a[:, 1:] - b[:, 1:]).abs().amax() > 1e-3
    # suffix: the slots take the padding after EOS; every prompt token keeps its position and hidden state
    sids, sstart = prefixed_ids(pipe.tokenizer, PROMPT, 5, "suffix")
    assert sstart == len(plain) and sids[0, :sstart].tolist() == plain and sids.shape == ids.shape
    with torch.no_grad():
        c, d = encode(pipe, sids, prefix, sstart), encode(pipe, sids)
    torch.testing.assert_close(c[:, :sstart], d[:, :sstart], rtol=0, atol=1e-6)
    assert (c[:, sstart:] - d[:, sstart:]).abs().amax() > 1e-3
    long_ids, _ = prefixed_ids(pipe.tokenizer, " ".join(["cat"] * 200), 5, "suffix")  # truncated, EOS kept
    assert long_ids.shape == ids.shape and long_ids[0, -6] == pipe.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="valid: prefix, suffix"):
        prefixed_ids(pipe.tokenizer, PROMPT, 5, "middle")


def test_attack_moves_prefix_and_lowers_fixed_batch_loss(pipe):
    imgs = _images()
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    # one timestep and noise drawn once: the same batch every iteration, so the loss must go down
    kw = dict(progress=False, seed=0, timesteps="inference", num_inference_steps=1, fixed_noise=True)
    init = attack(pipe, PROMPT, imgs, iterations=1, lr=0.0, **kw)
    res = attack(pipe, PROMPT, imgs, iterations=3, **kw)
    h = res.loss_history
    assert res.prefix_embeddings.shape == (5, 32) and len(h) == 3 and res.timesteps == [1, 1, 1]
    assert all(torch.isfinite(torch.tensor(h))) and h[0] == init.loss_history[0]
    assert h[2] < h[1] < h[0] and h[2] < h[0] - 1e-3
    assert (res.prefix_embeddings - init.prefix_embeddings).abs().amax() > 1e-3
    with torch.no_grad():  # the returned embeddings are those of the final prefix
        ids, start = prefixed_ids(pipe.tokenizer, PROMPT, 5)
        torch.testing.assert_close(res.adversarial_prompt_embeds, encode(pipe, ids, res.prefix_embeddings, start))
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags  # frozen only during the attack


def test_attack_grads_flow_through_patch_edit_and_timesteps_by_value(pipe, monkeypatch):
    imgs = _images()
    lat = to_latents(pipe, imgs)
    ids, start = prefixed_ids(pipe.tokenizer, PROMPT, 5)
    prefix = torch.randn(5, 32, generator=torch.Generator().manual_seed(4)) * 0.1
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([400])

    def grad():
        p = prefix.clone().requires_grad_(True)
        loss = denoising_loss(pipe, encode(pipe, ids, p, start), lat, t, noise)
        loss.backward()
        return loss.detach(), p.grad

    l0, g0 = grad()
    calls = []
    real = reference.edit_delta
    monkeypatch.setattr(reference, "edit_delta", lambda *a: calls.append(1) or real(*a))
    _patch(pipe)
    l1, g1 = grad()
    assert len(calls) == 2  # both hooked blocks took the differentiable path
    assert (l1 - l0).abs() > 1e-6 and torch.isfinite(g1).all() and g1.abs().amax() > 0
    assert not torch.allclose(g0, g1)  # the edit is in the graph

    seen = []
    ts = torch.tensor(TS)

    def spy(it, tv, loss):
        seen.append((int(get_patch(pipe).last_index.reshape(-1)[0]), int((ts - tv).abs().argmin())))

    res = attack(pipe, PROMPT, imgs, iterations=3, progress=False, callback=spy, seed=3)
    assert len(seen) == 3 and all(a == b for a, b in seen)
    assert len(set(res.timesteps)) == 3 and len(calls) == 2 + 3 * 2


def test_cond_only_patch_edits_every_attack_image(pipe):
    """The attack's batch has no CFG halves: with halves="cond" every image is edited, as with "both"."""
    lat = to_latents(pipe, _images())
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(6))
    emb, t = encode_prompts(pipe, PROMPT), torch.tensor([300])
    table, saes = _table_and_saes()
    with torch.no_grad():
        plain = denoising_loss(pipe, emb, lat, t, noise)
        losses = []
        for halves in ("both", "cond"):
            patch(pipe, "cat", saes=saes, table=table, halves=halves)
            losses.append(denoising_loss(pipe, emb, lat, t, noise))
    assert (losses[0] - plain).abs() > 1e-6
    torch.testing.assert_close(losses[1], losses[0])


def test_generate_adversarial_embeds_and_hook_paths_agree(pipe):
    res = attack(pipe, PROMPT, _images(1), iterations=1, progress=False)
    kw = dict(seeds=[1, 2], num_inference_steps=2, output_type="pt")
    a = torch.stack(generate_adversarial(pipe, res, **kw))
    b = torch.stack(generate_adversarial(pipe, res, use_prompt_embeds=False, **kw))
    with torch.no_grad():
        plain = pipe(prompt=[PROMPT] * 2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                     num_inference_steps=2, output_type="pt").images
    assert a.shape == (2, 3, 64, 64)
    torch.testing.assert_close(a, b)
    assert (a - plain).abs().amax() > 1e-4


def test_attack_eval_reports_ua_before_and_after(pipe):
    targets = [AttackTarget("cat", PROMPT, _images(1), 0),
               dict(name="dog", prompt="a dog", images=_images(1), target=1)]
    entered = []

    def unlearn(name):
        entered.append(name)
        return _patch(pipe)

    out = attack_eval(pipe, targets, lambda ims: torch.zeros(len(ims), dtype=torch.long), seeds=[1, 2], unlearn=unlearn,
                      attack_kwargs=dict(iterations=1), generate_kwargs=dict(num_inference_steps=1, output_type="pt"),
                      progress=False)
    assert entered == ["cat", "dog"] and get_patch(pipe) is None
    assert [r["ua_before"] for r in out["per_target"]] == [0.0, 1.0] and out["ua_after"] == 0.5


def test_minicanvas_pixel_space_v_prediction_without_prompt_embeds():
    """MiniCanvasPipeline (no VAE, v-prediction, no prompt_embeds): the UNet gets the attack's embeddings."""
    from saeuron.minicanvas.model import build_pipeline

    mc = build_pipeline("micro")
    mc.set_progress_bar_config(disable=True)
    prompt = "an image of a circle in checker style"
    res = attack(mc, prompt, _images(2)[:, :, :16, :16], iterations=2, progress=False)
    assert all(torch.isfinite(torch.tensor(res.loss_history)))
    seen = []
    h = mc.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    try:
        ims = generate_adversarial(mc, res, seeds=[1], num_inference_steps=1, output_type="pt")
    finally:
        h.remove()
    assert ims[0].shape == (3, 16, 16) and len(seen) == 1
    neg, cond = seen[0].chunk(2)  # [uncond, cond]
    torch.testing.assert_close(cond, res.adversarial_prompt_embeds)
    torch.testing.assert_close(neg, encode_prompts(mc, ""))


def test_prefix_starts_only_from_words_not_excluded():
    """On MiniCanvas's word-level vocabulary the random start avoids the concept words it is told to avoid."""
    from saeuron.minicanvas import data
    from saeuron.minicanvas.model import build_pipeline

    mc = build_pipeline("micro")
    tok, table = mc.tokenizer, mc.text_encoder.get_input_embeddings().weight.detach()
    words = list(data.OBJECTS + data.STYLES)
    banned = {i for w in words for i in tok(w, add_special_tokens=False).input_ids}
    banned |= {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    imgs, started = _images(1)[:, :, :16, :16], set()
    for seed in range(8):
        res = attack(mc, "an image of a circle", imgs, iterations=1, lr=0.0, seed=seed, init_exclude=words,
                     progress=False)  # lr 0: the prefix is still its start
        rows = torch.cdist(res.prefix_embeddings, table.float()).argmin(-1).tolist()
        torch.testing.assert_close(res.prefix_embeddings, table[rows].float())
        started |= set(rows)
    assert started and not started & banned and len(started) > 3
    free = attack(mc, "an image of a circle", imgs, iterations=1, lr=0.0, seed=0, progress=False)
    assert set(torch.cdist(free.prefix_embeddings, table.float()).argmin(-1).tolist()) & banned  # 20 of 31 words
    with pytest.raises(ValueError, match="does not know.*zebra"):
        attack(mc, "an image of a circle", imgs, iterations=1, init_exclude=["zebra"], progress=False)
    everything = [t for t in tok.get_vocab() if t not in tok.all_special_tokens]
    with pytest.raises(ValueError, match="leaves no token"):
        attack(mc, "an image of a circle", imgs, iterations=1, init_exclude=everything, progress=False)


def test_cli_attack_writes_images_and_json(tmp_path, pipe):
    import json

    from PIL import Image

    from saeuron.cli import main

    model, ckpt, targets = tmp_path / "model", tmp_path / "ckpt", tmp_path / "targets"
    pipe.save_pretrained(model)
    table, saes = _table_and_saes()
    table.save(ckpt)
    for hp, sae in saes.items():
        sae.save(ckpt / hp)
    targets.mkdir()
    for i, x in enumerate(((_images(2) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)):
        Image.fromarray(x.numpy()).save(targets / f"{i}.png")
    main(["attack", "--model", str(model), "--checkpoint", str(ckpt), "--concept", "cat", "--prompt", PROMPT,
          "--target-images", str(targets), "--out", str(tmp_path / "out"), "--iterations", "2", "--seeds", "1", "2",
          "--steps", "1", "--device", "cpu", "--placement", "suffix", "--init-exclude", "cat"])
    out = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert len(out["loss_history"]) == 2 and out["concept"] == ["cat"] and len(out["images"]) == 2
    assert out["placement"] == "suffix" and out["init_exclude"] == ["cat"]
    assert all((tmp_path / "out" / f"adversarial_seed{s}.png").is_file() for s in (1, 2))
    assert (tmp_path / "out" / "adversarial_prompt.safetensors").is_file()


# --------------------------------------------------------------------------- UCE

def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_uce_maps_erased_to_guide_preserves_others_and_restores(pipe):
    unet = pipe.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    W0 = {n: m.weight.detach().clone() for n, m in cross_attention_projections(unet).items()}
    c_e, c_g = encode_prompts(pipe, "cartoon")[0], encode_prompts(pipe, "")[0]
    a, b = c_e[1:], c_g[:-1]  # published pairing: the concept's last token onwards <-> the guide's BOS onwards
    keep = ["dog", "a photo of a tree"]
    c_p = encode_prompts(pipe, keep).flatten(0, 1)

    def measure():
        out = {}
        for n, m in cross_attention_projections(unet).items():
            W = m.weight.detach()
            out[n] = (_rel(a @ W0[n].T, b @ W0[n].T), _rel(a @ W.T, b @ W0[n].T), _rel(c_p @ W.T, c_p @ W0[n].T))
        return out

    res = uce_edit(pipe, ["cartoon"], guide="", preserve=keep)  # published scales: erase 1, preserve 0.1, lamb 0.1
    assert len(W0) == 8 and sorted(res.original) == sorted(f"{n}.weight" for n in W0)
    assert res.seconds > 0 and res.peak_memory_bytes > 0
    assert {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])} == set(res.original)
    kept = measure()
    res.restore()
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    free = uce_edit(pipe, ["cartoon"], guide="")  # nothing preserved
    loose = measure()
    free.restore()
    strict = uce_edit(pipe, ["cartoon"], guide="", preserve=keep, preserve_scale=10.0)
    tight = measure()
    strict.restore()
    for n, (gap, erased, moved) in kept.items():
        assert erased < 0.12 and erased < 0.3 * gap, (n, gap, erased)  # erased tokens now project like the guide's
        assert moved < 0.2 and moved < 0.35 * loose[n][2], (n, moved, loose[n][2])  # preserved ones barely move
        assert tight[n][2] < 0.03 and erased < tight[n][1] < 0.75 * gap  # a larger preserve scale trades erasure for it
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())


def test_uce_solves_its_normal_equations(pipe):
    """The closed form is the minimiser: the objective's gradient vanishes there (positions="all")."""
    c_e, c_g = (encode_prompts(pipe, t)[0].double() for t in ("cartoon sketch", "photo"))
    c_p = encode_prompts(pipe, ["dog"]).flatten(0, 1).double()
    W0 = {n: m.weight.detach().double().clone() for n, m in cross_attention_projections(pipe.unet).items()}
    res = uce_edit(pipe, "cartoon sketch", guide="photo", preserve=["dog"], positions="all", preserve_scale=0.3,
                   lamb=0.2)
    for n, m in cross_attention_projections(pipe.unet).items():
        def J(W):
            return ((c_e @ W.T - c_g @ W0[n].T) ** 2).sum() + 0.3 * ((c_p @ (W - W0[n]).T) ** 2).sum() \
                + 0.2 * ((W - W0[n]) ** 2).sum()
        W = m.weight.detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(J(W), W)
        W0r = W0[n].clone().requires_grad_(True)
        (g0,) = torch.autograd.grad(J(W0r), W0r)
        assert g.norm() < 1e-4 * g0.norm()
    res.restore()
    with pytest.raises(ValueError, match="positions"):
        uce_edit(pipe, "cat", positions="middle")


# --------------------------------------------------------------------------- ESD

def test_esd_x_trains_only_cross_attention_and_restores(pipe):
    unet = pipe.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    res = esd_train(pipe, "cartoon", iterations=2, ddim_steps=2, lr=1e-3, progress=False)
    assert len(res.loss_history) == 2 and all(torch.isfinite(torch.tensor(res.loss_history)))
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("attn2." in n for n in changed) and changed <= set(res.original)
    assert set(res.original) == set(esd_parameters(unet, "xattn")) and res.method == "esd-x"
    assert res.peak_memory_bytes > 0 and res.seconds > 0
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    res.restore()
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())


def test_esd_prompt_list_is_used_in_turn(pipe):
    """A list of prompts: iteration i trains on prompt i mod n (one prompt repeated = that prompt alone)."""
    unet = pipe.unet

    def trained(concept, iterations):
        res = esd_train(pipe, concept, iterations=iterations, ddim_steps=2, lr=1e-3, progress=False, seed=3)
        params = dict(unet.named_parameters())
        after = {n: params[n].detach().clone() for n in res.original}
        res.restore()
        return after, res

    one, res = trained("cartoon", 2)
    same, res_list = trained(["cartoon", "cartoon"], 2)
    assert all(torch.equal(one[n], same[n]) for n in one)
    assert res.config["concept"] == "cartoon" and res_list.config["concept"] == ["cartoon", "cartoon"]
    first_only, _ = trained(["cartoon", "photo of a dog"], 1)  # iteration 0 uses the first prompt
    assert all(torch.equal(first_only[n], trained("cartoon", 1)[0][n]) for n in first_only)
    mixed, _ = trained(["cartoon", "photo of a dog"], 2)  # iteration 1 the second
    assert any(not torch.equal(mixed[n], one[n]) for n in one)
    for bad in ([], [""], ["cartoon", 3]):
        with pytest.raises(ValueError, match="concept must be"):
            esd_train(pipe, bad, iterations=1, progress=False)
    with pytest.raises(ValueError, match="lr must be > 0"):
        esd_train(pipe, "cartoon", lr=0.0, iterations=1, progress=False)


def test_esd_u_with_noised_images_leaves_cross_attention_alone(pipe):
    unet = pipe.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    res = esd_train(pipe, "cartoon", method="esd-u", iterations=2, lr=1e-3, xt="noise", images=_images(1),
                    progress=False)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any("attn2." in n or n.startswith("conv_out.") or "time_embedding" in n for n in changed)
    res.restore()
    assert not res.changed()
    with pytest.raises(ValueError, match="method"):
        esd_train(pipe, "cartoon", method="lora")
    with pytest.raises(ValueError, match="images"):
        esd_train(pipe, "cartoon", xt="noise")
