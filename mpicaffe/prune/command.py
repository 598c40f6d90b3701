"""`mpicaffe prune`: write a smaller prototxt, .caffemodel and .solverstate, and report the savings.

Output folder: the pruned net under the prototxt's file name, the pruned weights under the
weights' stem + `.caffemodel`, the pruned solver state under its own name (its learned_net names
the pruned weights), `prune_report.txt` and `prune_report.json`; with --finetune-iters,
`<weights stem>_finetuned.caffemodel/.solverstate` too. Paths inside the prototxt (data sources)
are kept as written, so run the pruned files from the same working directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from mpicaffe import prototxt
from mpicaffe.atomic import write_bytes_atomic
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.net import tensor_to_blob_proto
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune import criteria, report
from mpicaffe.prune.model import PrunableModel, build_net, has_test_phase

log = logging.getLogger(__name__)


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()] if text else []


def run(args: argparse.Namespace) -> int:
    from mpicaffe.devices import select_device

    if args.finetune_iters and not args.solver:
        raise UserError("--finetune-iters needs --solver (the solver to fine-tune with)")
    if args.samples < 1 or args.test_iterations < 0 or args.finetune_iters < 0:
        raise UserError("--samples must be >= 1; --test-iterations and --finetune-iters must be >= 0")
    ratio = criteria.parse_amounts(args.ratio, "--ratio") if args.ratio is not None else None
    threshold = criteria.parse_amounts(args.threshold, "--threshold") if args.threshold is not None else None
    device = str(select_device(args.gpu))
    state = snapshot_io.read_solver_state(args.solverstate) if args.solverstate else None
    model = PrunableModel.load(args.model, args.weights, device=device)
    try:
        removed = model.select(args.criterion, ratio, threshold, _names(args.layers), args.samples)
        cuts = model.cuts(removed)
        net, weights, history = model.pruned_files(cuts, state, args.solverstate or "")
    finally:
        model.close()
    os.makedirs(args.out, exist_ok=True)
    paths = _write(args, net, weights, state, history)
    before = build_net(model.param, caffe_pb2.TEST, args.model, args.weights, device)
    after = build_net(net, caffe_pb2.TEST, paths["model"], paths["weights"], device)
    r = report.Report(report.net_costs(before), report.net_costs(after),
                      {m: (g.channels, cuts.num_output[m]) for g in model.analysis.groups for m in g.members
                       if m in cuts.num_output},
                      model.analysis.blocked, args.criterion)
    if has_test_phase(model.param) and args.test_iterations:
        r.scores["before"] = report.evaluate(before, args.test_iterations)
        r.scores["after"] = report.evaluate(after, args.test_iterations)
    before.close()
    after.close()
    if args.finetune_iters:
        tuned = _finetune(args, paths, state is not None, device)
        if has_test_phase(model.param) and args.test_iterations:
            test = build_net(net, caffe_pb2.TEST, paths["model"], tuned, device)
            r.scores[f"after fine-tuning {args.finetune_iters} iterations"] = report.evaluate(test, args.test_iterations)
            test.close()
    text = r.text()
    write_bytes_atomic(os.path.join(args.out, "prune_report.txt"), text.encode())
    write_bytes_atomic(os.path.join(args.out, "prune_report.json"), json.dumps(r.to_json(), indent=1).encode())
    print(text, end="")
    for what, path in paths.items():
        print(f"Wrote {what}: {path}")
    return 0


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".caffemodel.h5", ".caffemodel", ".solverstate.h5", ".solverstate"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _write(args, net, weights, state, history) -> dict[str, str]:
    paths = {"model": os.path.join(args.out, os.path.basename(args.model)),
             "weights": os.path.join(args.out, _stem(args.weights) + ".caffemodel")}
    for p in paths.values():
        if os.path.abspath(p) in (os.path.abspath(args.model), os.path.abspath(args.weights)):
            raise UserError(f"--out {args.out}: would overwrite the input {p}; choose another folder")
    write_bytes_atomic(paths["model"], prototxt.to_text(net).encode())
    write_bytes_atomic(paths["weights"], weights.SerializeToString())
    if state is not None:
        paths["solver state"] = os.path.join(args.out, os.path.basename(args.solverstate))
        out = caffe_pb2.SolverState(iter=state.iter, current_step=state.current_step, learned_net=paths["weights"])
        if args.solverstate.endswith(".h5"):
            snapshot_io.write_solver_state_hdf5(out, history, paths["solver state"])
        else:
            for h in history:
                tensor_to_blob_proto(_tensor(h), out.history.add())
            snapshot_io.write_solver_state(out, paths["solver state"])
    return paths


def _tensor(a):
    import torch

    return torch.from_numpy(a)


def _finetune(args, paths: dict[str, str], with_state: bool, device: str) -> str:
    """Train the pruned net `args.finetune_iters` iterations; returns the fine-tuned weights' path."""
    from mpicaffe.backends.engine.solver import get_solver

    param = prototxt.read_solver(args.solver)
    for f in ("net_param", "train_net", "train_net_param", "test_net", "test_net_param"):
        param.ClearField(f)
    param.net = paths["model"]
    param.snapshot_prefix = os.path.join(args.out, _stem(args.weights) + "_finetuned")
    param.test_interval = 2**31 - 1  # the report scores it afterwards
    param.test_initialization = False
    param.snapshot = 0
    solver = get_solver(param, args.solver, device=device)
    try:
        if with_state:
            solver.restore(paths["solver state"])
        else:
            snapshot_io.load_weights(solver.net, paths["weights"])
        log.info("Fine-tuning the pruned net for %d iterations", args.finetune_iters)
        solver.step(args.finetune_iters)
        model, state = solver.snapshot()
    finally:
        for net in [solver.net, *solver.test_nets]:
            net.close()
    paths["fine-tuned weights"], paths["fine-tuned solver state"] = model, state
    return model
