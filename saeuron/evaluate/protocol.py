"""The evaluation protocol's fixed facts: seeds, the methods compared, the sweep's default grid.

Plain constants that import nothing, so the command line can show them in ``--help`` without loading torch.
"""
EVAL_SEEDS = (188, 288, 588, 688, 888)  # the UnlearnCanvas evaluation seeds (docs/method.md section 6)
TUNING_SEEDS = (1, 2)  # seeds the sweep chooses on, disjoint from the evaluation seeds
METHODS = ("saeuron", "uce", "esd")  # what `saeuron minicanvas compare` runs side by side
MULTIPLIERS = (-1.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0)  # the paper's object sweep
PERCENTILES = (99.99, 99.995, 99.999)
TOP_NS = (1, 2, 4, 8)
THRESHOLDS = (1.0,)
