"""Probe (issue 22): feature scores computed on the concept's own tokens instead of whole-image means, on the shipped
MiniCanvas SAEs and concept file, tuning seeds only.

The method's statistics (method.md section 4) average each SAE feature over *every* token of an image, so an
object's mean is diluted by the background and the style, and features of the object's outline compete with
features of everything else in the picture. Here each image token is weighted by how much the block's own
cross-attention (``transformer_blocks[0].attn2`` of the hooked Transformer2DModel, mean over heads, cond half)
attends to the concept's word in the prompt: ``a[c,p,t] = sum_tok w_tok^POWER * f_tok / sum_tok w_tok^POWER``
(POWER 0 = the method's uniform mean, from the same pass). Objects are weighted by the object word, styles by the
style word; unstyled prompts count for their object only, as in the shipped file. Only the *scores* (which features
are selected) change: the edit thresholds tau and the scales stay the shipped table's. It patches
``ConceptTable.scores`` in this process.

    python benchmarks/minicanvas/lever_token_scores.py SEED OBJECTS TOP_NS MULTIPLIERS POWER OUT.jsonl [MODEL CKPT]
    python benchmarks/minicanvas/lever_token_scores.py 1 circle,ring,hexagon,cross,arrow 2,8 -20,-50 1 out.jsonl

MODEL, CKPT: a pipeline folder (e.g. a build's ``model/``) and an SAE + concept-file folder (e.g. a build's
``checkpoint/``, or a swept copy of it: each object is edited at its default block and threshold); default the
shipped assets. The judges are always the shipped ones.

The statistics pass generates the 110 training-form prompts twice (seeds 1000+i, 25 steps, the model's guidance),
about 2 min on one core; it is cached in ``OUT.stats.pt``.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron.concepts import EPS, ConceptTable
from saeuron.evaluate.sweep import make_scorer
from saeuron.minicanvas import data, defaults
from saeuron.sae import SparseAutoencoder

torch.set_num_threads(int(os.environ.get("THREADS", "1")))  # 1 beside other jobs; 2 alone
BLOCKS_8X8 = ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1")  # where the objects are edited


class RecordingProcessor:
    """Wraps an attention processor: computes the same output and records the attention probabilities."""

    def __init__(self, inner, sink):
        self.inner, self.sink = inner, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # [B*heads, HW, L]
        B = hidden_states.shape[0]
        self.sink.append(probs.reshape(B, attn.heads, *probs.shape[1:]).mean(1))  # [B, HW, L]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)


def word_positions(pipe, prompt, word):
    ids = pipe.tokenize([prompt])[0].tolist()
    wid = pipe.tokenizer.convert_tokens_to_ids(word)
    pos = [i for i, t in enumerate(ids) if t == wid]
    if not pos:
        raise ValueError(f"{word!r} not in {prompt!r}")
    return pos


def token_statistics(pipe, saes, table, powers, hookpoints, repeats=2, batch=22):
    """``{power: {hp: mu [C, T, M]}}`` over the training-form prompts, each token weighted by attention^power."""
    prompts = [(o, s, data.caption(o, s, 0)) for o in data.OBJECTS for s in list(data.STYLES) + [None]]
    C, T = len(table.names), len(table.timesteps)
    sums = {p: {hp: torch.zeros(C, T, saes[hp].num_latents, dtype=torch.float64) for hp in hookpoints} for p in powers}
    counts = torch.zeros(C)
    ts = table.timesteps.tolist()
    unet = pipe.unet
    sinks, outs = {hp: [] for hp in hookpoints}, {hp: [] for hp in hookpoints}
    handles, saved = [], {}
    for hp in hookpoints:
        blk = unet.get_submodule(hp)
        a = blk.transformer_blocks[0].attn2
        saved[hp] = a.processor
        a.set_processor(RecordingProcessor(a.processor, sinks[hp]))
        handles.append(blk.register_forward_hook(lambda m, i, o, hp=hp: outs[hp].append(o[0] if isinstance(o, tuple) else o.sample)))
    steps = []
    handles.append(unet.register_forward_pre_hook(lambda m, a, kw: steps.append(float(a[1] if len(a) > 1 else kw["timestep"])), with_kwargs=True))
    try:
        for r in range(repeats):
            for b0 in range(0, len(prompts), batch):
                chunk = prompts[b0:b0 + batch]
                for hp in hookpoints:
                    sinks[hp].clear(); outs[hp].clear()
                steps.clear()
                gens = [torch.Generator().manual_seed(1000 + r * len(prompts) + b0 + i) for i in range(len(chunk))]
                pipe([c for _, _, c in chunk], generator=gens, output_type="pt", num_inference_steps=T)
                n = len(chunk)
                for o, s, cap in chunk:
                    counts[table.index(o)] += 1
                    if s is not None:
                        counts[table.index(s)] += 1
                for step, t in enumerate(steps):
                    ti = min(range(T), key=lambda j: abs(ts[j] - t))
                    for hp in hookpoints:
                        out = outs[hp][step][n:]  # cond half
                        x = out.permute(0, 2, 3, 1).reshape(n, -1, out.shape[1])
                        att = sinks[hp][step][n:]  # [n, HW, L]
                        sae = saes[hp]
                        with torch.no_grad():
                            enc = sae.encode(x.reshape(-1, x.shape[-1]).float())
                            f = torch.zeros(enc.values.shape[0], sae.num_latents, dtype=torch.float64)
                            f.scatter_(1, enc.indices, enc.values.double())
                            f = f.reshape(n, x.shape[1], -1)
                        for i, (o, s, cap) in enumerate(chunk):
                            for concept in ([o] + ([s] if s is not None else [])):
                                w0 = att[i][:, word_positions(pipe, cap, concept)].sum(-1).double()  # [HW]
                                ci = table.index(concept)
                                for p in powers:
                                    w = w0.pow(p) if p else torch.ones_like(w0)
                                    w = w / w.sum()
                                    sums[p][hp][ci, ti] += (w[:, None] * f[i]).sum(0)
                print(f"stats repeat {r} batch {b0}", flush=True)
    finally:
        for h in handles:
            h.remove()
        for hp in hookpoints:
            unet.get_submodule(hp).transformer_blocks[0].attn2.set_processor(saved[hp])
    # each prompt adds one weighted mean per timestep row: dividing by its concept's prompt count gives the mean
    return {p: {hp: (m / counts.double()[:, None, None]).float() for hp, m in d.items()} for p, d in sums.items()}


def main():
    seed, objects = int(sys.argv[1]), sys.argv[2].split(",")
    top_ns = [int(v) for v in sys.argv[3].split(",")]
    mults = [float(v) for v in sys.argv[4].split(",")]
    power = float(sys.argv[5])
    out = sys.argv[6]
    clf = defaults.load_classifiers()
    if len(sys.argv) > 7:
        from saeuron.minicanvas.model import load_pipeline
        pipe, ck = load_pipeline(sys.argv[7]), Path(sys.argv[8])
    else:
        pipe, ck = defaults.load_pipeline(), defaults.checkpoint_dir()
    pipe.set_progress_bar_config(disable=True)
    table = ConceptTable.load(ck)
    saes = {hp: SparseAutoencoder.from_pretrained(ck / hp) for hp in table.hookpoints if (ck / hp).is_dir()}
    cache = Path(out + ".stats.pt")
    if cache.is_file():
        stats = torch.load(cache)
    else:
        stats = token_statistics(pipe, saes, table, sorted({0.0, 1.0, 2.0, power}),
                                 [h for h in BLOCKS_8X8 if h in saes])
        torch.save(stats, cache)
    for hp in stats[0.0]:  # sanity: the uniform weights of this pass select what the shipped file selects
        tab0 = ConceptTable(table.names, table.counts, table.timesteps, {hp: stats[0.0][hp]})
        for o in objects:
            a = set(torch.cat(table.select(hp, o, top_n=8)).tolist())
            b = set(torch.cat(tab0.select(hp, o, top_n=8)).tolist())
            print(f"uniform-weight check {hp} {o}: {len(a & b)} of {len(a)} selected features shared", flush=True)
    weighted = stats[power]
    original = ConceptTable.scores

    def token_scores(self, hp, concept):
        name = self.stored_hookpoint(hp)
        if name not in weighted:
            return original(self, hp, concept)
        tmp = ConceptTable(self.names, self.counts, self.timesteps, {name: weighted[name]})
        return original(tmp, name, concept)

    ConceptTable.scores = token_scores
    # the selection also requires mu[c,t][i] > 0 (fires for c): the shipped table's mu, unchanged
    scorer = make_scorer(pipe, clf, saes, table, domain="object", seeds=(seed,), batch_size=55)
    for o in objects:
        d = table.defaults[o]
        hps = tuple(d["hookpoints"] or table.hookpoints)
        for tn in top_ns:
            for m in mults:
                t0 = time.time()
                r = scorer(o, "top_n", tn, m, hps, d["threshold"])
                rec = {"seed": seed, "object": o, "score": f"token-weighted (attention^{power:g})",
                       "hookpoints": list(hps), "threshold": d["threshold"], "top_n": tn, "multiplier": m,
                       "ua": r["ua"], "ira": r["ira"], "cra": r["cra"], "s": round(time.time() - t0, 1)}
                print(json.dumps(rec), flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
