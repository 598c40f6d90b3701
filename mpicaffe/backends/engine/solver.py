"""Caffe's Solver and its update rules (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam).

The solver builds the train and test nets a SolverParameter names and runs Caffe's Solver::Step
loop: test at test_interval, iter_size forward/backward passes, the pycaffe callbacks, the update,
snapshots and the log lines Caffe prints. The update works on the train net's flat buffers:
`flat_diff` is normalized, regularized and turned into the update value in a few whole-buffer
ops, with per-element lr_mult/decay_mult vectors, then `flat_data -= flat_diff` (Net::Update).
Scalars are rounded to float32 where Caffe holds them in Dtype.
"""
from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from mpicaffe import prototxt, upgrade
from mpicaffe.backends.engine import snapshot_io
from mpicaffe.backends.engine.lr_policy import check_lr_policy, learning_rate
from mpicaffe.backends.engine.net import Net, tensor_to_blob_proto
from mpicaffe.backends.engine.precision import LossScaler, autocast_dtype
from mpicaffe.errors import UserError
from mpicaffe.logs import SmoothedLoss, format_float, output_lines
from mpicaffe.proto import caffe_pb2

log = logging.getLogger(__name__)

_f32 = np.float32


class SolverAction(enum.IntEnum):
    """Caffe's SolverAction::Enum: what a signal handler asks the solver to do."""

    NONE = 0
    STOP = 1
    SNAPSHOT = 2


def blob_loss_weights(net: Net) -> dict[str, float]:
    """Each top blob's loss weight as Caffe's blob_loss_weights_ (the last layer writing it sets it)."""
    weights: dict[str, float] = {}
    for layer, ws in zip(net.layers, net.loss_weights):
        for name, w in zip(layer.param.top, ws):
            weights[name] = w
    return weights


def net_output_values(net: Net) -> tuple[list[str], np.ndarray, list[float]]:
    """Names, float32 values and loss weights of every element of the net's output blobs."""
    weights = blob_loss_weights(net)
    names, ws, values = [], [], []
    for name in net.outputs:
        v = np.asarray(net.blobs[name].data, dtype=np.float32).reshape(-1)
        names += [name] * v.size
        ws += [weights.get(name, 0.0)] * v.size
        values.append(v)
    return names, np.concatenate(values) if values else np.zeros(0, np.float32), ws


class Solver:
    """Caffe's Solver: nets, the Step/Solve/Test loops, snapshots; subclasses give the update rule.

    Build one with `get_solver`. `param` is a SolverParameter (its nets are read relative to
    `solver_path`, the file it came from); nets are built on `device`. With random_seed >= 0,
    torch's global RNG is seeded with random_seed + rank before the nets are built (fillers).
    `precision` (fp32, bf16, fp16) is the arithmetic of the nets' forward and backward
    (mpicaffe.backends.engine.precision); weights, gradients, history and update stay float32.
    """

    type = ""
    history_sets = 1  # history blobs per learnable parameter (Adam and AdaDelta keep two)

    def __init__(self, param: caffe_pb2.SolverParameter, solver_path: str | None = None,
                 device: torch.device | str = "cpu", rank: int = 0,
                 shown: caffe_pb2.SolverParameter | None = None, precision: str = "fp32"):
        self.param = param
        self.source = solver_path or "<solver>"
        self.device = torch.device(device)
        self.precision = precision
        self._autocast = autocast_dtype(precision, self.device)
        # fp16: the loss scale, and how the ranks agree to skip an overflowing step
        self.loss_scaler = LossScaler() if precision == "fp16" else None
        self._agree_overflow: Callable[[bool], bool] | None = None
        # `shown`: the parameters as the user wrote them, where the trainer runs rewritten ones
        log.info("Initializing solver from parameters: \n%s", prototxt.to_text(shown or param).rstrip())
        self._check_params()
        self._check_snapshot_write_permissions()
        if param.random_seed >= 0:
            torch.manual_seed(param.random_seed + rank)
        self._init_nets()
        self._set_precision()
        log.info("Solver scaffolding done.")
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self.loss = 0.0
        self.smoothed_loss = 0.0
        self._smoothing = SmoothedLoss(param.average_loss)
        self._iterations_last = 0
        self._callbacks: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._action_function: Callable[[], SolverAction | int | None] | None = None
        self._pre_solve()

    # --- construction ---
    def _err(self, message: str) -> UserError:
        return UserError(f"{self.source}: {message}")

    def _check_params(self) -> None:
        p = self.param
        if p.average_loss < 1:
            raise self._err(f"average_loss must be >= 1 (got {p.average_loss})")
        if p.iter_size < 1:
            raise self._err(f"iter_size must be >= 1 (got {p.iter_size})")
        if len(p.test_iter) and p.test_interval <= 0:
            raise self._err("test_interval must be > 0 when the solver has test nets (test_iter is set)")
        try:
            check_lr_policy(p)
        except UserError as e:
            raise self._err(str(e)) from None
        if p.weight_decay and p.regularization_type not in ("L1", "L2"):
            raise self._err(f"Unknown regularization type: {p.regularization_type!r} (use L2 or L1)")
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5 and (p.snapshot or p.snapshot_after_train):
            snapshot_io.require_h5py()

    def _check_snapshot_write_permissions(self) -> None:
        p = self.param
        if not p.snapshot:
            return
        if not p.HasField("snapshot_prefix"):
            raise self._err("In solver params, snapshot is specified but snapshot_prefix is not")
        probe = snapshot_io.snapshot_filename(p.snapshot_prefix, 0, ".tempfile")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError:
            raise self._err(f"Cannot write to snapshot prefix '{p.snapshot_prefix}'. Make sure that the "
                            "directory exists and is writeable.") from None

    def _init_nets(self) -> None:
        nets = prototxt.solver_nets(self.param, self.source)
        log.info("Creating training net from %s", nets.train_source)
        self.net = Net(prototxt.filter_net(nets.train, nets.train_source), self.device, nets.train_source)
        self.test_nets: list[Net] = []
        for i, (tp, src) in enumerate(zip(nets.tests, nets.test_sources)):
            log.info("Creating test net (#%d) specified by %s", i, src)
            test_net = Net(prototxt.filter_net(tp, src), self.device, src, retain_diffs=False)
            test_net.share_trained_layers_with(self.net)
            self.test_nets.append(test_net)
        base = os.path.dirname(self.source) if self.source != "<solver>" else ""
        for models in self.param.weights:
            for name in (m.strip() for m in models.split(",")):
                path = prototxt.resolve_path(name, base, "weights", self.source)
                log.info("Finetuning from %s", name)
                for net in [self.net, *self.test_nets]:
                    snapshot_io.load_weights(net, path)

    def _set_precision(self) -> None:
        if self._autocast is None:
            return
        log.info("Precision %s: forward and backward under autocast to %s; weights, gradients and the update "
                 "in float32%s", self.precision, self._autocast, ", with dynamic loss scaling"
                 if self.loss_scaler else "")
        if self.precision == "fp16" and self.device.type == "cpu":
            log.info("fp16 on the CPU checks a loss-scaled run; it is no faster than fp32 there (bf16 may be)")
        for net in [self.net, *self.test_nets]:
            net.set_autocast(self._autocast)

    def _pre_solve(self) -> None:
        """History buffers (zeros) and the per-element lr_mult/decay_mult of the flat buffers."""
        net = self.net
        n = net.flat_data.numel()
        self.history = [torch.zeros(n, dtype=torch.float32, device=self.device) for _ in range(self.history_sets)]
        infos = net.param_infos
        # a parameter with lr_mult 0 gets no diff in Caffe (param_propagate_down is false), and
        # statistics blobs (BatchNorm's) are never learned
        lr = [info.lr_mult if info.learnable else 0.0 for info in infos]
        decay = [info.decay_mult for info in infos]
        self._frozen = _merge_ranges([(i.offset, i.count) for i, m in zip(infos, lr) if m == 0 and i.count])
        self._lr_mult = self._per_element(lr)
        self._decay_mult = self._per_element(decay)

    def _per_element(self, values: list[float]) -> float | torch.Tensor:
        """A float when every parameter has the same value, else a float32 vector over the flat buffer."""
        infos = self.net.param_infos
        if len(set(values)) <= 1:
            return float(_f32(values[0])) if values else 0.0
        counts = torch.tensor([i.count for i in infos])
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), counts).to(self.device)

    # --- pycaffe-style API ---
    @property
    def max_iter(self) -> int:
        return self.param.max_iter

    def add_callback(self, on_start: Callable[[], None], on_gradients_ready: Callable[[], None]) -> None:
        """pycaffe's add_callback: `on_start` runs before each iteration's forward passes,
        `on_gradients_ready` after all iter_size backward passes and before the update."""
        self._callbacks.append((on_start, on_gradients_ready))

    def set_overflow_agreement(self, fn: Callable[[bool], bool] | None) -> None:
        """fp16: `fn(found)` gets whether this rank's averaged gradient has a non-finite value and
        returns whether any rank's has, so that every rank skips the same updates (the trainer
        reduces the flag across ranks). Without it each solver decides alone."""
        self._agree_overflow = fn

    def set_action_function(self, fn: Callable[[], SolverAction | int | None] | None) -> None:
        """Caffe's SetActionFunction: `fn()` is polled after each update and during testing and
        returns SolverAction.STOP, SNAPSHOT or NONE; it should return each request once."""
        self._action_function = fn

    def _requested_action(self) -> SolverAction:
        if self._action_function is None:
            return SolverAction.NONE
        return SolverAction(self._action_function() or 0)

    # --- training loop ---
    def step(self, iters: int) -> None:
        """Run `iters` iterations (Caffe's Solver::Step)."""
        p = self.param
        stop_iter = self.iter + iters
        self._smoothing = SmoothedLoss(p.average_loss)
        timer = time.perf_counter()
        self._iterations_last = self.iter
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                on_start()
            display = p.display and self.iter % p.display == 0
            loss = _f32(0)
            if self.loss_scaler is not None:
                self.net.loss_scale = self.loss_scaler.scale
            for _ in range(p.iter_size):
                loss += _f32(self.net.forward_backward())
            loss /= _f32(p.iter_size)
            self.loss = float(loss)
            self.smoothed_loss = float(self._smoothing.add(loss))
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - self._iterations_last) / (lapse or 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, format_float(per_s), format_float(lapse),
                         p.display, format_float(self.smoothed_loss))
                timer = time.perf_counter()
                self._iterations_last = self.iter
                for line in output_lines("Train", *net_output_values(self.net)):
                    log.info("%s", line)
            for _, on_gradients_ready in self._callbacks:
                on_gradients_ready()
            self.apply_update()
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SolverAction.SNAPSHOT:
                self.snapshot()
            if request == SolverAction.STOP:
                self.requested_early_exit = True
                break

    def solve(self, resume_file: str | None = None) -> None:
        """Train to max_iter (Caffe's Solver::Solve), optionally restoring a solver state first."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                loss = _f32(self.net.forward())
            self.smoothed_loss = float(self._smoothing.add(loss))
            log.info("Iteration %d, loss = %s", self.iter, format_float(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # --- testing ---
    def test_all(self) -> None:
        """Test every test net (Caffe's TestAll), stopping early on a STOP request."""
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test_sums(self, test_net_id: int, iters: int) -> tuple[list[str], np.ndarray, list[float], np.float32, int]:
        """Run `iters` test forwards; returns output names, float32 sums of each output element,
        loss weights, the summed loss and the number of forwards done (fewer after a STOP request).
        `output_lines("Test", names, sums / n, weights)` prints them as Caffe does."""
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        names: list[str] = []
        weights: list[float] = []
        sums = np.zeros(0, np.float32)
        loss = _f32(0)
        done = 0
        for i in range(iters):
            request = self._requested_action()
            while request != SolverAction.NONE:
                if request == SolverAction.SNAPSHOT:
                    self.snapshot()
                elif request == SolverAction.STOP:
                    self.requested_early_exit = True
                request = self._requested_action()
            if self.requested_early_exit:
                break
            with torch.no_grad():
                iter_loss = _f32(net.forward())
            loss += iter_loss
            names, values, weights = net_output_values(net)
            sums = values.copy() if i == 0 else sums + values
            done += 1
        return names, sums, weights, loss, done

    def test(self, test_net_id: int = 0) -> list[tuple[str, float]]:
        """Test one net (Caffe's Solver::Test): mean of each output element over test_iter forwards,
        logged in Caffe's format; returns [(output blob name, mean score)], empty if interrupted."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        iters = self.param.test_iter[test_net_id]
        names, sums, weights, loss, _ = self.test_sums(test_net_id, iters)
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return []
        if self.param.test_compute_loss:
            log.info("Test loss: %s", format_float(loss / _f32(iters)))
        means = (sums / _f32(iters)).astype(np.float32)
        for line in output_lines("Test", names, means, weights):
            log.info("%s", line)
        return [(n, float(m)) for n, m in zip(names, means)]

    # --- the update ---
    def apply_update(self) -> None:
        """Update the train net's weights from its diffs (Caffe's SGDSolver::ApplyUpdate): lr for
        this iter, clip_gradients, iter_size normalization, regularization, the solver's rule, then
        data -= diff, and iter + 1 (2018 Caffe counts updates in ApplyUpdate, so pycaffe's
        apply_update advances iter too). With fp16 the diffs are first unscaled; where one is not
        finite the weights and history are left as they are (iter still advances)."""
        p = self.param
        rate, self.current_step = learning_rate(p, self.iter, self.current_step)
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, format_float(rate))
        net = self.net
        with torch.no_grad():
            g = net.flat_diff
            if self.loss_scaler is not None and not self._unscale(g):
                self.iter += 1
                return
            for off, n in self._frozen:
                g[off:off + n].zero_()
            self._clip_gradients(g)
            if p.iter_size != 1:
                g.mul_(float(_f32(1) / _f32(p.iter_size)))
            self._regularize(g, net.flat_data)
            if isinstance(self._lr_mult, torch.Tensor):
                local_rate = self._lr_mult * float(_f32(rate))
            else:
                local_rate = float(_f32(rate) * _f32(self._lr_mult))
            self._compute_update_value(g, local_rate)
            net.flat_data.sub_(g)
        self.iter += 1

    def _unscale(self, g: torch.Tensor) -> bool:
        """fp16: unscale the (averaged) diffs; False where the update must be skipped."""
        scale = self.loss_scaler.scale
        if self.loss_scaler.unscale_(g, self._agree_overflow):
            return True
        log.info("Iteration %d: fp16 gradients overflowed at loss scale %g; update skipped, loss scale now %g",
                 self.iter, scale, self.loss_scaler.scale)
        return False

    def _clip_gradients(self, g: torch.Tensor) -> None:
        clip = _f32(self.param.clip_gradients)
        if clip < 0:
            return
        l2norm = np.sqrt(_f32(torch.dot(g, g).item()))
        if l2norm > clip:
            scale = _f32(clip / l2norm)
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     format_float(l2norm), format_float(clip), format_float(scale))
            g.mul_(float(scale))

    def _regularize(self, g: torch.Tensor, w: torch.Tensor) -> None:
        wd = _f32(self.param.weight_decay)
        if not wd:
            return
        if isinstance(self._decay_mult, torch.Tensor):
            local_decay = self._decay_mult * float(wd)
        else:
            local_decay = float(wd * _f32(self._decay_mult))
            if not local_decay:
                return
        if self.param.regularization_type == "L2":
            g.add_(w * local_decay)
        elif self.param.regularization_type == "L1":
            g.add_(torch.sign(w) * local_decay)
        else:
            raise self._err(f"Unknown regularization type: {self.param.regularization_type}")

    def _compute_update_value(self, g: torch.Tensor, local_rate) -> None:
        """Turn the regularized diff `g` into the update value in place (ComputeUpdateValue)."""
        raise NotImplementedError

    # --- history in Caffe's per-blob order ---
    def history_blobs(self) -> list[torch.Tensor]:
        """Views of the history in Caffe's order: one per learnable blob (shaped like it) for each
        history set, the second set (Adam's, AdaDelta's) after the first."""
        return [h[i.offset:i.offset + i.count].view(i.shape) for h in self.history for i in self.net.param_infos]

    # --- snapshots ---
    def snapshot(self) -> tuple[str, str]:
        """Write `<prefix>_iter_<iter>.caffemodel` and `.solverstate` (or their .h5 forms, per
        snapshot_format) as Caffe's Solver::Snapshot; returns (weights path, state path)."""
        p = self.param
        prefix = p.snapshot_prefix
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            model = snapshot_io.snapshot_filename(prefix, self.iter, ".caffemodel.h5")
            log.info("Snapshotting to HDF5 file %s", model)
            snapshot_io.write_caffemodel_hdf5(self.net, model, p.snapshot_diff)
            state_path = snapshot_io.snapshot_filename(prefix, self.iter, ".solverstate.h5")
            log.info("Snapshotting solver state to HDF5 file %s", state_path)
            history = [t.detach().cpu().numpy() for t in self.history_blobs()]
            snapshot_io.write_solver_state_hdf5(self.solver_state(model, with_history=False), history, state_path)
        else:
            model = snapshot_io.snapshot_filename(prefix, self.iter, ".caffemodel")
            log.info("Snapshotting to binary proto file %s", model)
            snapshot_io.write_caffemodel(self.net, model, p.snapshot_diff)
            state_path = snapshot_io.snapshot_filename(prefix, self.iter, ".solverstate")
            log.info("Snapshotting solver state to binary proto file %s", state_path)
            snapshot_io.write_solver_state(self.solver_state(model), state_path)
        return model, state_path

    def solver_state(self, learned_net: str | None = None, with_history: bool = True) -> caffe_pb2.SolverState:
        """The SolverState Caffe writes: iter, learned_net, history blobs, current_step."""
        state = caffe_pb2.SolverState(iter=self.iter, current_step=self.current_step)
        if learned_net is not None:
            state.learned_net = learned_net
        if with_history:
            for t in self.history_blobs():
                tensor_to_blob_proto(t, state.history.add())
        return state

    def restore(self, path: str) -> None:
        """Restore iter, current_step, history and (if the state names one) the weights from a
        .solverstate or .solverstate.h5 (Caffe's Solver::Restore)."""
        data = snapshot_io.read_solver_state(path)
        self.iter = data.iter
        if data.learned_net is not None:
            snapshot_io.load_weights(self.net, snapshot_io.resolve_learned_net(data.learned_net, path))
        self.current_step = data.current_step
        self.set_history(data.history, source=path, exact_shapes=data.exact_shapes)

    def restore_state(self, state: caffe_pb2.SolverState) -> None:
        """Restore iter, current_step and history from an in-memory SolverState (no weights)."""
        self.iter = state.iter
        self.current_step = state.current_step
        self.set_history([snapshot_io.blob_proto_array(bp) for bp in state.history], source="<solver state>")

    def replace_nets(self, net: Net, test_nets: list[Net], history: list[np.ndarray]) -> None:
        """Continue with rebuilt nets (pruning shrinks them): `history` is given in Caffe's order for
        the new train net (see history_blobs); per-parameter lr_mult/decay_mult are recomputed."""
        self.net, self.test_nets = net, test_nets
        for n in [net, *test_nets]:
            n.set_autocast(self._autocast)
        self._pre_solve()
        self.set_history(history, source="<pruned solver state>", exact_shapes=True)

    def set_history(self, arrays: list[np.ndarray], source: str = "", exact_shapes: bool = False) -> None:
        """Load history blobs given in Caffe's order (see history_blobs)."""
        targets = self.history_blobs()
        where = f"{source}: " if source else ""
        if len(arrays) != len(targets):
            raise UserError(f"{where}Incorrect length of history blobs: the state has {len(arrays)}, the "
                            f"{self.type} solver needs {len(targets)} ({self.history_sets} per parameter blob)")
        log.info("SGDSolver: restoring history")
        for i, (a, t) in enumerate(zip(arrays, targets)):
            a = np.asarray(a, dtype=np.float32)
            ok = tuple(a.shape) == tuple(t.shape) if exact_shapes else a.size == t.numel()
            if not ok:
                raise UserError(f"{where}history blob {i} has shape {tuple(a.shape)}, the net's parameter has "
                                f"{tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(torch.from_numpy(a.reshape(t.shape)))


class SGDSolver(Solver):
    """Caffe's SGDSolver: history = momentum * history + local_rate * diff; the update is history."""

    type = "SGD"

    def _compute_update_value(self, g, local_rate) -> None:
        h = self.history[0]
        g.mul_(local_rate)
        h.mul_(float(_f32(self.param.momentum))).add_(g)
        g.copy_(h)


class NesterovSolver(SGDSolver):
    """Caffe's NesterovSolver: momentum SGD stepping back and over the momentum."""

    type = "Nesterov"

    def _compute_update_value(self, g, local_rate) -> None:
        h = self.history[0]
        m = _f32(self.param.momentum)
        back = h * float(-m)
        g.mul_(local_rate)
        h.mul_(float(m)).add_(g)
        g.copy_(h).mul_(float(_f32(1) + m)).add_(back)


class AdaGradSolver(SGDSolver):
    """Caffe's AdaGradSolver: history += diff^2; update = local_rate * diff / (sqrt(history) + delta)."""

    type = "AdaGrad"

    def _check_params(self) -> None:
        super()._check_params()
        if self.param.momentum != 0:
            raise self._err("Momentum cannot be used with AdaGrad.")

    def _compute_update_value(self, g, local_rate) -> None:
        h = self.history[0]
        h.add_(g * g)
        g.div_(h.sqrt().add_(float(_f32(self.param.delta)))).mul_(local_rate)


class RMSPropSolver(SGDSolver):
    """Caffe's RMSPropSolver: a running mean of diff^2 (rms_decay) scales the step."""

    type = "RMSProp"

    def _check_params(self) -> None:
        super()._check_params()
        if self.param.momentum != 0:
            raise self._err("Momentum cannot be used with RMSProp.")
        if not 0 <= self.param.rms_decay < 1:
            raise self._err(f"rms_decay should lie between 0 and 1 (got {self.param.rms_decay:g}).")

    def _compute_update_value(self, g, local_rate) -> None:
        h = self.history[0]
        decay = _f32(self.param.rms_decay)
        h.mul_(float(decay)).add_((g * g).mul_(float(_f32(1) - decay)))
        g.div_(h.sqrt().add_(float(_f32(self.param.delta)))).mul_(local_rate)


class AdaDeltaSolver(SGDSolver):
    """Caffe's AdaDeltaSolver: running means of diff^2 and update^2 (history sets 1 and 2)."""

    type = "AdaDelta"
    history_sets = 2

    def _compute_update_value(self, g, local_rate) -> None:
        h_grad, h_update = self.history
        m = _f32(self.param.momentum)
        delta = float(_f32(self.param.delta))
        one_minus = float(_f32(1) - m)
        h_grad.mul_(float(m)).add_((g * g).mul_(one_minus))
        g.mul_((h_update + delta).div_(h_grad + delta).sqrt_())
        h_update.mul_(float(m)).add_((g * g).mul_(one_minus))
        g.mul_(local_rate)


class AdamSolver(SGDSolver):
    """Caffe's AdamSolver: moments m (momentum) and v (momentum2), bias correction with t = iter + 1."""

    type = "Adam"
    history_sets = 2

    def _compute_update_value(self, g, local_rate) -> None:
        m, v = self.history
        beta1 = _f32(self.param.momentum)
        beta2 = _f32(self.param.momentum2)
        t = self.iter + 1
        # Caffe: pow(float, int) runs in double; the quotient is stored in Dtype
        correction = _f32(np.sqrt(1.0 - np.float64(beta2) ** t) / (1.0 - np.float64(beta1) ** t))
        m.mul_(float(beta1)).add_(g * float(_f32(1) - beta1))
        v.mul_(float(beta2)).add_((g * g).mul_(float(_f32(1) - beta2)))
        if isinstance(local_rate, torch.Tensor):
            scale = local_rate * float(correction)
        else:
            scale = float(_f32(local_rate) * correction)
        g.copy_(m.div(v.sqrt().add_(float(_f32(self.param.delta))))).mul_(scale)


SOLVERS: dict[str, type[Solver]] = {cls.type: cls for cls in (
    SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)}


def get_solver(param: caffe_pb2.SolverParameter | str, solver_path: str | None = None,
               device: torch.device | str = "cpu", rank: int = 0,
               shown: caffe_pb2.SolverParameter | None = None, precision: str = "fp32") -> Solver:
    """The solver of `param.type` (Caffe's SolverRegistry::CreateSolver).

    `param` may be a path to a solver prototxt. `rank` is added to random_seed, as Caffe adds the
    solver rank. `precision`: see Solver. Raises UserError for an unknown type.
    """
    if isinstance(param, str):
        solver_path = param
        param = prototxt.read_solver(param)
    elif upgrade.solver_needs_upgrade(param):
        param, lines = upgrade.upgrade_solver(param, solver_path or "<solver>")
        for line in lines:
            log.info(line)
    cls = SOLVERS.get(param.type)
    if cls is None:
        raise UserError(f"{solver_path or '<solver>'}: Unknown solver type: {param.type} "
                        f"(known types: {', '.join(sorted(SOLVERS))})")
    return cls(param, solver_path, device, rank, shown, precision)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for off, n in ranges:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1][1] += n
        else:
            merged.append([off, n])
    return [(o, n) for o, n in merged]
