"""The `mpicaffe` command: subcommands named and flagged as Caffe's `caffe` tool names them.

Caffe's single-dash gflags spellings (`-solver S`, `-weights=W`) are accepted too. User errors
print one clear message and exit with status 1, without a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

from mpicaffe import __version__
from mpicaffe.backends import BACKENDS
from mpicaffe.comm import RankError
from mpicaffe.errors import UserError
from mpicaffe.logs import setup_logging

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


def _cmd_info(args: argparse.Namespace) -> int:
    from mpicaffe import info

    print(info.describe(args.net, args.phase, args.level, args.stage), end="")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mpicaffe.data import convert

    return convert.run(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from mpicaffe import trainer
    from mpicaffe.comm import create_communicator

    comm = create_communicator()
    # rank 0 alone logs progress; the others report warnings and errors
    setup_logging(args.verbose, quiet=comm.rank != 0)
    if "OMP_NUM_THREADS" not in os.environ:
        # ranks sharing a node share its cores, rather than each starting one thread per core
        import torch

        threads = max(1, (os.cpu_count() or 1) // comm.local_size)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries loaded later (Caffe's BLAS)
    cfg = trainer.TrainConfig(
        solver=args.solver, weights=args.weights, snapshot=args.snapshot, gpu=args.gpu, level=args.level,
        stages=args.stage, global_batch=args.global_batch, scale_lr=args.scale_lr, overlap=not args.no_overlap,
        bucket_mb=args.bucket_mb, check_every=args.check_every, metrics=args.metrics, timeline=args.timeline,
        timeline_iters=args.timeline_iters, backend=args.backend, shard_cache=args.shard_cache)
    try:
        trainer.train(cfg, comm)
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
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from mpicaffe import score
    from mpicaffe.devices import select_device

    score.score(args.model, args.weights, args.iterations, device=select_device(args.gpu),
                level=args.level, stages=args.stage)
    return 0


def _cmd_time(args: argparse.Namespace) -> int:
    from mpicaffe import timing
    from mpicaffe.devices import select_device

    timing.time_net(args.model, args.iterations, phase=args.phase, device=select_device(args.gpu),
                    weights=args.weights, level=args.level, stages=args.stage)
    return 0


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    p.add_argument("--stage", action="append", default=[], help="NetState stage (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpicaffe",
        description="Train unmodified Caffe models data-parallel under mpirun.",
    )
    parser.add_argument("--version", action="version", version=f"mpicaffe {__version__}")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
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
                        "shard (default $MPICAFFE_SHARD_CACHE, else <temporary folder>/mpicaffe-shards)")
    _add_state(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("test", help="score a model in the TEST phase (caffe test)")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--weights", help="trained .caffemodel(.h5)")
    p.add_argument("--iterations", type=int, default=50, help="number of batches (default 50)")
    p.add_argument("--gpu", help="GPU id to use (default: the CPU)")
    _add_state(p)
    p.set_defaults(func=_cmd_test)

    p = sub.add_parser("time", help="time a net's forward and backward passes per layer (caffe time)")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--weights", help="optional .caffemodel(.h5)")
    p.add_argument("--iterations", type=int, default=50, help="number of iterations (default 50)")
    p.add_argument("--phase", default="TRAIN", help="TRAIN or TEST (default TRAIN)")
    p.add_argument("--gpu", help="GPU id to use (default: the CPU)")
    _add_state(p)
    p.set_defaults(func=_cmd_time)

    p = sub.add_parser("info", help="print a net's layers as Caffe builds them for a phase")
    p.add_argument("net", help="net prototxt (text) or .caffemodel (binary)")
    p.add_argument("--phase", default="TRAIN", help="TRAIN or TEST (default TRAIN)")
    _add_state(p)
    p.set_defaults(func=_cmd_info)

    from mpicaffe.data import convert

    p = sub.add_parser("convert", help="write Caffe LMDB datasets and mean files")
    convert.add_arguments(p)
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
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
