"""Probe (issue 22): feature scores contrasted with the *nearest* concept of the same domain instead of the mean of
all others, on the shipped MiniCanvas SAEs and concept file, tuning seeds only.

The method's score (method.md section 4) is ``mu_c / sum(mu_c) - mu_rest / sum(mu_rest)`` with ``mu_rest`` the mean
over every other concept, so a feature that circle shares with ring and hexagon but not with the other 17 concepts
scores high. Here ``mu_rest`` is, per feature, the largest normalised mean of any other concept of the same domain
(objects against objects), so only features the target has to itself score high. The rest of the edit is the
shipped one (block, threshold, multiplier); ``top_n`` as given. It patches ``ConceptTable.scores`` in this process.

    python benchmarks/minicanvas/lever_nearest_contrast.py SEED OBJECTS TOP_NS MULTIPLIERS OUT.jsonl
    python benchmarks/minicanvas/lever_nearest_contrast.py 1 circle,ring,hexagon 2,8 -20,-50 out.jsonl
"""
import json
import sys
import time

import torch

from saeuron.concepts import EPS, ConceptTable
from saeuron.evaluate.sweep import make_scorer
from saeuron.minicanvas import data, defaults
from saeuron.sae import SparseAutoencoder

torch.set_num_threads(1)


def nearest_scores(self, hp, concept):
    mu = self.mu[self.stored_hookpoint(hp)].double()
    c = self.index(concept)
    domain = data.OBJECTS if concept in data.OBJECTS else data.STYLES
    others = [self.index(n) for n in domain if n != concept and n in self.names]
    norm = mu / (mu.sum(-1, keepdim=True) + EPS)
    rest = norm[others].max(0).values if others else torch.zeros_like(norm[c])
    return (norm[c] - rest).float()


ConceptTable.scores = nearest_scores
seed, objects = int(sys.argv[1]), sys.argv[2].split(",")
top_ns = [int(v) for v in sys.argv[3].split(",")]
mults = [float(v) for v in sys.argv[4].split(",")]
out = sys.argv[5]
pipe, clf, ck = defaults.load_pipeline(), defaults.load_classifiers(), defaults.checkpoint_dir()
table = ConceptTable.load(ck)
saes = {hp: SparseAutoencoder.from_pretrained(ck / hp) for hp in table.hookpoints if (ck / hp).is_dir()}
scorer = make_scorer(pipe, clf, saes, table, domain="object", seeds=(seed,), batch_size=55)
for o in objects:
    d = table.defaults[o]
    for tn in top_ns:
        for m in mults:
            t0 = time.time()
            r = scorer(o, "top_n", tn, m, tuple(d["hookpoints"]), d["threshold"])
            rec = {"seed": seed, "object": o, "score": "nearest", "hookpoints": d["hookpoints"],
                   "threshold": d["threshold"], "top_n": tn, "multiplier": m, "ua": r["ua"], "ira": r["ira"],
                   "cra": r["cra"], "s": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
