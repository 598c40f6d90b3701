"""A net and its weights as pruning sees them: the prototxt, one engine net per phase, the analysis.

`PrunableModel.load` reads a train_val prototxt (upgraded, unfiltered), builds the TRAIN and TEST
nets on the built-in engine with the weights, and finds the prunable groups. `select` picks the
channels to remove with a criterion, and `pruned_files` applies the cuts to the prototxt, the
weights and a solver state.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpicaffe import prototxt
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.net import Net
from mpicaffe.errors import UserError
from mpicaffe.proto import caffe_pb2
from mpicaffe.prune import criteria
from mpicaffe.prune.arguments import CRITERIA, DATA_CRITERIA
from mpicaffe.prune.dependencies import Analysis, PhaseView, analyze
from mpicaffe.prune.surgery import Cuts, Shapes, plan_cuts, prune_history, prune_net_param, prune_weights

log = logging.getLogger(__name__)

PHASES = (caffe_pb2.TRAIN, caffe_pb2.TEST)


def build_net(param: caffe_pb2.NetParameter, phase: int, source: str, weights: caffe_pb2.NetParameter | str | None,
              device: str = "cpu") -> Net:
    """An engine net of `param` filtered for `phase`, with weights (a path or a NetParameter)."""
    net = Net(prototxt.net_for_phase(param, phase, source=source), device, source, retain_diffs=False)
    if isinstance(weights, str):
        snapshot_io.load_weights(net, weights)
    elif weights is not None:
        net.copy_from(weights, source)
    return net


def has_test_phase(param: caffe_pb2.NetParameter) -> bool:
    """True when some layer is included or excluded by phase TEST (a train_val net)."""
    return any(r.HasField("phase") and r.phase == caffe_pb2.TEST for lp in param.layer
               for r in [*lp.include, *lp.exclude])


@dataclass
class PrunableModel:
    """A net prototxt (as read: all phases) with one engine net per phase, holding the weights."""

    path: str
    param: caffe_pb2.NetParameter
    nets: dict[int, Net]
    analysis: Analysis

    @classmethod
    def load(cls, path: str, weights: caffe_pb2.NetParameter | str | None = None,
             param: caffe_pb2.NetParameter | None = None, device: str = "cpu") -> PrunableModel:
        """Read `path` (or use `param`, naming it `path`), build its TRAIN and TEST nets with
        `weights` and analyze them."""
        param = prototxt.read_net(path) if param is None else param
        nets = {phase: build_net(param, phase, path, weights, device) for phase in PHASES}
        return cls(path, param, nets, analyze([PhaseView.of(n) for n in nets.values()]))

    def close(self) -> None:
        for net in self.nets.values():
            net.close()

    # --- what the surgery needs ---
    def blob_shapes(self) -> Shapes:
        shapes: Shapes = {}
        for net in self.nets.values():
            for layer in net.layers:
                for j, t in enumerate(layer.blobs):
                    shapes[(layer.name, j)] = tuple(t.shape)
        return shapes

    def learnable_params(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """The TRAIN net's learnable parameters in Caffe's order (the solver history's order)."""
        return [(i.layer, i.index, i.shape) for i in self.nets[caffe_pb2.TRAIN].param_infos]

    def weight_arrays(self) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {}
        for net in self.nets.values():
            for layer in net.layers:
                if layer.blobs and layer.name not in out:
                    out[layer.name] = [t.detach().cpu().numpy() for t in layer.blobs]
        return out

    def weights_param(self) -> caffe_pb2.NetParameter:
        """The weights as a .caffemodel NetParameter (TRAIN net, plus layers only the TEST net has)."""
        out = self.nets[caffe_pb2.TRAIN].to_proto()
        names = {lp.name for lp in out.layer}
        for lp in self.nets[caffe_pb2.TEST].to_proto().layer:
            if lp.name not in names and lp.blobs:
                out.layer.add().CopyFrom(lp)
        return out

    # --- choosing ---
    def resolve_layers(self, names: list[str], flag: str) -> None:
        """Check that every layer named in `flag` is a prunable layer; explain it when it is not."""
        blocked = {}
        for group_name, why in self.analysis.blocked:
            for m in group_name.split("+"):
                blocked[m] = why
        for name in names:
            if self.analysis.group_of(name) is not None:
                continue
            if name in blocked:
                raise UserError(f"{flag}: layer '{name}' cannot be pruned: {blocked[name]}")
            known = {layer.name for net in self.nets.values() for layer in net.layers}
            what = "is not a Convolution or InnerProduct layer" if name in known else "is not in the net"
            raise UserError(f"{flag}: layer '{name}' {what} ({self.path})")

    def select(self, criterion: str, ratio: criteria.Amounts | None = None,
               threshold: criteria.Amounts | None = None, layers: list[str] | None = None, samples: int = 10,
               feed: Callable[[Net], None] | None = None) -> dict[str, np.ndarray]:
        """Group name -> channels to remove, by `criterion` with a ratio or a threshold.

        `layers` restricts pruning to the groups holding those layers. Activation criteria run
        `samples` forward passes of the TEST net (`feed(net)` sets its inputs when it has no data
        layer).
        """
        if criterion not in CRITERIA:
            raise UserError(f"--criterion: unknown criterion '{criterion}' (choose {', '.join(CRITERIA)})")
        amounts = ratio or threshold
        if amounts is None:
            raise UserError("give --ratio or --threshold")
        self.resolve_layers(list(amounts.per_layer), amounts.flag)
        self.resolve_layers(layers or [], "--layers")
        groups = [g for g in self.analysis.groups
                  if (not layers or any(m in layers for m in g.members)) and amounts.for_group(g) is not None]
        stats = {}
        if criterion in DATA_CRITERIA and groups:
            net = self.nets[caffe_pb2.TEST]
            if net.inputs and feed is None:
                raise UserError(f"{self.path}: --criterion {criterion} runs the net on its data, but its TEST phase "
                                f"reads inputs ({', '.join(net.inputs)}) instead of a data layer")
            stats = criteria.collect_activations(net, groups, samples, feed)
        weights = self.weight_arrays()
        removed = {}
        for g in groups:
            if criterion in DATA_CRITERIA:
                order, scores = criteria.removal_order(criterion, stats=stats[g.name])
            else:
                order, scores = criteria.removal_order(criterion, criteria.weight_scores(g, weights, criterion))
            value = amounts.for_group(g)
            chosen = criteria.choose(order, scores, g.channels, value if ratio else None,
                                     value if threshold else None)
            if chosen.size:
                removed[g.name] = chosen
        return removed

    # --- cutting ---
    def pruned_files(self, cuts: Cuts, state: snapshot_io.SolverStateData | None = None,
                     state_path: str = "") -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter,
                                                    list[np.ndarray] | None]:
        """(pruned prototxt, pruned weights, pruned solver history or None)."""
        net = prune_net_param(self.param, cuts)
        weights = prune_weights(self.weights_param(), self.blob_shapes(), cuts, self.path)
        history = None
        if state is not None:
            history = prune_history(state.history, self.learnable_params(), cuts, state_path)
        return net, weights, history

    def cuts(self, removed: dict[str, np.ndarray]) -> Cuts:
        return plan_cuts(self.analysis, removed)
