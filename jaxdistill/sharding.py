"""One device mesh for every platform: axes `data`, `fsdp`, `tensor`, sized from the config, and the
rules that place parameters and batches on it (the maxtext way: logical axis names → mesh axes).

Parameters get logical axis names from the parameter tree itself — the trees mirror diffusers' modules,
so a leaf's name and rank say what it is: a linear kernel is (embed, mlp) (in, out), a conv kernel
(h, w, conv_in, conv_out), a bias (mlp), a norm's scale and bias (norm), an embedding table (vocab,
embed); a leading `layers` axis when transformer layers are scanned. The rule table
(`config.mesh.rules`) maps logical names to mesh axes; FSDP shards `embed` / `conv_out` over `fsdp`,
tensor parallelism `mlp` over `tensor`. A dimension the mesh axis does not divide stays whole (tiny
models, odd widths); `check_divided` refuses a mesh that would leave most of a model so. Batches are split
over `data` × `fsdp`.

Multi-host: `initialize_distributed()` starts JAX's runtime (TPU VMs by themselves; SLURM and Open MPI from
their environment; anywhere from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), and
`global_batch` assembles each host's slice of a batch into one global array. Where one host can fail
alone (its copy of the weights or the data, its share of a source), `agreed` / `gather_failures` let every
host learn it in one collective and stop with one error naming it, instead of the others waiting in the
next collective until the distributed heartbeat gives up.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdistill.records import folder_lock

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both: FSDP is data parallelism too
# logical axis → mesh axis (None: replicated). FSDP: the input side of linear kernels and the output side
# of conv kernels; tensor parallelism: the output side of linear kernels (and their biases).
DEFAULT_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("conv_out", "fsdp"), ("conv_in", None), ("norm", None),
                 ("vocab", "tensor"), ("layers", None), ("kernel_h", None), ("kernel_w", None))
# The logical names one parameter can carry together (`_leaf_axes`): two of them on one mesh axis would
# shard one array twice over the same devices.
_TOGETHER = (("layers", "embed", "mlp"), ("layers", "kernel_h", "kernel_w", "conv_in", "conv_out"),
             ("layers", "vocab", "embed"), ("layers", "norm"))
LOGICAL = tuple(dict.fromkeys(name for group in _TOGETHER for name in group))


def rule_errors(rules: Sequence[Sequence[Any]]) -> list[str]:
    """What is wrong with a rule table (config.mesh.rules): each rule a pair [logical name, mesh axis or
    None], names from `LOGICAL`, axes from `AXES`, each logical name once, and no two names one parameter
    carries on the same mesh axis. Empty: usable."""
    problems, table = [], {}
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
            problems.append(f"rule {rule!r}: expected a pair [logical name, mesh axis or None]")
            continue
        name, axis = rule
        if name not in LOGICAL:
            problems.append(f"rule {list(rule)!r}: unknown logical name {name!r} (one of {LOGICAL})")
        elif axis is not None and axis not in AXES:
            problems.append(f"rule {list(rule)!r}: unknown mesh axis {axis!r} (one of {AXES}, or None)")
        elif name in table:
            problems.append(f"rule {list(rule)!r}: {name!r} has a rule already")
        else:
            table[name] = axis
    for group in _TOGETHER:
        on = {}
        for name in group:
            if table.get(name) is not None:
                on.setdefault(table[name], []).append(name)
        problems += [f"rules {names} all map to mesh axis {axis!r}, but one parameter carries them together"
                     for axis, names in on.items() if len(names) > 1]
    return list(dict.fromkeys(problems))


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) from the config's sizes; one of them may be -1: the devices left over."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh sizes name unknown axes {unknown}: the axes are {AXES}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes {dict(zip(AXES, shape, strict=True))}: positive, with at most one -1")
    if free:
        rest = math.prod(s for s in shape if s != -1)
        if num_devices % rest:
            raise ValueError(f"mesh sizes {dict(zip(AXES, shape, strict=True))}: {num_devices} devices are not a "
                             f"multiple of {rest}: the sizes other than -1 must multiply to a divisor of {num_devices}")
        shape[free[0]] = num_devices // rest
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {dict(zip(AXES, shape, strict=True))} needs {math.prod(shape)} devices; there are "
                         f"{num_devices}: the sizes must multiply to {num_devices} (or set one to -1 to take the rest, "
                         f"the others multiplying to a divisor of {num_devices})")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all). `dcn` gives the number of slices along
    each axis for multi-slice TPU (slow links between slices: put `data` there); `sizes` then count the
    devices within a slice."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = dict(sizes or {"data": 1, "fsdp": -1, "tensor": 1})
    dcn_shape = tuple(int((dcn or {}).get(a, 1)) for a in AXES)
    slices = math.prod(dcn_shape)
    from jax.experimental import mesh_utils

    if min(dcn_shape) < 1:
        raise ValueError(f"mesh.dcn {dcn}: slices per axis are ≥ 1 (1 everywhere but on multi-slice TPU)")
    if slices > 1:
        if not hasattr(devices[0], "slice_index"):
            raise ValueError(f"mesh.dcn {dcn} asks for {slices} slices, but {devices[0].platform} devices have no "
                             "slices (multi-slice TPU only): keep every mesh.dcn size 1")
        if len(devices) % slices:
            raise ValueError(f"{len(devices)} devices do not split into {slices} slices (mesh.dcn {dcn})")
        ici = mesh_shape(sizes, len(devices) // slices)
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices)
    else:
        shape = mesh_shape(sizes, len(devices))
        try:
            array = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):  # CPU and other topologies it does not know
            array = np.asarray(devices).reshape(shape)
    return Mesh(array, AXES)


def logical_axes(params: Mapping) -> dict:
    """The logical axis names of every parameter (a tree of tuples, the shape of `params`)."""
    out = {}
    for path, leaf in flatten_dict(dict(params)).items():
        out[path] = _leaf_axes(path, len(np.shape(leaf)))
    return unflatten_dict(out)


def param_shardings(params: Mapping, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> dict:
    """NamedSharding for every parameter of `params` (arrays or ShapeDtypeStructs) under `rules`."""
    problems = rule_errors(rules)
    if problems:
        raise ValueError("mesh rules: " + "; ".join(problems))
    out = {path: NamedSharding(mesh, PartitionSpec(*[axis if axis not in whole else None for axis in axes]))
           for path, (_, axes, whole) in _placements(params, mesh.shape, rules).items()}
    return unflatten_dict(out)


def _placements(params: Mapping, sizes: Mapping[str, int], rules: Sequence[tuple[str, str | None]]) -> dict:
    """Per parameter path: (its shape; the mesh axis `rules` give each dimension, or None; the axes among them
    whose size, in `sizes`, does not divide their dimension: that dimension stays whole)."""
    table = dict(rules)
    out = {}
    for path, leaf in flatten_dict(dict(params)).items():
        shape = np.shape(leaf)
        axes = [table.get(name) if name else None for name in _leaf_axes(path, len(shape))]
        axes = [axis if axis and sizes[axis] > 1 else None for axis in axes]
        out[path] = (shape, axes, {axis for dim, axis in zip(shape, axes, strict=True) if axis and dim % sizes[axis]})
    return out


def undivided(params: Mapping, sizes: Mapping[str, int], rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES
              ) -> dict[str, float]:
    """Per mesh axis (sizes: axis → devices, e.g. `mesh.shape`): the share of the parameters, by count, that
    `rules` split over it but whose dimension it does not divide — they stay whole on each of its devices."""
    total, whole = 0, {}
    for shape, _, axes in _placements(params, sizes, rules).values():
        n = math.prod(shape)
        total += n
        for axis in axes:
            whole[axis] = whole.get(axis, 0) + n
    return {axis: n / total for axis, n in whole.items()}


def check_divided(params: Mapping, sizes: Mapping[str, int], rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
                  limit: float = 0.1) -> list[str]:
    """ValueError when an fsdp or tensor axis of `sizes` leaves more than `limit` of the parameters whole (it
    does not divide the model's widths — SDXL's are multiples of 64 — so each device would hold them, their
    optimizer state and EMA in full, as maxtext refuses an indivisible sharding rather than replicate it), naming
    a size of that axis that divides them on the same devices. Notes where it leaves more than 1 %."""
    notes = []
    for axis, share in sorted(undivided(params, sizes, rules).items()):
        size = int(sizes[axis])
        if share > limit and axis != "data":  # (a rule table that splits parameters over data: noted only)
            fits = max(d for d in range(1, size + 1) if not size % d
                       and undivided(params, {**sizes, axis: d}, rules).get(axis, 0.0) <= limit)
            raise ValueError(
                f"mesh {dict(sizes)}: {share:.0%} of the parameters would stay whole on every device: the rules "
                f"split them over {axis!r}, whose {size} devices do not divide their widths. Give {axis!r} a size "
                f"that does, and the rest of the devices to 'data', e.g. mesh.sizes.{axis}={fits} and "
                f"mesh.sizes.data={int(sizes['data']) * size // fits}")
        if share > 0.01:
            notes.append(f"{share:.1%} of the parameters stay whole on every device: mesh.sizes.{axis}={size} does not "
                         "divide their widths")
    return notes


def like_params(state: Any, params_sharding: Mapping, mesh: Mesh) -> Any:
    """Shardings for a tree that holds parameter-shaped subtrees (a TrainState: master weights, AdamW
    moments, EMA): every leaf found under a parameter's path is placed like that parameter; everything
    else (step, counts) is replicated."""
    by_path = flatten_dict(dict(params_sharding))

    def place(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        sharding = by_path.get(keys)
        return sharding if sharding is not None and np.ndim(leaf) > 0 else replicated(mesh)

    return jax.tree_util.tree_map_with_path(place, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over data × fsdp; the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> Any:
    """`params` placed on the mesh by `rules` (None stays None)."""
    if params is None:
        return None
    return jax.device_put(params, param_shardings(params, mesh, rules))


def batch_shards(mesh: Mesh) -> int:
    """data × fsdp: the parts every batch is split into. Each process reads its own part of a batch, so the
    parts must split over the processes (else each would put its own rows where the others' belong):
    ValueError otherwise."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if shards % jax.process_count():
        raise ValueError(f"the mesh {dict(mesh.shape)} splits a batch into {shards} part(s) (data × fsdp), which do "
                         f"not split over the {jax.process_count()} processes, each reading its own part of every "
                         "batch; make data × fsdp a multiple of the process count (e.g. mesh.sizes.fsdp=-1)")
    return shards


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of a batch [b, ...] → global arrays [b · process_count, ...] split over data × fsdp."""
    sharding = batch_sharding(mesh)
    per_host = batch_shards(mesh) // jax.process_count()
    out = {}
    for k, v in local.items():
        if v.shape[0] % per_host:
            raise ValueError(f"batch of {v.shape[0]} per host does not split over this host's {per_host} batch "
                             "shards (data × fsdp); make batch_size / process_count a multiple of it")
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
    return out


def initialize_distributed() -> bool:
    """Starts JAX's multi-process runtime when the environment describes more than one process: JAX's own
    variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM (srun with more than one
    task), Open MPI (mpirun) or a Cloud TPU VM (its pod slice found by JAX; a TPU VM where JAX finds none runs
    as one process); see `distributed_args`. Returns whether it did. Call before
    using any device. Raises ValueError for an incomplete description (a process count without a coordinator,
    or the reverse) and RuntimeError when a SLURM process with one task per node does not see all of its
    node's GPUs."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo; GPU/TPU ignore it
    tpu_vm = _on_cloud_tpu_vm()
    kwargs = distributed_args(os.environ, tpu_vm=tpu_vm)
    if kwargs is None:
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # JAX found no cluster to join ("coordinator_address should be defined")
        if "coordinator_address" in kwargs and not {"num_processes", "process_id"} <= set(kwargs):
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set, but JAX_NUM_PROCESSES and JAX_PROCESS_ID are not both, "
                             f"and JAX found no cluster (SLURM, Open MPI, Kubernetes) to read them from ({e}): set "
                             "both on every process, or unset JAX_COORDINATOR_ADDRESS to run one process") from e
        if not tpu_vm or distributed_args(os.environ) is not None:
            raise
        # a TPU VM that is no GCE pod slice (no worker list in its metadata): one process, as JAX alone runs it
        print(f"note: this TPU VM runs as one process (JAX found no pod slice to join: {e})", file=sys.stderr)
        return False
    wanted = len(kwargs.get("local_device_ids", ()))
    if jax.local_device_count() < wanted:
        raise RuntimeError(f"process {jax.process_index()} sees {jax.local_device_count()} local device(s) "
                           f"({jax.local_devices()}), but SLURM gave its node {wanted} GPUs, all for this one task: "
                           "is a CUDA build of jaxlib installed (pip install -e '.[cuda]'), and CUDA_VISIBLE_DEVICES "
                           "left as SLURM sets it?")
    return True


def _on_cloud_tpu_vm() -> bool:
    """Whether JAX found TPU chips and libtpu on this host when it was imported (its Cloud TPU VM check)."""
    from jax._src import cloud_tpu_init  # private, but the very flag JAX's own TPU cluster detection reads

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def distributed_args(env: Mapping[str, str], tpu_vm: bool = False) -> dict[str, Any] | None:
    """The keyword arguments of `jax.distributed.initialize()` for environment `env` (os.environ), or None
    for a single process. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are passed on as far
    as they are set: what is missing JAX fills from the cluster it detects (SLURM, Open MPI, Kubernetes).
    SLURM (an srun step of more than one task; a batch script run directly is one process), Open MPI (mpirun
    of more than one rank) and Cloud TPU VMs (`tpu_vm`: single host or pod slice; GKE's TPU_WORKER_HOSTNAMES)
    are left to JAX's own detection, except that under SLURM with one task per node that task gets all of its
    node's GPUs (`local_device_ids` 0 … N−1): JAX's SLURM rule assumes one task per GPU and would give each
    task the GPU numbered by its SLURM_LOCALID, GPU 0 of 8 (jax-ml/jax#16788). A TPU VM starts the runtime
    even alone, as maxtext does: a pod slice's worker list is in the VM's metadata, not always in its
    environment, and orbax's multi-host checkpoints need the runtime's client."""
    given = {key: convert(env[name]) for key, name, convert in (
        ("coordinator_address", "JAX_COORDINATOR_ADDRESS", str), ("num_processes", "JAX_NUM_PROCESSES", int),
        ("process_id", "JAX_PROCESS_ID", int)) if name in env}
    # Only inside an srun step: a batch script or salloc shell has SLURM_NTASKS too, but one process runs there
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks > 1:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or 0)
        # The GPUs this task can see; CUDA_VISIBLE_DEVICES (set by SLURM) renumbers them 0 … N−1.
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        per_node = env.get("SLURM_GPUS_PER_NODE", "").rsplit(":", 1)[-1]  # "8", "h100:8" (--gpus-per-node)
        job_gpus = [d for d in env.get("SLURM_JOB_GPUS", "").split(",") if d.strip()]  # this node's GPU ids
        gpus = (len(visible) or int(env.get("SLURM_GPUS_ON_NODE") or 0) or (int(per_node) if per_node.isdigit() else 0)
                or len(job_gpus))
        if tasks == nodes and gpus and "JAX_LOCAL_DEVICE_IDS" not in env:  # JAX reads that one itself
            return given | {"local_device_ids": list(range(gpus))}
        return given
    if "coordinator_address" in given or int(env.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return given
    if tpu_vm or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return {}  # JAX reads the workers from the environment or the VM's metadata itself
    if given.get("num_processes", 2 if "process_id" in given else 1) > 1:  # else N separate runs, one workdir
        raise ValueError("JAX_NUM_PROCESSES / JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS is not, and no "
                         "cluster (an srun step, mpirun, a TPU pod slice) is there to find it: set "
                         "JAX_COORDINATOR_ADDRESS=HOST:PORT (process 0's host) on every process, or unset them to run "
                         "one process")
    return None


# ---- processes that agree: one host's failure stops every host at once ----------------------------

def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (the same answer on all of them)."""
    return gather_failures(None, flag)[1]


def attempt(fn) -> tuple[Any, Exception | None]:
    """(fn(), None), or (None, what it raised): a host keeps going to the collective where all hosts learn it."""
    try:
        return fn(), None
    except Exception as e:  # any kind (an unreadable shard too): the other hosts would wait as well
        return None, e


def gather_failures(own: Exception | None, stop: bool = False) -> tuple[dict[int, str], bool]:
    """({process: why it failed} over all processes, whether any process asked to stop), the same on every
    process. One small collective of flags; the reasons travel only when some process failed."""
    def why(e):
        return (str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}") or type(e).__name__  # not ""

    if jax.process_count() == 1:
        return ({0: why(own)} if own is not None else {}), stop
    flags = multihost_utils.process_allgather(np.array([own is not None, stop], np.int32))
    failed = np.flatnonzero(flags[:, 0])
    if not failed.size:
        return {}, bool(flags[:, 1].any())
    texts = gather_texts(why(own)[:4096] if own is not None else "")
    return {int(i): texts[i] for i in failed}, bool(flags[:, 1].any())


def gather_texts(text: str) -> list[str]:
    """Every process's `text`, in process order (the same list on every process)."""
    if jax.process_count() == 1:
        return [text]
    # collectives move arrays of one shape: the lengths first, then each text as bytes padded to the longest
    encoded = np.frombuffer(text.encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([encoded.size], np.int32))[:, 0]
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[:encoded.size] = encoded
    texts = multihost_utils.process_allgather(padded)
    return [bytes(t[:n]).decode(errors="replace") for t, n in zip(texts, sizes, strict=True)]


def raise_failures(own: Exception | None, failures: dict[int, str], what: str, then: str = "",
                   error: type[ValueError] = ValueError):
    """Every process raises when any failed: a bug (not a ValueError / OSError) with its own traceback on its
    process, otherwise one `error` naming the failed processes and their reasons. `then`: what was kept."""
    if own is not None and not isinstance(own, (ValueError, OSError)):
        raise own
    if not failures:
        return
    if jax.process_count() == 1:
        if not then:
            raise own
        raise error(f"{failures[0]}\n{then}") from own
    alike: dict[str, list[int]] = {}  # the same reason on many hosts (a setting they share) once
    for i, text in failures.items():
        alike.setdefault(text, []).append(i)
    reasons = "\n".join(f"process {', '.join(map(str, ids))}: {text}" for text, ids in alike.items())
    raise error(f"process {', '.join(map(str, failures))} of {jax.process_count()} {what}, so every process "
                f"stops:\n{reasons}" + (f"\n{then}" if then else ""))


def agreed(fn, what: str, error: type[ValueError] = ValueError):
    """`fn()` on every process, where one process can fail alone (its data, its share of a streamed source,
    its view of a folder): when it raises on any of them, all raise one error naming those processes and
    their reasons, instead of the others going on to wait in the next collective until the distributed
    heartbeat gives up. `fn` itself must not wait for the other processes."""
    result, own = attempt(fn)
    raise_failures(own, gather_failures(own)[0], what, error=error)
    return result


@contextlib.contextmanager
def hold_folder(folder, what: str, *, first: bool, error: type[ValueError] = ValueError) -> Iterator[None]:
    """One command at a time writes `folder` (`records.folder_lock`), held by the `first` process (the folder
    may be shared by the hosts); when another command holds it, every process stops."""
    with contextlib.ExitStack() as lock:
        agreed(lambda: lock.enter_context(folder_lock(folder, what, error=error)) if first else None,
               f"could not take {folder}", error=error)
        yield


def _leaf_axes(path: tuple[str, ...], rank: int) -> tuple[str | None, ...]:
    """Logical names of one parameter, from its name and rank (see the module docstring)."""
    leaf, parent = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "kernel" and rank >= 4:
        axes = ("kernel_h", "kernel_w", "conv_in", "conv_out")
    elif leaf == "kernel":
        axes = ("embed", "mlp")
    elif leaf == "embedding":
        axes = ("vocab", "embed")
    elif leaf == "scale" or "norm" in parent:
        axes = ("norm",)
    else:  # a linear or conv bias
        axes = ("mlp",) if leaf == "bias" and "conv" not in parent else ("conv_out",)
    if rank == len(axes) + 1:  # scanned transformer layers: a leading layer axis
        axes = ("layers", *axes)
    if rank != len(axes):
        raise ValueError(f"parameter {'/'.join(path)} has rank {rank}; expected {len(axes)} ({axes})")
    return axes
