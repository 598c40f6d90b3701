"""What `mpicaffe train` was asked to do (TrainConfig), and the checks of flags against each other."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from mpicaffe.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """The options of one training run, as the command line gave them (built once, by the CLI
    or a caller of mpicaffe.trainer.train, and not changed afterwards)."""

    solver: str
    weights: str | None = None
    snapshot: str | None = None
    gpu: str | None = None
    level: int = 0
    stages: list[str] = field(default_factory=list)
    global_batch: int | None = None
    scale_lr: bool = False
    overlap: bool = True
    bucket_mb: float = 1.0
    check_every: int = 100
    metrics: str | None = None
    timeline: str | None = None
    timeline_iters: int = 10
    backend: str = "engine"
    shard_cache: str | None = None
    fault_tolerance: str = "none"  # "ulfm": survive rank failures in-run (mpicaffe.parallel.recovery)
    stall_timeout: float = 0.0     # > 0: report a stalled rank and abort after this many seconds (mpicaffe.parallel.stall)
    apoptosis: object | None = None  # mpicaffe.prune.apoptosis.ApoptosisConfig (--prune-every): shrink while training
    resume: str | None = None           # "auto": the newest verified snapshot of the manifest (mpicaffe.snapshot)
    snapshot_every_minutes: float = 0.0  # > 0: also snapshot when this much time passed since the last one
    keep_snapshots: int = 0             # > 0: delete all but the newest K snapshots of the manifest
    sigint_effect: str = "stop"         # Caffe's --sigint_effect: snapshot, stop or none
    sighup_effect: str = "snapshot"     # Caffe's --sighup_effect
    stage_data: str | None = None       # copy each rank's LMDB shards here first (mpicaffe.data.staging)
    data_workers: int | None = None     # engine: threads decoding each batch; None: cores // local ranks (layers.base_data)
    devices: str | None = None          # per-rank devices "cuda:0,cpu,..." or one for all (mpicaffe.devices)
    comm: str = "mpi"                   # what averages the gradients: mpi, nccl, gloo or auto (mpicaffe.parallel.process_group)
    balance: str = "none"               # "auto": per-rank batches by measured speed (mpicaffe.balance)
    balance_iters: int = 10             # iterations measured before balancing
    on_divergence: str = "stop"         # a non-finite loss or weights: "stop", or "rollback" to the last snapshot
    divergence_lr_factor: float = 0.1   # rollback: base_lr is multiplied by this each time
    divergence_retries: int = 3         # rollback: at most this many times, then stop
    precision: str = "fp32"             # engine: fp32, or bf16/fp16 autocast (mpicaffe.backends.engine.precision)

    def shared_options(self) -> dict[str, object]:
        """The options every rank must be given alike (the ranks compare them at start): all but
        the file paths, which may differ between nodes while naming the same contents (the
        solver's and nets' contents are compared separately)."""
        return {f.name: repr(getattr(self, f.name)) for f in fields(self) if f.name not in _PER_NODE}

    def check(self, backend: str, ranks: int) -> None:
        """Refuse flags that cannot go together, for `backend` (resolved: 'engine' or 'caffe') on
        `ranks` ranks. The checks of one flag's own value stay with the component it configures."""
        if self.weights and self.snapshot:
            raise UserError("give a snapshot to resume training or weights to finetune, but not both")
        if self.global_batch is not None and self.global_batch < ranks:
            raise UserError(f"--global-batch {self.global_batch} is smaller than the number of ranks ({ranks})")
        if self.devices and self.gpu is not None:
            raise UserError("give --gpu or --devices, not both")
        if self.comm not in ("mpi", "nccl", "gloo", "auto"):
            raise UserError(f"--comm {self.comm}: expected mpi, nccl, gloo or auto")
        if self.comm in ("nccl", "gloo"):
            if backend == "caffe":
                raise UserError(f"--comm {self.comm} needs the built-in engine (--backend engine): the Caffe backend "
                                "averages its gradients with MPI")
            if self.fault_tolerance == "ulfm":
                raise UserError(f"--comm {self.comm} cannot be combined with --fault-tolerance ulfm: ULFM recovers MPI "
                                "communicators, and a torch.distributed process group cannot shrink; use --comm mpi")
        if backend == "caffe":
            if self.devices:
                raise UserError(f"--devices {self.devices}: the Caffe backend runs Caffe in CPU mode on every rank; "
                                "use --backend engine for per-rank devices")
            if self.gpu:
                raise UserError(f"--gpu {self.gpu}: the Caffe backend runs Caffe in CPU mode; use --backend engine "
                                "to train on GPUs")
            if self.precision != "fp32":
                raise UserError(f"--precision {self.precision} needs the built-in engine (--backend engine): the "
                                "Caffe backend computes in float32")
            if self.data_workers is not None:
                raise UserError(f"--data-workers {self.data_workers} needs --backend engine: Caffe's Data layer "
                                "decodes in its own prefetch thread")
            if self.balance == "auto":
                raise UserError("--balance auto needs --backend engine: Caffe's Data layer fixes its batch size "
                                "when the net is built, so a rank's batch cannot change during training")
            if self.fault_tolerance == "ulfm":
                raise UserError("--fault-tolerance ulfm needs the built-in engine (--backend engine): pycaffe's Net "
                                "fixes each Data layer's batch size and reader when it is built, so after a rank "
                                "failure the survivors could not take their larger share of the global batch or "
                                "move to their new data shard without rebuilding the solver; use `mpicaffe launch` "
                                "to relaunch instead")
        if self.balance == "auto":
            if self.fault_tolerance == "ulfm":
                raise UserError("--balance auto and --fault-tolerance ulfm cannot be combined yet: a recovery "
                                "re-splits the global batch evenly")
            if self.balance_iters < 1:
                raise UserError(f"--balance-iters {self.balance_iters}: need at least one iteration to measure")
        if self.on_divergence == "rollback":
            if not 0 < self.divergence_lr_factor <= 1:
                raise UserError(f"--divergence-lr-factor {self.divergence_lr_factor}: must be in (0, 1]")
            if self.divergence_retries < 1:
                raise UserError(f"--divergence-retries {self.divergence_retries}: must be at least 1")
        if self.apoptosis is not None:
            self.apoptosis.check()
            if self.fault_tolerance != "none":
                raise UserError("--prune-every cannot be combined with --fault-tolerance (the recovery state would "
                                "keep the unpruned shapes)")


# paths that may differ between nodes (a node-local staging folder, per-rank metric files)
_PER_NODE = {"solver", "weights", "snapshot", "metrics", "timeline", "shard_cache", "stage_data"}
