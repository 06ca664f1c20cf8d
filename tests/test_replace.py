"""Detect-then-replace edit modes (saeuron.replace): detection equals the method's firing rule on random inputs of
several shapes and dtypes, the fills are exact, untouched tokens stay bit for bit, and the modes work in a pipeline
(UNet and DiT), with gradients, and refuse what they cannot do."""
import pytest
import torch

from conftest import make_sae, sae_weights
from saeuron import reference, replace
from saeuron.cli.common import EDIT_MODES
from saeuron.concepts import ConceptTable
from saeuron.patching import patched

UP = "up_blocks.1.attentions.1"  # 32 channels in the tiny pipeline
TS = [667.0, 334.0, 1.0]


def _tables(W, x_tok, g, groups, f, k, frac):
    """Random selected features and thresholds that some tokens pass and others do not (quantiles of real codes)."""
    m = W[0].shape[0]
    fi = torch.stack([torch.randperm(m, generator=g)[:f] for _ in range(groups)])
    pre = reference.preacts(x_tok, *W[:3])
    vals = pre.gather(1, fi[torch.zeros(len(x_tok), dtype=torch.long)]).flatten()
    t = torch.quantile(vals[vals > 0].float(), frac) if (vals > 0).any() else torch.tensor(0.1)
    tau = torch.full((groups, f), float(t)) * (0.5 + torch.rand(groups, f, generator=g))
    tau[:, -1] = float("inf")  # a padding entry
    return fi, tau


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape,groups,m,k", [((2, 16, 4, 4), 1, 64, 4), ((3, 32, 5, 3), 3, 96, 8),
                                              ((37, 24), 1, 48, 3), ((64, 16), 2, 200, 16)])
def test_detect_equals_the_methods_firing_rule(dtype, shape, groups, m, k):
    g = torch.Generator().manual_seed(hash((shape, m, str(dtype))) % 2**31)
    d = shape[1]
    W = sae_weights(m, d, dtype, seed=int(torch.randint(0, 1000, (1,), generator=g)))
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    tok = reference.as_tokens(x)
    fi, tau = _tables(W, tok.float(), g, groups, 6, k, 0.6)
    zero = replace.detection_scale(tau)
    assert torch.equal(zero[:, -1], torch.ones(groups)) and (zero[:, :-1] == 0).all()
    rpg = max(len(tok) // groups, 1)
    hit = replace.detect(x, W, k, fi, tau, zero, rpg)
    want = (reference.edit_delta(tok, *W, k, fi, tau, zero, rpg) != 0).any(-1)
    assert hit.shape == ((shape[0], shape[2], shape[3]) if x.dim() == 4 else (shape[0],))
    assert torch.equal(hit.flatten(), want), (hit.flatten() ^ want).sum()
    assert 0 < int(want.sum()) < len(tok)  # the case is not trivial


def test_detect_on_standardised_tokens():
    sae = make_sae(16, 64, 4, seed=3)
    sae.cfg.input_unit_norm = True
    x = torch.randn(40, 16) * 3 + 1
    g = torch.Generator().manual_seed(1)
    xn = sae.preprocess(x)[0]
    W = (sae.encoder.weight.data, sae.encoder.bias.data, sae.b_dec.data, sae.W_dec.data)
    fi, tau = _tables(W, xn, g, 1, 5, 4, 0.5)
    zero = replace.detection_scale(tau)
    hit = replace.detect(x, W, 4, fi, tau, zero, 40, sae.preprocess)
    assert torch.equal(hit, (reference.edit_delta(xn, *W, 4, fi, tau, zero, 40) != 0).any(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_background_fill_is_the_mean_of_the_images_other_tokens(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 5, generator=g).to(dtype)
    hit = torch.rand(3, 4, 5, generator=g) > 0.6
    hit[2] = True  # an image with nothing left to take from stays as it is
    y = replace.background_fill(x, hit)
    for b in range(2):
        keep = ~hit[b]
        mean = x[b].float()[:, keep].mean(1).to(dtype)
        torch.testing.assert_close(y[b][:, hit[b]], mean[:, None].expand(-1, int(hit[b].sum())))
        assert torch.equal(y[b][:, keep], x[b][:, keep])  # bit for bit
    assert torch.equal(y[2], x[2])
    # DiT tokens [B, L, C] give the same as the map read as tokens
    tok = x.permute(0, 2, 3, 1).reshape(3, 20, 8)
    assert torch.equal(replace.background_fill(tok, hit.reshape(3, 20)), y.permute(0, 2, 3, 1).reshape(3, 20, 8))


def test_uncond_fill():
    x = torch.randn(2, 6, 3, 3)
    hit = torch.zeros(1, 3, 3, dtype=torch.bool)
    hit[0, 1, 2] = True
    y = replace.uncond_fill(x[1:], x[:1], hit)
    assert torch.equal(y[0][:, 1, 2], x[0][:, 1, 2]) and torch.equal(y[0][:, ~hit[0]], x[1][:, ~hit[0]])


pytestmark = pytest.mark.usefixtures("unpatched_after")  # the module pipe of conftest, unpatched after each test


def _table(fires=True):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, len(TS), 128, generator=g) * 1e-3
    if not fires:
        x[0, :, :32] = 1e6
    return ConceptTable(["cat", "dog"], [3, 4], TS, {UP: x}, defaults={"top_n": 24, "multiplier": -1.0})


def _block_outputs(pipe, handle_kw, x, t, ehs):
    """The hooked block's output without and with the patch (a forward hook registered after the patch sees the
    edited output), and the patch's table rows of that call."""
    block = pipe.unet.get_submodule(UP)
    seen = []
    h = block.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
    try:
        with torch.no_grad():
            pipe.unet(x, t, ehs)
        h.remove()
        with patched(pipe.unet, "cat", **handle_kw) as handle:
            h = block.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o.sample))
            with torch.no_grad():
                pipe.unet(x, t, ehs)
            rows = handle.state.rows[(UP, handle.replace_mode or "scale")]
            sae = handle.saes[UP]
    finally:
        h.remove()
    return seen[0].clone(), seen[1].clone(), rows, sae


def _inputs(b=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 32, generator=g)


@pytest.mark.parametrize("mode", ["replace_uncond", "replace_background"])
def test_replace_modes_in_the_unet(pipe, mode):
    saes, x, ehs = {UP: make_sae(32, 128, 4, seed=1)}, *_inputs(4)
    before, after, (fi, ta, sc), sae = _block_outputs(pipe, dict(saes=saes, table=_table(), mode=mode), x, TS[1], ehs)
    assert (sc[torch.isfinite(ta)] == 0).all()  # the tables detect; no multiplier
    W = sae.weights_for(before.device, before.dtype)
    lo = 2 if mode == "replace_uncond" else 0
    hit = replace.detect(before[lo:], W, sae.cfg.k, fi, ta, sc, before[lo:, 0].numel())
    assert 0 < int(hit.sum()) < hit.numel()
    untouched = ~hit.unsqueeze(1).expand_as(before[lo:])
    assert torch.equal(after[lo:][untouched], before[lo:][untouched])  # bit for bit
    if mode == "replace_uncond":
        assert torch.equal(after[:2], before[:2])  # the unconditional half is the source, never edited
        assert torch.equal(after[2:], replace.uncond_fill(before[2:], before[:2], hit))
    else:
        assert torch.equal(after, replace.background_fill(before, hit))


@pytest.mark.parametrize("mode", ["replace_uncond", "replace_background"])
def test_replace_modes_in_a_pipeline(pipe, mode):
    saes = {UP: make_sae(32, 128, 4, seed=1)}

    def run(**kw):
        return pipe("a cat", num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kw).images
    base = run()
    with patched(pipe, "cat", saes=saes, table=_table(fires=False), mode=mode):
        assert torch.equal(run(), base)  # nothing fires: identity
    with patched(pipe, "cat", saes=saes, table=_table(), mode=mode) as h:
        assert h.mode == mode and f"mode={mode!r}" in repr(h)
        edited = run()
    assert (edited - base).abs().max() > 1e-4
    assert torch.equal(run(), base)  # unpatch restores exactly


def test_replace_is_differentiable(pipe):
    saes, (x, ehs) = {UP: make_sae(32, 128, 4, seed=1)}, _inputs(2)
    with patched(pipe.unet, "cat", saes=saes, table=_table(), mode="replace_background"):
        with torch.no_grad():
            want = pipe.unet(x, TS[1], ehs).sample
        e = ehs.clone().requires_grad_()
        got = pipe.unet(x, TS[1], e).sample
        got.square().sum().backward()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


def test_replace_modes_on_a_dit():
    from tiny_dit import FAMILIES

    build, kw = FAMILIES["pixart"]
    dit = build()
    hp = "transformer_blocks.0"
    ts = [float(t) for t in (999, 500, 1)]
    g = torch.Generator().manual_seed(0)
    table = ConceptTable(["cat", "dog"], [2, 2], ts, {hp: torch.rand(2, 3, 96, generator=g) * 1e-3},
                         defaults={"top_n": 24, "multiplier": -1.0})
    saes = {hp: make_sae(24, 96, 4, seed=1)}

    def run():
        with torch.no_grad():
            return dit("a cat", num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                       generator=torch.Generator().manual_seed(0), **kw).images
    base = run()
    for mode in ("replace_uncond", "replace_background"):
        with patched(dit, "cat", saes=saes, table=table, mode=mode, hookpoints=[hp]):
            assert (run() - base).abs().max() > 1e-5
    assert torch.equal(run(), base)


def test_replace_refuses_what_it_cannot_do(pipe):
    saes = {UP: make_sae(32, 128, 4, seed=1)}
    with pytest.raises(ValueError, match="mode='sideways'; valid: scale, replace_uncond, replace_background"):
        patched(pipe, "cat", saes=saes, table=_table(), mode="sideways").__enter__()
    with pytest.raises(ValueError, match="halves='uncond' is not possible"):
        patched(pipe, "cat", saes=saes, table=_table(), mode="replace_uncond", halves="uncond").__enter__()
    with pytest.raises(ValueError, match="error_term='reference' belongs to the scale edit"):
        patched(pipe, "cat", saes=saes, table=_table(), mode="replace_background", error_term="reference").__enter__()
    # without classifier-free guidance there is no unconditional branch to take tokens from, even for 2 prompts
    with patched(pipe, "cat", saes=saes, table=_table(), mode="replace_uncond"):
        with pytest.raises(ValueError, match="needs a classifier-free guidance batch"):
            pipe(["a cat", "a dog"], num_inference_steps=2, guidance_scale=1.0, output_type="latent")


def test_command_line_modes_are_the_librarys():
    assert EDIT_MODES == replace.MODES
    from saeuron.cli import build_parser

    a = build_parser().parse_args(["minicanvas", "eval", "--out", "x", "--mode", "replace_uncond"])
    from saeuron.cli.common import patch_kwargs
    assert patch_kwargs(a) == {"mode": "replace_uncond"}


MID = "mid_block.attentions.0"  # 64 channels; runs before UP in the UNet's forward


def _table_two(up_fires=True):
    """cat's features at MID fire; at UP they fire or (``up_fires=False``) never do."""
    g = torch.Generator().manual_seed(0)
    up = torch.rand(2, len(TS), 128, generator=g) * 1e-3
    if not up_fires:
        up[0, :, :32] = 1e6
    mid = torch.rand(2, len(TS), 96, generator=g) * 1e-3
    return ConceptTable(["cat", "dog"], [3, 4], TS, {UP: up, MID: mid}, defaults={"top_n": 24, "multiplier": -1.0})


def test_gate_flags_images_at_the_first_block_and_replaces_whole_maps_at_every_block(pipe):
    saes = {UP: make_sae(32, 128, 4, seed=1), MID: make_sae(64, 96, 4, seed=2)}
    x, ehs = _inputs(4)
    mid_blk, up_blk = pipe.unet.get_submodule(MID), pipe.unet.get_submodule(UP)

    def outputs(**kw):
        seen = {}
        hs = [blk.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (o[0] if isinstance(o, tuple)
                                                                                    else o.sample).clone()))
              for n, blk in (("mid", mid_blk), ("up", up_blk))]
        try:
            with torch.no_grad():
                if kw:
                    with patched(pipe.unet, "cat", saes=saes, **kw) as h:
                        pipe.unet(x, TS[1], ehs)
                        rows, flag = h.state.rows, h.state.flag
                else:
                    pipe.unet(x, TS[1], ehs)
                    rows = flag = None
        finally:
            for hh in hs:
                hh.remove()
        return seen, rows, flag

    plain, _, _ = outputs()
    # at UP the cat features never fire: whatever UP does here was decided at MID
    got, rows, flag = outputs(table=_table_two(up_fires=False), mode="gate_uncond", gate=0.3,
                              hookpoints=[MID, UP])
    fi, ta, sc = rows[(MID, "gate_uncond")]
    sae = saes[MID]
    hit = replace.detect(plain["mid"][2:], sae.weights_for(x.device, x.dtype), sae.cfg.k, fi, ta, sc,
                         plain["mid"][0, 0].numel() * 2)
    assert torch.equal(flag, replace.flagged(hit, 0.3)) and torch.equal(flag, hit.flatten(1).float().mean(1) >= 0.3)
    assert flag.any(), hit.flatten(1).float().mean(1)  # the case is not vacuous
    assert torch.equal(got["mid"][:2], plain["mid"][:2])  # the unconditional half is never edited
    for i in range(2):
        want = plain["mid"][i] if flag[i] else plain["mid"][2 + i]
        assert torch.equal(got["mid"][2 + i], want)
    # UP sees MID's effect downstream; a flagged image's UP output is that call's unconditional UP output
    for i in range(2):
        if flag[i]:
            assert torch.equal(got["up"][2 + i], got["up"][i])
    # with a gate no image reaches, nothing changes anywhere
    none, _, flag1 = outputs(table=_table_two(), mode="gate_uncond", gate=1.0, hookpoints=[MID, UP])
    if not flag1.any():
        assert torch.equal(none["up"], plain["up"]) and torch.equal(none["mid"], plain["mid"])


def test_gate_in_a_pipeline_and_its_errors(pipe):
    saes = {UP: make_sae(32, 128, 4, seed=1)}

    def run():
        return pipe("a cat", num_inference_steps=3, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images
    base = run()
    with patched(pipe, "cat", saes=saes, table=_table(), mode="gate_uncond", gate=0.05) as h:
        assert "gate=0.05" in repr(h)
        edited = run()
    assert (edited - base).abs().max() > 1e-4 and torch.equal(run(), base)
    with patched(pipe, "cat", saes=saes, table=_table(fires=False), mode="gate_uncond", gate=0.05):
        assert torch.equal(run(), base)
    for bad in (0, 1.5, -0.1, True, "half", None):
        with pytest.raises(ValueError, match="needs the share of an image's tokens"):
            patched(pipe, "cat", saes=saes, table=_table(), mode="gate_uncond", gate=bad).__enter__()
    with pytest.raises(ValueError, match="gate=0.5 belongs to mode='gate_uncond'"):
        patched(pipe, "cat", saes=saes, table=_table(), mode="replace_uncond", gate=0.5).__enter__()
    with patched(pipe, "cat", saes=saes, table=_table(), mode="gate_uncond", gate=0.5):
        with pytest.raises(ValueError, match="mode='gate_uncond' at .* needs a classifier-free guidance batch"):
            pipe(["a cat", "a dog"], num_inference_steps=2, guidance_scale=1.0, output_type="latent")


def test_gate_on_the_command_line():
    from saeuron.cli import build_parser
    from saeuron.cli.common import patch_kwargs

    a = build_parser().parse_args(["minicanvas", "eval", "--out", "x", "--mode", "gate_uncond", "--gate", "0.4",
                                   "--hookpoints", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"])
    assert patch_kwargs(a) == {"mode": "gate_uncond", "gate": 0.4,
                               "hookpoints": ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]}
    a = build_parser().parse_args(["generate", "--concept", "cat", "--out", "x", "--hookpoints", "mid_block.attentions.0"])
    assert patch_kwargs(a) == {"hookpoints": ["mid_block.attentions.0"]}
