"""The `mpicaffe` command: subcommands named and flagged as Caffe's `caffe` tool names them.

Caffe's single-dash gflags spellings (`-solver S`, `-weights=W`) are accepted too. User errors
print one clear message and exit with status 1, without a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback

from mpicaffe import __version__, signals
from mpicaffe.backends import BACKENDS
from mpicaffe.errors import UserError
from mpicaffe.logs import setup_logging
from mpicaffe.parallel.comm import RankError
from mpicaffe.parallel.stall import STALL_EXIT_CODE
from mpicaffe.signals import EFFECTS, STOPPED_EXIT_CODE

log = logging.getLogger(__name__)

_GFLAG = re.compile(r"^-([A-Za-z][A-Za-z0-9_]+)(=.*)?$")


def normalize_argv(argv: list[str]) -> list[str]:
    """Turn gflags-style `-name[=value]` into `--name[=value]` (underscores become dashes),
    leaving everything after a bare `--` untouched."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        m = _GFLAG.match(arg)
        if m:
            arg = "--" + m.group(1).replace("_", "-") + (m.group(2) or "")
        elif arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def _int_at_least(low: int):
    """An argparse type: an integer of at least `low` (Caffe's -iterations: 1)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(
                f"must be a positive integer (got {value})" if low == 1 else f"must be {low} or more (got {value})")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _cmd_info(args: argparse.Namespace) -> int:
    from mpicaffe import info

    table, error = info.describe(args.net, args.phase, args.level, args.stage)
    print(table, end="", flush=True)
    if error:
        raise UserError(f"the net cannot be built: {error}")
    return 0


def _cmd_draw(args: argparse.Namespace) -> int:
    from mpicaffe import draw, prototxt

    output = args.output or args.output_file
    if not output or (args.output and args.output_file and args.output != args.output_file):
        raise UserError("give one output file: -o FILE.png (or .svg, .pdf, .dot)")
    problem = draw.cannot_draw_to(output)
    if problem:
        raise UserError(problem)
    net = prototxt.read_net(args.net)
    phase = None if args.phase == "ALL" else prototxt.phase_from_name(args.phase)
    print(f"Drawing net to {output}", flush=True)
    try:
        draw.draw_net_to_file(net, output, args.rankdir, phase, args.display_lrm)
    except (OSError, ValueError, AssertionError) as e:  # pydot asserts when dot fails
        raise UserError(f"cannot draw {args.net} to {output}: {e}") from None
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from mpicaffe import plot

    plot.plot_files(args.files, args.output, labels=args.label, x=args.x, breakdown=args.breakdown)
    print(f"Plotted {len(args.files)} file(s) to {args.output}", flush=True)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mpicaffe.data import convert

    return convert.run(args)


def _cmd_prune(args: argparse.Namespace) -> int:
    from mpicaffe.prune import command

    return command.run(args)


def _apoptosis_config(args: argparse.Namespace):
    if not args.prune_every:
        return None
    from mpicaffe.prune.apoptosis import ApoptosisConfig

    return ApoptosisConfig(args.prune_every, args.prune_criterion, args.prune_target, args.prune_step,
                           args.prune_samples)


GPU_RANKS_ENV = "MPICAFFE_GPU_RANKS"  # set in the ranks `-gpu 0,1` started, so they do not start more


def _gpu_ranks(gpu: str | None) -> int:
    """How many ranks `train -gpu 0,1` (or `all`) run outside mpirun: one per listed GPU, as
    Caffe's multi-GPU training; 0 when one process trains (one GPU, none, or already ranks)."""
    from mpicaffe.parallel.comm import launched_by_mpi

    if gpu is None or launched_by_mpi() or os.environ.get(GPU_RANKS_ENV):
        return 0
    from mpicaffe.devices import gpu_ids

    ranks = len(gpu_ids(gpu))
    return ranks if ranks > 1 else 0


def gpu_ranks_command(ranks: int, argv: list[str]) -> list[str]:
    """The mpirun command that runs `mpicaffe <argv>` as `ranks` ranks on this node (each takes
    its local rank's GPU of the -gpu list)."""
    root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return ["mpirun", "-np", str(ranks), *root, "-x", GPU_RANKS_ENV, sys.executable, "-m", "mpicaffe", *argv]


def _cmd_train(args: argparse.Namespace) -> int:
    from mpicaffe import trainer
    from mpicaffe.config import TrainConfig
    from mpicaffe.parallel.comm import create_communicator

    ranks = _gpu_ranks(args.gpu)
    if ranks:  # Caffe's `caffe train -gpu 0,1`: one rank per GPU, through mpirun
        command = gpu_ranks_command(ranks, args.argv)
        log.info("-gpu %s: starting %d ranks, one per GPU: %s", args.gpu, ranks, " ".join(command))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(command[0], command, {**os.environ, GPU_RANKS_ENV: "1"})
    # signals count from here to the exit, start-up included (mpicaffe.signals)
    signals.catch()
    signals.reached("start")
    comm = create_communicator()
    # rank 0 alone logs progress; the others report warnings and errors
    _setup_logging(args, quiet=comm.rank != 0)
    if "OMP_NUM_THREADS" not in os.environ:
        # ranks sharing a node share its cores, rather than each starting one thread per core
        import torch

        threads = max(1, (os.cpu_count() or 1) // comm.local_size)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries loaded later (Caffe's BLAS)
    cfg = TrainConfig(
        solver=args.solver, weights=args.weights, snapshot=args.snapshot, gpu=args.gpu, level=args.level,
        stages=args.stage, global_batch=args.global_batch, scale_lr=args.scale_lr, overlap=not args.no_overlap,
        bucket_mb=args.bucket_mb, check_every=args.check_every, metrics=args.metrics, timeline=args.timeline,
        timeline_iters=args.timeline_iters, backend=args.backend, shard_cache=args.shard_cache,
        fault_tolerance=args.fault_tolerance, stall_timeout=args.stall_timeout, apoptosis=_apoptosis_config(args),
        resume=args.resume, snapshot_every_minutes=args.snapshot_every_minutes, keep_snapshots=args.keep_snapshots,
        sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect, stage_data=args.stage_data,
        data_workers=args.data_workers,
        devices=args.devices, balance=args.balance, balance_iters=args.balance_iters,
        on_divergence=args.on_divergence, divergence_lr_factor=args.divergence_lr_factor,
        divergence_retries=args.divergence_retries, comm=args.comm, precision=args.precision)
    try:
        stopped = trainer.train(cfg, comm).stopped_early
    except RankError:
        raise
    except BaseException as e:
        if comm.size > 1:
            # the other ranks may be waiting in a collective: stop them all (ChainerMN's hook)
            print(f"mpicaffe train: rank {comm.rank}: error: {e}", file=sys.stderr)
            if not isinstance(e, UserError | KeyboardInterrupt):
                traceback.print_exc()
            comm.abort(1)
        raise
    code = args.signal_exit_code if stopped else 0
    signals.reached("exit")
    late = signals.pending()
    if late and not stopped:
        log.warning(
            "rank %d: %s arrived after the last iteration: the run had finished, exiting with status 0",
            comm.rank, " and ".join(late))
    if comm.shrunk:
        comm.exit_without_finalize(code)
    return code


def _cmd_launch(args: argparse.Namespace) -> int:
    from mpicaffe import supervisor

    return supervisor.launch(supervisor.config_from_args(args))


def _cmd_test(args: argparse.Namespace) -> int:
    from mpicaffe import score
    from mpicaffe.devices import select_device

    if not args.weights:  # caffe test's refusal: random weights would be scored
        raise UserError("Need model weights to score (--weights W.caffemodel)")
    score.score(args.model, args.weights, args.iterations, device=select_device(args.gpu),
                level=args.level, stages=args.stage, precision=args.precision)
    return 0


def _cmd_device_query(args: argparse.Namespace) -> int:
    from mpicaffe.devices import device_query

    for line in device_query(args.gpu):
        log.info("%s", line)
    return 0


def _cmd_time(args: argparse.Namespace) -> int:
    from mpicaffe import timing
    from mpicaffe.devices import select_device

    timing.time_net(args.model, args.iterations, phase=args.phase, device=select_device(args.gpu),
                    weights=args.weights, level=args.level, stages=args.stage, precision=args.precision)
    return 0


class _Stages(argparse.Action):
    """--stage a,b (Caffe's -stage: stages separated by ','), repeatable: every stage, in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), *(s for s in values.split(",") if s)])


def _add_precision(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help=f"built-in engine: fp32 (default, Caffe's arithmetic); {what} (see docs/engine.md)")


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    p.add_argument("--stage", action=_Stages, default=[], metavar="STAGE[,STAGE...]",
                   help="NetState stages, separated by ',' as in Caffe's -stage (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpicaffe",
        description="Train unmodified Caffe models data-parallel under mpirun.",
    )
    parser.add_argument("--version", action="version", version=f"mpicaffe {__version__}")
    _add_logging(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train a model from a solver prototxt (caffe train)")
    p.add_argument("--solver", required=True, help="solver prototxt")
    p.add_argument("--weights", help="finetune from these .caffemodel(.h5) weights (comma-separated list)")
    p.add_argument("--snapshot", help="resume from this .solverstate(.h5)")
    p.add_argument("--gpu", help="GPU id to use (default: the CPU, or the solver's solver_mode/device_id)")
    p.add_argument("--global-batch", type=int, metavar="G",
                   help="keep the global batch at G, split across the ranks (default: every rank keeps the "
                        "prototxt's batch, so the global batch is ranks x batch)")
    p.add_argument("--scale-lr", action="store_true",
                   help="linear scaling rule: multiply base_lr by global batch / prototxt batch")
    p.add_argument("--metrics", metavar="FILE",
                   help="write JSON-lines metrics per iteration ({rank} in FILE, or FILE.rank<N> for ranks > 0)")
    p.add_argument("--timeline", metavar="FILE", help="write a Chrome-trace JSON of each rank's phases")
    p.add_argument("--timeline-iters", type=int, default=10, metavar="K",
                   help="trace the first and last K iterations (default 10)")
    p.add_argument("--check-every", type=int, default=100, metavar="N",
                   help="compare a checksum of the weights across ranks every N iterations (0: only at the end)")
    p.add_argument("--no-overlap", action="store_true",
                   help="average gradients in one allreduce after backward instead of buckets during it")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="gradient bucket size in MiB (default 1)")
    p.add_argument("--backend", choices=BACKENDS, default="engine",
                   help="engine: the built-in engine (default); caffe: real BVLC Caffe through pycaffe (CPU); "
                        "auto: real Caffe when pycaffe is importable, else the engine")
    p.add_argument("--shard-cache", metavar="DIR",
                   help="with --backend caffe and several ranks: where each rank keeps its local copy of its data "
                        "shard (default $MPICAFFE_SHARD_CACHE, else the user's private <temporary folder>/mpicaffe-shards-<uid>)")
    p.add_argument("--devices", metavar="LIST",
                   help="built-in engine: each rank's device, one per rank in rank order (cuda:0,cuda:1,cpu) or one "
                        "for all (default: --gpu, or the solver's solver_mode by local rank)")
    _add_precision(p, "bf16 or fp16 run forward and backward under autocast, weights, gradients and the "
                      "update in float32; fp16 with dynamic loss scaling")
    p.add_argument("--comm", choices=("mpi", "nccl", "gloo", "auto"), default="mpi",
                   help="built-in engine: what averages the gradient buckets: mpi (default); nccl or gloo, a "
                        "torch.distributed process group set up over MPI (nccl: every rank on a CUDA device); auto: "
                        "nccl when every rank is on a CUDA device with NCCL, else mpi (see docs/gpu.md)")
    p.add_argument("--balance", choices=("none", "auto"), default="none",
                   help="auto (built-in engine): after --balance-iters iterations, give each rank a batch "
                        "proportional to its measured speed, keeping the global batch and the update")
    p.add_argument("--balance-iters", type=int, default=10, metavar="K",
                   help="iterations timed before --balance auto re-splits the batch (default 10)")
    p.add_argument("--stage-data", metavar="DIR",
                   help="copy each rank's shard of every LMDB (train and test Data layers) into DIR, node-local "
                        "storage such as /dev/shm, before training and read it there; a later run with the same "
                        "data and ranks reuses the copies (with --backend caffe: the shard cache folder)")
    p.add_argument("--data-workers", type=_non_negative_int, metavar="N",
                   help="built-in engine: threads that decode and transform each batch of the Data and ImageData "
                        "layers; the batches are the same for any N (default: the rank's share of the node's cores, "
                        "cores // ranks on the node; 0: in the prefetch thread)")
    p.add_argument("--fault-tolerance", choices=("none", "ulfm"), default="none",
                   help="ulfm (run under `mpirun --with-ft ulfm`, built-in engine): when a rank dies, the others "
                        "shrink to the survivors, redo the interrupted iteration with the same global batch and "
                        "go on, without a restart")
    p.add_argument("--stall-timeout", type=float, default=0.0, metavar="S",
                   help="when a rank has not reached a collective for S seconds, name it, snapshot the last good "
                        f"state and abort the job with exit code {STALL_EXIT_CODE} (default 0: wait forever)")
    prune = p.add_argument_group("pruning during training (built-in engine; see mpicaffe.prune.apoptosis)")
    prune.add_argument("--prune-every", type=int, default=0, metavar="K",
                       help="every K iterations remove the least useful channels of every prunable layer (default 0: never)")
    prune.add_argument("--prune-criterion", default="apoptosis", choices=("l1", "l2", "activation", "apoptosis"),
                       help="how channels are ranked (default apoptosis: near-constant or duplicated neurons first)")
    prune.add_argument("--prune-target", type=float, default=0.75, metavar="F",
                       help="stop once this fraction of the starting parameters and multiply-adds is removed "
                            "(default 0.75)")
    prune.add_argument("--prune-step", type=float, default=0.25, metavar="F",
                       help="largest fraction of each layer's channels removed at one time (default 0.25)")
    prune.add_argument("--prune-samples", type=int, default=5, metavar="N",
                       help="training batches the activation criteria look at, on rank 0 (default 5)")
    snap = p.add_argument_group("snapshots and signals (see mpicaffe.snapshot, mpicaffe.signals)")
    snap.add_argument("--resume", choices=("auto",),
                      help="auto: resume from the newest snapshot of <snapshot_prefix>.manifest.json whose checksums "
                           "verify (skipping, with a warning, any that do not); with none, start fresh (or from "
                           "--snapshot/--weights)")
    snap.add_argument("--snapshot-every-minutes", type=float, default=0.0, metavar="M",
                      help="also snapshot when M minutes passed since the last snapshot (rank 0's clock decides)")
    snap.add_argument("--keep-snapshots", type=int, default=0, metavar="K",
                      help="keep only the newest K snapshots of the manifest, deleting older ones (default 0: all)")
    snap.add_argument("--sigint-effect", choices=EFFECTS, default="stop",
                      help="what SIGINT does at the next iteration boundary (Caffe's -sigint_effect; default stop)")
    snap.add_argument("--sighup-effect", choices=EFFECTS, default="snapshot",
                      help="what SIGHUP does (Caffe's -sighup_effect; default snapshot). SIGTERM and SIGUSR1 "
                           "always snapshot and stop")
    snap.add_argument("--signal-exit-code", type=int, default=STOPPED_EXIT_CODE, choices=range(256), metavar="N",
                      help=f"exit status of a run a signal stopped, after its snapshot (default {STOPPED_EXIT_CODE}: "
                           "stopped, not finished, as `mpicaffe launch` and the Slurm script expect; 0: Caffe's)")
    div = p.add_argument_group("divergence (a non-finite loss or weights; see docs/fault-tolerance.md)")
    div.add_argument("--on-divergence", choices=("stop", "rollback"), default="stop",
                     help="stop: exit 1 naming the iteration and the first layer that went non-finite (default); "
                          "rollback: go back to the newest verified snapshot with a smaller learning rate")
    div.add_argument("--divergence-lr-factor", type=float, default=0.1, metavar="F",
                     help="rollback: multiply base_lr by F at each rollback (default 0.1)")
    div.add_argument("--divergence-retries", type=int, default=3, metavar="N",
                     help="rollback: at most N rollbacks in a run, then stop (default 3)")
    _add_state(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("test", help="score a model in the TEST phase (caffe test)")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--weights", help="trained .caffemodel(.h5)")
    p.add_argument("--iterations", type=_positive_int, default=50, help="number of batches (default 50)")
    p.add_argument("--gpu", help="GPU id to use (default: the CPU)")
    _add_precision(p, "bf16 or fp16 run the forward under autocast, as train --precision does")
    _add_state(p)
    p.set_defaults(func=_cmd_test)

    p = sub.add_parser("device_query", help="show the GPUs' properties (caffe device_query)")
    p.add_argument("--gpu", help="GPU ids to query: 0, 0,1 or all")
    p.set_defaults(func=_cmd_device_query)

    p = sub.add_parser("time", help="time a net's forward and backward passes per layer (caffe time)")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--weights", help="optional .caffemodel(.h5)")
    p.add_argument("--iterations", type=_positive_int, default=50, help="number of iterations (default 50)")
    p.add_argument("--phase", default="TRAIN", help="TRAIN or TEST (default TRAIN)")
    p.add_argument("--gpu", help="GPU id to use (default: the CPU)")
    _add_precision(p, "bf16 or fp16 time forward and backward under autocast, as train --precision runs them")
    _add_state(p)
    p.set_defaults(func=_cmd_time)

    p = sub.add_parser("info", help="print a net's layers as Caffe builds them for a phase")
    p.add_argument("net", help="net prototxt (text) or .caffemodel (binary)")
    p.add_argument("--phase", default="TRAIN", help="TRAIN or TEST (default TRAIN)")
    _add_state(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("draw", help="draw a net as a graph image with graphviz (Caffe's draw_net.py)")
    p.add_argument("net", help="net prototxt (text) or .caffemodel (binary)")
    p.add_argument("output_file", nargs="?", help=argparse.SUPPRESS)  # draw_net.py's positional output
    p.add_argument("-o", "--output", metavar="FILE", help="image to write; its extension is the format "
                   "(.png, .svg, .pdf, .dot, ...)")
    p.add_argument("--rankdir", choices=("LR", "TB", "BT", "RL"), default="LR",
                   help="layout direction: LR (left to right, default), TB (top to bottom), BT, RL")
    p.add_argument("--phase", type=str.upper, choices=("TRAIN", "TEST", "ALL"), default="ALL",
                   help="draw the layers of this phase only (default ALL: every layer)")
    p.add_argument("--display-lrm", action="store_true",
                   help="show the lr_mult of Convolution, Deconvolution and InnerProduct layers")
    p.set_defaults(func=_cmd_draw)

    p = sub.add_parser("plot", help="draw learning curves (loss, test outputs, lr) from Caffe logs or --metrics files")
    p.add_argument("files", nargs="+", metavar="LOG_OR_METRICS",
                   help="logs of `mpicaffe train` or `caffe train` (glog lines), or `mpicaffe train --metrics` files")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="image to write; its extension is the format (.png, .svg, .pdf)")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="name of each file's lines in the legend, in order, once per file (default: the file names)")
    p.add_argument("--x", choices=("iterations", "seconds"), default="iterations",
                   help="horizontal axis: iterations (default) or seconds since Solving (logs) or summed "
                        "iteration times (metrics)")
    p.add_argument("--breakdown", action="store_true",
                   help="instead of curves, stacked bars per rank of mean ms per iteration in compute, data wait, "
                        "communication and update, from --metrics files (each rank's)")
    p.set_defaults(func=_cmd_plot)

    from mpicaffe.data import convert

    p = sub.add_parser("convert", help="write Caffe LMDB datasets and mean files")
    convert.add_arguments(p)
    p.set_defaults(func=_cmd_convert)

    from mpicaffe.prune import arguments as prune_arguments

    p = sub.add_parser("prune", help="remove channels from a trained net: smaller prototxt, weights, solver state")
    prune_arguments.add_arguments(p)
    p.set_defaults(func=_cmd_prune)

    # `main` hands `python ...` to mpicaffe.run before parsing: the script's arguments stay as given
    p = sub.add_parser("python", help="run an unmodified pycaffe script (`import caffe` is mpicaffe's), "
                                      "data-parallel under mpirun")
    p.add_argument("script", help="the Python script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")

    from mpicaffe import supervisor

    p = sub.add_parser("launch", help="run `mpicaffe train` under mpirun, relaunching it on failure (--resume auto)")
    supervisor.add_arguments(p)
    p.set_defaults(func=_cmd_launch)
    _add_logging_to_commands(sub)  # before or after the command, as gflags takes them
    return parser


def _add_logging_to_commands(sub: argparse._SubParsersAction) -> None:
    for p in sub.choices.values():
        _add_logging(p)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):  # `convert digits ...`
                _add_logging_to_commands(action)


def _add_logging(p: argparse.ArgumentParser) -> None:
    """glog's flags (they override its GLOG_* variables). No defaults: a subcommand's would replace
    a value given before the command."""
    group = p.add_argument_group("logging (glog's flags and GLOG_* variables)")
    default = argparse.SUPPRESS
    group.add_argument("--verbose", action="store_true", default=default, help="log debug messages")
    group.add_argument("--minloglevel", type=int, choices=range(4), default=default, metavar="N",
                       help="log nothing below severity N: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL "
                            "(default $GLOG_minloglevel, else 0)")
    group.add_argument("--log-dir", default=default, metavar="DIR",
                       help="also write glog's log files there: mpicaffe.INFO, .WARNING, .ERROR (default $GLOG_log_dir)")
    group.add_argument("--logtostderr", action="store_true", default=default,
                       help="log to stderr only, no files (default $GLOG_logtostderr)")


def _setup_logging(args: argparse.Namespace, quiet: bool = False) -> None:
    log_dir = getattr(args, "log_dir", None)
    if log_dir and not (os.path.isdir(log_dir) and os.access(log_dir, os.W_OK)):
        raise UserError(f"--log-dir {log_dir}: not a folder this user can write")
    setup_logging(getattr(args, "verbose", False), quiet=quiet, minloglevel=getattr(args, "minloglevel", None),
                  log_dir=log_dir, logtostderr=getattr(args, "logtostderr", None))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status. As the program (`argv` None), `train` keeps
    counting signals until the process exits (MPI finalize included); called with `argv`, the
    previous handlers are back when it returns."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["python"] and argv[1:2] not in (["-h"], ["--help"]):
        from mpicaffe import run

        return run.main(argv[1:])
    argv = normalize_argv(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        _setup_logging(args)
        return args.func(args)
    except RankError as e:
        # raised alike on every rank: one message is enough
        if e.rank == 0:
            print(f"mpicaffe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"mpicaffe {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mpicaffe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if not as_program:
            signals.release()
