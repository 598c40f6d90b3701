"""`mpicaffe prune`'s command-line flags, apart from the pruning code (and torch), so that
`mpicaffe --help` stays fast."""
from __future__ import annotations

import argparse

# how channels can be ranked (mpicaffe.prune.criteria); the last two look at TEST data
CRITERIA = ("l1", "l2", "activation", "apoptosis")
DATA_CRITERIA = ("activation", "apoptosis")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="net prototxt (train_val: all phases are pruned together)")
    p.add_argument("--weights", required=True, help="trained .caffemodel(.h5)")
    p.add_argument("--solverstate", help="a .solverstate(.h5) of this net to prune too (its history)")
    p.add_argument("--out", required=True, help="output folder (created)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", help="fraction of each layer's channels to remove: 0.5, or per layer "
                                        "conv1=0.5,ip1=0.3 (a bare value is the default for the other layers)")
    amount.add_argument("--threshold", help="remove channels whose criterion score is below this (same forms)")
    p.add_argument("--criterion", default="l1", choices=CRITERIA, help="how channels are ranked (default l1)")
    p.add_argument("--layers", help="comma-separated layers that may be pruned (default: every prunable layer)")
    p.add_argument("--samples", type=int, default=10,
                   help="batches of TEST data the activation and apoptosis criteria look at (default 10)")
    p.add_argument("--test-iterations", type=int, default=50,
                   help="TEST batches scored before and after (default 50; 0 skips scoring)")
    p.add_argument("--finetune-iters", type=int, default=0, help="train the pruned net N iterations (needs --solver)")
    p.add_argument("--solver", help="solver prototxt for --finetune-iters (its net is replaced by the pruned one)")
    p.add_argument("--gpu", help="GPU id to use (default: the CPU)")
