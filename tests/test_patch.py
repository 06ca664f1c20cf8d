"""patch / unpatch / patched on the tiny pipeline: exactness, timestep lookup, schedulers, bad input."""
import pytest
import torch

from conftest import make_sae
from saeuron import list_hookpoints, reference
from saeuron.concepts import ConceptTable
from saeuron.patching import EDIT_HOOK, TIMESTEP_HOOK, get_patch, patch, patched, unpatch
from saeuron.reference import reference_compat_edit

UP, MID = "up_blocks.1.attentions.1", "mid_block.attentions.0"  # 32 and 64 channels
TS = [667.0, 334.0, 1.0]  # the tiny pipeline's DDIM timesteps at 3 steps


pytestmark = pytest.mark.usefixtures("unpatched_after")  # the module pipe of conftest, unpatched after each test


def _saes():
    return {UP: make_sae(32, 128, 4, seed=1), MID: make_sae(64, 96, 4, seed=2)}


def _table(fires=True, seed=0):
    """cat vs dog statistics; ``fires=False`` puts the thresholds far above any activation."""
    g = torch.Generator().manual_seed(seed)
    mu = {}
    for hp, m in ((UP, 128), (MID, 96)):
        x = torch.rand(2, len(TS), m, generator=g) * 1e-3
        if not fires:
            x[0, :, : m // 4] = 1e6  # cat's features: tau = 5e5, never exceeded
        mu[hp] = x
    return ConceptTable(["cat", "dog"], [3, 4], TS, mu, defaults={"top_n": 24, "multiplier": -1.0})


def _run(pipe, steps=3, guidance=7.5, prompt="a cat"):
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.images


def _unet_inputs(b=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 32, generator=g)


def _hooks(unet, prefix="saeuron"):
    """``(module name, hook name)`` of the diffusers hooks under ``unet`` whose name starts with ``prefix``."""
    from diffusers.hooks import HookRegistry

    found = []
    for name, m in unet.named_modules():
        if hasattr(m, "_diffusers_hook"):
            found += [(name, h) for h in HookRegistry.check_if_exists_or_initialize(m).hooks if h.startswith(prefix)]
    return sorted(found, key=lambda p: (p[0] != "", p[1] != TIMESTEP_HOOK, p[0] != UP, p))


def test_hookpoint_widths_match_the_test_saes(pipe):
    hps = list_hookpoints(pipe)
    assert hps[UP] == 32 and hps[MID] == 64


def test_no_firing_feature_is_identity(pipe):
    base = _run(pipe)
    h = patch(pipe, "cat", saes=_saes(), table=_table(fires=False))
    assert h.table(UP)[0].shape[1] > 0  # features are selected, they just never fire
    assert torch.equal(_run(pipe), base)  # README: bit for bit


def test_ablation_changes_output_and_unpatch_restores_exactly(pipe):
    base = _run(pipe)
    keys = list(pipe.unet.state_dict())
    patch(pipe, ["cat"], saes=_saes(), table=_table())
    assert list(pipe.unet.state_dict()) == keys  # the SAEs are not UNet submodules
    assert not any("encoder" in n.split(".")[-2:-1] for n, _ in pipe.unet.named_parameters())
    edited = _run(pipe)
    assert (edited - base).abs().max() > 1e-3
    assert unpatch(pipe) is True and get_patch(pipe) is None and _hooks(pipe.unet) == []
    assert torch.equal(_run(pipe), base)
    assert unpatch(pipe) is False


def test_double_patch_equals_single_and_context_manager(pipe):
    saes, table = _saes(), _table()
    patch(pipe, "cat", saes=saes, table=table)
    once = _run(pipe)
    patch(pipe, "dog", saes=saes, table=table, hookpoints=[MID])
    patch(pipe, "cat", saes=saes, table=table)
    assert torch.equal(_run(pipe), once)
    assert _hooks(pipe.unet) == [("", TIMESTEP_HOOK), (UP, EDIT_HOOK), (MID, EDIT_HOOK)]  # one set, named
    assert not pipe.unet._forward_pre_hooks and not pipe.unet.get_submodule(UP)._forward_hooks  # no raw hooks
    outer = get_patch(pipe)
    with patched(pipe, "dog", saes=saes, table=table) as h:
        assert get_patch(pipe) is h and not torch.equal(_run(pipe), once)
    assert get_patch(pipe) is outer and torch.equal(_run(pipe), once)  # the previous patch is back
    unpatch(pipe)
    base = _run(pipe)
    with patch(pipe, "cat", saes=saes, table=table):
        pass
    assert get_patch(pipe) is None and torch.equal(_run(pipe), base)


def test_checkpoint_folder_equals_loaded_objects(pipe, tmp_path):
    saes, table = _saes(), _table()
    saes[UP].save(tmp_path / f"unet.{UP}")  # published layout
    saes[MID].save(tmp_path / MID)
    table.save(tmp_path)
    patch(pipe, "cat", saes=saes, table=table)
    want = _run(pipe)
    h = patch(pipe, "cat", tmp_path)
    assert sorted(h.hookpoints) == sorted([UP, MID])
    assert torch.equal(_run(pipe), want)
    patch(pipe, "cat", tmp_path, hookpoints=[f"unet.{UP}"])
    assert not torch.equal(_run(pipe), want)


def test_each_concept_is_edited_at_its_own_hookpoints(pipe, tmp_path):
    saes, table = _saes(), _table()
    table.defaults["cat"]["hookpoints"] = [UP]
    table.defaults["dog"]["hookpoints"] = [f"unet.{MID}"]
    table = ConceptTable(table.names, table.counts, TS, table.mu, table.defaults)  # validated and normalised
    assert table.concept_hookpoints("cat") == [UP] and table.concept_hookpoints("dog") == [MID]
    h = patch(pipe, "cat", saes=saes, table=table)
    assert h.hookpoints == [UP]  # no hook at all where no concept is edited
    cat = _run(pipe)
    patch(pipe, "cat", saes=saes, table=table, hookpoints=[UP])
    assert torch.equal(_run(pipe), cat)  # the default is exactly the explicit choice
    h = patch(pipe, ["cat", "dog"], saes=saes, table=table)
    assert sorted(h.hookpoints) == sorted([UP, MID])
    up_only = patch(pipe, "cat", saes=saes, table=table, hookpoints=[UP]).table(UP)
    assert all(torch.equal(a, b) for a, b in zip(h.table(UP), up_only))  # dog adds nothing at UP
    both = patch(pipe, "cat", saes=saes, table=table, hookpoints=[UP, MID])  # explicit beats the defaults
    assert sorted(both.hookpoints) == sorted([UP, MID])
    with pytest.raises(ValueError, match="no SAE for the hookpoints of \\['dog'\\]"):
        patch(pipe, ["cat", "dog"], saes={UP: saes[UP]}, table=table)
    with pytest.raises(ValueError, match="unknown hookpoint in the defaults of 'cat'.*did you mean"):
        ConceptTable(table.names, table.counts, TS, table.mu, {"cat": {"hookpoints": ["up_blocks.1.attentions.2"]}})
    with pytest.raises(ValueError, match="unknown keys \\['hookpoint'\\]"):
        ConceptTable(table.names, table.counts, TS, table.mu, {"cat": {"hookpoint": UP}})
    table.save(tmp_path)
    assert ConceptTable.load(tmp_path).defaults == table.defaults


def test_threshold_factor_on_tau(pipe):
    saes, table = _saes(), _table()
    base = _run(pipe)
    h = patch(pipe, "cat", saes=saes, table=table)
    edited = _run(pipe)
    assert (edited - base).abs().max() > 1e-3
    patch(pipe, "cat", saes=saes, table=table, threshold=1.0)
    assert torch.equal(_run(pipe), edited)  # factor 1 is the method's tau exactly
    h3 = patch(pipe, "cat", saes=saes, table=table, threshold={"cat": 3.0})
    finite = torch.isfinite(h.table(UP)[1])
    torch.testing.assert_close(h3.table(UP)[1][finite], h.table(UP)[1][finite] * 3.0)
    assert torch.equal(h3.table(UP)[0], h.table(UP)[0]) and torch.equal(h3.table(UP)[2], h.table(UP)[2])
    patch(pipe, "cat", saes=saes, table=table, threshold=1e12)  # above any activation: nothing is edited
    assert torch.equal(_run(pipe), base)
    table.defaults["cat"]["threshold"] = 1e12  # the concept file's default is used when not given ...
    patch(pipe, "cat", saes=saes, table=table)
    assert torch.equal(_run(pipe), base)
    patch(pipe, "cat", saes=saes, table=table, threshold=1)  # ... and an explicit value beats it
    assert torch.equal(_run(pipe), edited)
    with pytest.raises(ValueError, match="threshold in the edit of 'cat' must be a finite number > 0"):
        patch(pipe, "cat", saes=saes, table=table, threshold=-2)


def test_no_cfg_and_other_schedulers(pipe):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    saes, table = _saes(), _table()
    orig = pipe.scheduler
    try:
        for sched in (None, EulerDiscreteScheduler, PNDMScheduler):
            if sched is not None:
                pipe.scheduler = sched.from_config(orig.config, skip_prk_steps=True)
            for guidance in (7.5, 1.0):
                base = _run(pipe, steps=3, guidance=guidance)
                with patched(pipe, "cat", saes=saes, table=table):
                    edited = _run(pipe, steps=3, guidance=guidance)
                assert torch.isfinite(edited).all() and (edited - base).abs().max() > 1e-3
                assert torch.equal(_run(pipe, steps=3, guidance=guidance), base)
    finally:
        pipe.scheduler = orig


def test_timestep_lookup_by_value(pipe):
    from diffusers import PNDMScheduler

    h = patch(pipe, "cat", saes=_saes(), table=_table())
    seen, rows = [], []

    def spy(module, args, kwargs, out):
        seen.append(h.last_index.tolist())
        rows.append(h.state.rows[(UP, "scale")][0].clone())

    s = pipe.unet.register_forward_hook(spy, with_kwargs=True)
    try:
        _run(pipe, steps=5)  # DDIM 5 steps: 801, 601, 401, 201, 1 against recorded 667, 334, 1
        assert seen == [[0], [0], [1], [1], [2]]
        for i, r in zip([0, 0, 1, 1, 2], rows):
            assert torch.equal(r, h.table(UP)[0][i : i + 1])
        seen.clear()
        orig = pipe.scheduler
        pipe.scheduler = PNDMScheduler.from_config(orig.config, skip_prk_steps=True)
        try:
            _run(pipe, steps=3)  # PNDM repeats a timestep: same value, same row
            ts = pipe.scheduler.timesteps.tolist()
        finally:
            pipe.scheduler = orig
        want = [[min(range(3), key=lambda j: abs(TS[j] - t))] for t in ts]
        assert seen == want and len(ts) > len(set(ts))
    finally:
        s.remove()


def test_per_sample_timesteps_and_halves(pipe):
    saes, table = _saes(), _table()
    x, ehs = _unet_inputs(2)
    with torch.no_grad():
        plain = pipe.unet(x, torch.tensor(TS[0]), ehs).sample
        with patched(pipe.unet, "cat", saes=saes, table=table) as h:
            both = pipe.unet(x, torch.tensor([TS[0], TS[2]]), ehs).sample
            assert h.last_index.tolist() == [0, 2]
            one = [pipe.unet(x[i : i + 1], t, ehs[i : i + 1]).sample for i, t in ((0, TS[0]), (1, int(TS[2])))]
        torch.testing.assert_close(both, torch.cat(one), rtol=1e-5, atol=1e-5)
        assert (both[0] - plain[0]).abs().max() > 1e-3
        # halves on a bare UNet: an even batch is [uncond, cond]
        with patched(pipe.unet, "cat", saes=saes, table=table, halves="uncond"):
            unc = pipe.unet(x, TS[0], ehs).sample
        with patched(pipe.unet, "cat", saes=saes, table=table, halves="cond"):
            cond = pipe.unet(x, TS[0], ehs).sample
    assert torch.equal(unc[1], plain[1]) and (unc[0] - plain[0]).abs().max() > 1e-3
    assert torch.equal(cond[0], plain[0]) and (cond[1] - plain[1]).abs().max() > 1e-3
    # a pipeline without CFG has no unconditional half
    base = _run(pipe, guidance=1.0)
    with patched(pipe, "cat", saes=saes, table=table, halves="uncond"):
        assert torch.equal(_run(pipe, guidance=1.0), base)
    with patched(pipe, "cat", saes=saes, table=table, halves="cond"):
        assert (_run(pipe, guidance=1.0) - base).abs().max() > 1e-3


def test_grad_path_matches_inplace_and_is_differentiable(pipe):
    saes, table = _saes(), _table()
    x, ehs = _unet_inputs(2)
    with patched(pipe.unet, "cat", saes=saes, table=table):
        with torch.no_grad():
            want = pipe.unet(x, TS[1], ehs).sample
        e = ehs.clone().requires_grad_()
        got = pipe.unet(x, TS[1], e).sample
        got.square().sum().backward()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


def test_reference_error_term():
    sae = make_sae(32, 128, 4, seed=5)
    W = sae.weights_for("cpu", torch.float32)
    x = torch.randn(2, 32, 3, 5)
    fi, tau = torch.tensor([[1, 7, 9]]), torch.tensor([[0.0, 0.0, float("inf")]])
    sc = torch.tensor([[-2.0, 0.5, 1.0]])
    got = reference_compat_edit(x, *W, 4, fi, tau, sc, 30)
    xt = reference.as_tokens(x)
    vals, idx = sae.encode(xt)
    f = torch.zeros(30, 128).scatter_(1, idx, vals)
    f2 = f.clone()
    for j, s in ((1, -2.0), (7, 0.5)):
        f2[:, j] = torch.where(f[:, j] > 0, s * f[:, j], f[:, j])
    dec = lambda ff: ff @ sae.W_dec.detach() + sae.b_dec.detach()
    want = dec(f2) + dec(f) - xt
    torch.testing.assert_close(reference.as_tokens(got), want, rtol=1e-5, atol=1e-5)
    # versus the method: out = x + decode(f') - decode(f); the difference is 2 x (decode(f) - x) on every token
    correct = xt + dec(f2) - dec(f)
    torch.testing.assert_close(reference.as_tokens(got) - correct, 2 * (dec(f) - xt), rtol=1e-4, atol=1e-4)


def test_reference_error_term_in_pipeline(pipe):
    saes, table = _saes(), _table(fires=False)
    base = _run(pipe)
    with patched(pipe, "cat", saes=saes, table=table, error_term="reference"):
        ref = _run(pipe)  # nothing fires, yet every token moves by twice its reconstruction error
    assert torch.isfinite(ref).all() and (ref - base).abs().max() > 1e-3


def test_nan_activations_stay_in_their_token(pipe):
    """A NaN token in a hooked block's output stays NaN and changes no other token's edit (bit for bit)."""
    from diffusers.hooks import HookRegistry, ModelHook

    x, ehs = _unet_inputs(2)
    block = pipe.unet.get_submodule(UP)
    registry = HookRegistry.check_if_exists_or_initialize(block)
    seen = {}

    class Poison(ModelHook):  # registered before the patch, so it runs inside the edit: the edit sees the NaN
        def post_forward(self, module, output):
            (output[0] if isinstance(output, tuple) else output.sample)[1, :, 2, 3] = float("nan")
            return output

    def capture(key):
        return block.register_forward_hook(lambda m, a, out: seen.__setitem__(
            key, (out[0] if isinstance(out, tuple) else out.sample if hasattr(out, "sample") else out).clone()))

    def run(poison):
        if poison:
            registry.register_hook(Poison(), "test_poison")
        try:
            with patched(pipe.unet, "cat", saes=_saes(), table=_table()), torch.no_grad():
                assert list(registry.hooks) == ["test_poison", EDIT_HOOK] if poison else [EDIT_HOOK]
                last = capture(poison)  # torch forward hooks run after the edit
                try:
                    pipe.unet(x, TS[0], ehs)
                finally:
                    last.remove()
        finally:
            registry.remove_hook("test_poison", recurse=False)
        return seen[poison]

    clean, poisoned = run(False), run(True)
    cap = capture("base")
    with torch.no_grad():
        pipe.unet(x, TS[0], ehs)
    cap.remove()
    assert (clean - seen["base"]).abs().max() > 0  # the edit acted at this block
    nan = torch.zeros_like(clean, dtype=torch.bool)
    nan[1, :, 2, 3] = True
    assert torch.isnan(poisoned[nan]).all()
    assert not torch.isnan(poisoned[~nan]).any()
    assert torch.equal(poisoned[~nan], clean[~nan])


def test_bad_input(pipe, tmp_path):
    saes, table = _saes(), _table()
    with pytest.raises(ValueError, match=r"(?s)unknown concept 'cta'.*cat, dog"):
        patch(pipe, "cta", saes=saes, table=table)
    with pytest.raises(ValueError, match=r"(?s)unknown hookpoint 'up_blocks.9'.*down_blocks.0.attentions.0 \(32 ch\)"):
        patch(pipe, "cat", saes=saes, table=table, hookpoints=["up_blocks.9"])
    wrong = {UP: make_sae(64, 128, 4), MID: saes[MID]}
    with pytest.raises(ValueError, match=r"d_in=64.*up_blocks.1.attentions.1.*32 channels"):
        patch(pipe, "cat", saes=wrong, table=table)
    with pytest.raises(ValueError, match=r"96 latents|128 latents"):
        patch(pipe, "cat", saes={UP: make_sae(32, 96, 4)}, table=table)
    with pytest.raises(ValueError, match="halves"):
        patch(pipe, "cat", saes=saes, table=table, halves="neither")
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        patch(pipe, "cat")
    with pytest.raises(FileNotFoundError, match="concepts.json"):
        patch(pipe, "cat", tmp_path)
    table.save(tmp_path)
    with pytest.raises(ValueError, match=r"no SAE for the hookpoints of \['cat'\].*SAEs: none"):
        patch(pipe, "cat", tmp_path)
    with pytest.raises(ValueError, match=r"no SAE for hookpoint 'up_blocks.1.attentions.1'"):
        patch(pipe, "cat", tmp_path, hookpoints=[UP])
    assert get_patch(pipe) is None  # failed patches leave nothing behind


# -- composition with diffusers' own hook-based techniques ---------------------------------------------------------


def _registry(module):
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module)


def test_composes_with_first_block_cache(tiny_pipe_factory):
    """diffusers' first-block cache (on the transformer blocks inside each hooked Transformer2DModel) and the
    patch run together, each is removable alone, and identity / bit-equal unpatch hold with the cache on."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext
    from saeuron.toy import tiny_unet_config

    pipe = tiny_pipe_factory(unet_config={**tiny_unet_config(), "transformer_layers_per_block": 2})
    saes = _saes()
    attns = [pipe.unet.get_submodule(h) for h in list_hookpoints(pipe)]  # FBC needs >= 2 transformer blocks each
    with pytest.raises(IndexError):  # diffusers' FBC looks for transformer_blocks among the model's children:
        apply_first_block_cache(pipe.unet, FirstBlockCacheConfig(threshold=0.3))  # a UNet has none (diffusers' limit)
    tails = [a.transformer_blocks[1].attn1 for a in attns]
    computed = []
    counters = [t.register_forward_hook(lambda *a: computed.append(1)) for t in tails]

    def run():
        """One sampling run with a fresh cache: FBC's state needs a cache context, which SD does not set."""
        computed.clear()
        for a in attns:
            _registry(a).reset_stateful_hooks(recurse=True)  # also clears the context
            for tb in a.transformer_blocks:
                for hook in _registry(tb).hooks.values():
                    hook.state_manager.set_context(CacheContext("cond"))
        return _run(pipe, steps=4)

    try:
        plain = _run(pipe, steps=4)
        with patched(pipe, "cat", saes=saes, table=_table()):
            edited_plain = _run(pipe, steps=4)
        for a in attns:
            apply_first_block_cache(a, FirstBlockCacheConfig(threshold=0.5))
        fbc = run()
        assert 0 < len(computed) < 4 * len(attns)  # the cache is on and skips some tail blocks
        assert not torch.equal(fbc, plain)
        n_fbc = len(computed)

        h = patch(pipe, "cat", saes=saes, table=_table(fires=False))
        assert torch.equal(run(), fbc) and len(computed) == n_fbc  # nothing fires: identity under the cache
        patch(pipe, "cat", saes=saes, table=_table())
        edited = run()
        assert torch.isfinite(edited).all() and (edited - fbc).abs().max() > 1e-3  # the edit acts under the cache
        assert _hooks(pipe.unet) == [("", TIMESTEP_HOOK), (UP, EDIT_HOOK), (MID, EDIT_HOOK)]

        assert unpatch(pipe) and _hooks(pipe.unet) == []
        assert torch.equal(run(), fbc) and len(computed) == n_fbc  # bit-equal unpatch; the cache stays and works
        assert all(_hooks(a.transformer_blocks[0], "fbc") for a in attns)

        h = patch(pipe, "cat", saes=saes, table=_table())
        assert torch.equal(run(), edited)
        for a in attns:  # remove the cache alone: the patch keeps working, exactly as without the cache
            for tb in a.transformer_blocks:
                for name in list(_registry(tb).hooks):
                    _registry(tb).remove_hook(name, recurse=False)
        assert get_patch(pipe) is h
        assert torch.equal(_run(pipe, steps=4), edited_plain)
        unpatch(pipe)
        assert torch.equal(_run(pipe, steps=4), plain)
    finally:
        for c in counters:
            c.remove()


GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_composes_with_group_offloading(tiny_pipe_factory, offload_type):
    """Group offloading (CPU -> CPU) and the patch share the UNet's HookRegistry in either order; each is
    removable alone; outputs are bit-equal to the same configuration without offloading."""
    pytest.importorskip("accelerate", reason="diffusers' group offloading needs accelerate (send_to_device)")
    pipe = tiny_pipe_factory()
    saes, table = _saes(), _table()
    kw = dict(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type)
    if offload_type == "block_level":
        kw["num_blocks_per_group"] = 1
    plain = _run(pipe)
    with patched(pipe, "cat", saes=saes, table=table):
        edited = _run(pipe)
    assert (edited - plain).abs().max() > 1e-3

    def offloaded():
        return any(_hooks(pipe.unet, g) for g in GROUP_OFFLOAD_HOOKS)

    def drop_offloading():
        for g in GROUP_OFFLOAD_HOOKS:
            _registry(pipe.unet).remove_hook(g, recurse=True)

    h = patch(pipe, "cat", saes=saes, table=table)  # patch first, offloading on top
    pipe.unet.enable_group_offload(**kw)
    assert offloaded() and get_patch(pipe) is h
    assert torch.equal(_run(pipe), edited)
    assert unpatch(pipe) and _hooks(pipe.unet) == [] and offloaded()  # the offloading stays and works
    assert torch.equal(_run(pipe), plain)
    patch(pipe, "cat", saes=saes, table=_table(fires=False))  # offloading first, patch on top
    assert torch.equal(_run(pipe), plain)  # identity
    h = patch(pipe, "cat", saes=saes, table=table)
    assert torch.equal(_run(pipe), edited)
    drop_offloading()  # remove offloading alone: the patch keeps working
    assert not offloaded() and get_patch(pipe) is h
    assert torch.equal(_run(pipe), edited)
    unpatch(pipe)
    assert torch.equal(_run(pipe), plain)
    assert list(pipe.unet.state_dict()) == list(tiny_pipe_factory().unet.state_dict())


def test_unpatch_keeps_a_later_hook_that_replaces_forward(pipe):
    """A diffusers hook with its own ``new_forward`` (like layer skip's) registered on a hooked block after the
    patch keeps running after ``unpatch`` (diffusers' ``remove_hook`` alone would unwire it)."""
    from diffusers.hooks import ModelHook

    class Halve(ModelHook):  # scales the block's channels from 0.5 to 1.5 (GroupNorm would undo a plain 0.5)
        def new_forward(self, module, *args, **kwargs):
            out = self.fn_ref.original_forward(*args, **kwargs)
            o = out[0] if isinstance(out, tuple) else out.sample
            o = o * torch.linspace(0.5, 1.5, o.shape[1])[None, :, None, None]
            return (o, *out[1:]) if isinstance(out, tuple) else type(out)(sample=o)

    x, ehs = _unet_inputs(2)
    registry = _registry(pipe.unet.get_submodule(UP))
    with torch.no_grad():
        plain = pipe.unet(x, TS[0], ehs).sample
        registry.register_hook(Halve(), "test_halve")
        try:
            halved = pipe.unet(x, TS[0], ehs).sample
            assert (halved - plain).abs().max() > 1e-3
            registry.remove_hook("test_halve", recurse=False)
            patch(pipe, "cat", saes=_saes(), table=_table())
            edited = pipe.unet(x, TS[0], ehs).sample
            registry.register_hook(Halve(), "test_halve")
            both = pipe.unet(x, TS[0], ehs).sample
            assert not torch.equal(both, edited) and not torch.equal(both, halved)
            unpatch(pipe)
            assert list(registry.hooks) == ["test_halve"]
            assert torch.equal(pipe.unet(x, TS[0], ehs).sample, halved)
        finally:
            registry.remove_hook("test_halve", recurse=False)
        assert torch.equal(pipe.unet(x, TS[0], ehs).sample, plain)


def test_input_unit_norm_sae_edits_standardised_tokens(pipe):
    """An ``input_unit_norm`` SAE edits x + scale_x * delta(x_n), x_n the standardised token (sae.preprocess)."""
    from diffusers.hooks import ModelHook

    saes = _saes()
    saes[UP].cfg.input_unit_norm = True
    x, ehs = _unet_inputs(2)
    block = pipe.unet.get_submodule(UP)
    seen = {}

    class Before(ModelHook):  # registered before the patch: sees the block's output before the edit
        def post_forward(self, module, output):
            seen["before"] = output[0].clone()
            return output

    registry = _registry(block)
    registry.register_hook(Before(), "test_before")
    after = block.register_forward_hook(lambda m, a, out: seen.__setitem__("after", out[0].clone()))
    try:
        with torch.no_grad():
            plain = pipe.unet(x, TS[0], ehs).sample
            h = patch(pipe.unet, "cat", saes=saes, table=_table(fires=False), hookpoints=[UP])
            assert torch.equal(pipe.unet(x, TS[0], ehs).sample, plain)  # nothing fires: identity
            h = patch(pipe.unet, "cat", saes=saes, table=_table(), hookpoints=[UP])
            edited = pipe.unet(x, TS[0], ehs).sample
            fi, ta, sc = h.state.rows[(UP, "scale")]
        xt = reference.as_tokens(seen["before"])
        xn, mean, scale = saes[UP].preprocess(xt)
        torch.testing.assert_close(xn, (xt - xt.mean(-1, keepdim=True)) / (xt.std(-1, keepdim=True) + 1e-5))
        delta = reference.edit_delta(xn, *saes[UP].weights_for("cpu", torch.float32), 4, fi, ta, sc, xt.shape[0])
        assert (delta != 0).any(-1).float().mean() > 0.05  # the edit acts on a good share of tokens
        got = reference.as_tokens(seen["after"])
        torch.testing.assert_close(got, xt + scale * delta, rtol=1e-5, atol=1e-5)
        untouched = (delta == 0).all(-1)
        assert torch.equal(got[untouched], xt[untouched])  # bit for bit where nothing fires
        saes[UP].cfg.input_unit_norm = False  # the plain edit of the same SAE differs
        patch(pipe.unet, "cat", saes=saes, table=_table(), hookpoints=[UP])
        with torch.no_grad():
            assert not torch.equal(pipe.unet(x, TS[0], ehs).sample, edited)
        saes[UP].cfg.input_unit_norm = True
        patch(pipe.unet, "cat", saes=saes, table=_table(), hookpoints=[UP])  # differentiable path: same numbers
        e = ehs.clone().requires_grad_()
        out = pipe.unet(x, TS[0], e).sample
        out.square().sum().backward()
        torch.testing.assert_close(out.detach(), edited, rtol=1e-5, atol=1e-5)
        assert e.grad is not None and torch.isfinite(e.grad).all()
        with pytest.raises(ValueError, match="input_unit_norm"):
            patch(pipe.unet, "cat", saes=saes, table=_table(), hookpoints=[UP], error_term="reference")
    finally:
        after.remove()
        registry.remove_hook("test_before", recurse=False)
        unpatch(pipe.unet)


def test_unpatch_keeps_an_accelerate_hook_added_after_the_patch(pipe):
    """accelerate's hooks (model CPU offload) wrap ``forward`` too; one added after the patch survives ``unpatch``."""
    pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    calls = []

    class Count(AccelerateHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    x, ehs = _unet_inputs(2)
    with torch.no_grad():
        plain = pipe.unet(x, TS[0], ehs).sample
        patch(pipe, "cat", saes=_saes(), table=_table())
        edited = pipe.unet(x, TS[0], ehs).sample
        add_hook_to_module(pipe.unet, Count())
        try:
            assert torch.equal(pipe.unet(x, TS[0], ehs).sample, edited) and len(calls) == 1
            unpatch(pipe)
            assert torch.equal(pipe.unet(x, TS[0], ehs).sample, plain) and len(calls) == 2  # still wrapped
            patch(pipe, "cat", saes=_saes(), table=_table())  # accelerate first, then the patch
            assert torch.equal(pipe.unet(x, TS[0], ehs).sample, edited) and len(calls) == 3
            unpatch(pipe)
            assert torch.equal(pipe.unet(x, TS[0], ehs).sample, plain) and len(calls) == 4
        finally:
            remove_hook_from_module(pipe.unet)
        assert torch.equal(pipe.unet(x, TS[0], ehs).sample, plain) and len(calls) == 4
