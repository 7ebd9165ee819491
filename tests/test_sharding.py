"""The mesh: parameter placement by logical axes, the sharded step equal to one device (8 simulated CPU
devices, fsdp=8 and data=2 × fsdp=4), per-device memory falling with fsdp, and a real two-process run
(gloo collectives) whose checkpoint a one-process run on another mesh restores and continues; two processes
stop together when one of them cannot start, read its weights or its first batch, or is signalled
(a batch that fails mid-run on one host: test_prepare)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, cpu_env
from flax.traverse_util import flatten_dict
from test_train import small_config, write_config_file

from jaxdistill import load_unet
from jaxdistill.prune import PrunePlan
from jaxdistill.sharding import logical_axes, mesh_shape
from jaxdistill.unet import abstract_params

EIGHT, ONE = cpu_env(8), cpu_env()
# float32 sums in another order: losses agree to ~1e-6; Adam divides by √v, so a parameter whose gradient
# is ~0 can move differently by up to ~lr — parameters are compared relative to the update size.
LOSS_RTOL = 1e-5


def test_mesh_sizes():
    assert mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1)
    assert mesh_shape({"data": 1, "fsdp": 8, "tensor": 1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape({"data": 2, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_shape({"data": -1, "tensr": 2}, 8)


def test_slices_and_batch_shards_that_cannot_work_are_refused(monkeypatch):
    """mesh.dcn is for multi-slice TPU (a CPU or GPU device has no slice); a batch split into fewer parts than
    there are processes would have each process put its own rows where the others' belong."""
    from jaxdistill.sharding import batch_shards, make_mesh

    devices = jax.devices()[:1]
    with pytest.raises(ValueError, match="multi-slice TPU only"):
        make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices, dcn={"data": 2, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="slices per axis are ≥ 1"):
        make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices, dcn={"data": 0, "fsdp": 1, "tensor": 1})
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    assert batch_shards(mesh) == 1
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as on the second of two hosts
    with pytest.raises(ValueError, match="1 part\\(s\\) \\(data × fsdp\\), which do not split over the 2 processes"):
        batch_shards(mesh)


# launch/slurm.sbatch's layout, as srun gives it to the task on the second of two nodes
SLURM = {"SLURM_JOB_ID": "12345", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_STEP_NUM_TASKS": "2",
         "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}


def test_distributed_args_give_one_task_per_node_all_its_gpus():
    from jaxdistill.sharding import distributed_args

    # JAX alone would take SLURM_LOCALID as the task's one GPU: GPU 0 of 8
    assert distributed_args(SLURM) == {"local_device_ids": list(range(8))}
    # 4 GPUs of a shared node (CUDA_VISIBLE_DEVICES names them; the process sees them as 0 … 3)
    assert distributed_args(SLURM | {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_GPUS_ON_NODE": "4"}) == {
        "local_device_ids": [0, 1, 2, 3]}
    assert distributed_args({k: v for k, v in SLURM.items() if k != "CUDA_VISIBLE_DEVICES"}) == {
        "local_device_ids": list(range(8))}
    # the node's GPU count from --gpus-per-node or the job's GPU list where SLURM sets neither of the above
    bare = {k: v for k, v in SLURM.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")}
    assert distributed_args(bare | {"SLURM_GPUS_PER_NODE": "h100:4"}) == {"local_device_ids": [0, 1, 2, 3]}
    assert distributed_args(bare | {"SLURM_JOB_GPUS": "0,1"}) == {"local_device_ids": [0, 1]}
    # one task per GPU: JAX's own rule (GPU SLURM_LOCALID) is right; the user's JAX_LOCAL_DEVICE_IDS wins
    assert distributed_args(SLURM | {"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS_PER_NODE": "8"}
                            ) == {}
    assert distributed_args(SLURM | {"JAX_LOCAL_DEVICE_IDS": "0,1"}) == {}
    assert distributed_args({k: v for k, v in SLURM.items() if "GPU" not in k and k != "CUDA_VISIBLE_DEVICES"}) == {}
    assert distributed_args(SLURM | {"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1",
                                     "SLURM_NNODES": "1"}) is None
    # the batch script itself (or an salloc shell) of a 2-node job, without srun: one process, not a rank of two
    batch_script = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP_")} | {"SLURM_PROCID": "0"}
    assert distributed_args(batch_script) is None
    assert distributed_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    # a coordinator address alone: JAX takes the count and id from the cluster (not "process 0 of 1" everywhere)
    assert distributed_args(SLURM | {"JAX_COORDINATOR_ADDRESS": "h:1"}) == {"coordinator_address": "h:1",
                                                                           "local_device_ids": list(range(8))}
    assert distributed_args({"JAX_COORDINATOR_ADDRESS": "h:1", "OMPI_COMM_WORLD_SIZE": "2"}) == {
        "coordinator_address": "h:1"}
    assert distributed_args({"OMPI_COMM_WORLD_SIZE": "4"}) == {}  # mpirun: JAX's Open MPI rule reads the ranks
    assert distributed_args({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert distributed_args({"JAX_NUM_PROCESSES": "1"}) is None  # a count alone starts nothing, as before
    # a count of several (or an id) without a coordinator and no cluster to find one: N separate one-process runs
    # into one workdir (they started so, silently)
    for env in ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, {"JAX_PROCESS_ID": "0"}):
        with pytest.raises(ValueError, match="set JAX_COORDINATOR_ADDRESS=HOST:PORT \\(process 0's host\\) on every"):
            distributed_args(env)
    assert distributed_args({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
    # a Cloud TPU VM, alone or in a pod slice whose workers are only in the VM's metadata: JAX finds them
    assert distributed_args({}, tpu_vm=True) == {}
    assert distributed_args({}) is None


@pytest.mark.parametrize("command", [
    ["jaxdistill.train", "--config", "configs/tiny.py", "--workdir", "WORKDIR"],
    ["jaxdistill.prepare", "--source", "WORKDIR/images", "--pipeline", "WORKDIR/pipe", "--out", "WORKDIR/data"]])
def test_an_incomplete_multi_process_environment_is_one_error_line(command, tmp_path):
    """A process count and id without a coordinator (each process ran alone, silently, into one folder), and a
    coordinator without them (a traceback), end the command with one `error:` line before anything loads."""
    command = [sys.executable, "-m", *(arg.replace("WORKDIR", str(tmp_path)) for arg in command)]
    root = os.path.join(os.path.dirname(__file__), "..")
    for extra, says in (({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "set JAX_COORDINATOR_ADDRESS=HOST:PORT"),
                        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not")):
        done = subprocess.run(command, env=cpu_env() | extra, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "error: " in done.stderr and says in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_a_reason_many_processes_share_is_said_once(monkeypatch):
    from jaxdistill.sharding import raise_failures

    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError) as info:
        raise_failures(ValueError("a"), {0: "batch 8 does not split", 1: "batch 8 does not split", 2: "no data"},
                       "could not check the stages")
    assert str(info.value) == ("process 0, 1, 2 of 3 could not check the stages, so every process stops:\n"
                               "process 0, 1: batch 8 does not split\nprocess 2: no data")


def test_a_batch_that_does_not_split_over_the_mesh_names_sizes_that_do(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..")
    for extra, sizes in ((["--config.optimizer.accumulation=1"], "e.g. --config.batch_size=8 or "
                                                                  "--config.batch_size=16"),
                         (["--config.optimizer.accumulation=2"], "e.g. --config.batch_size=16 (2 micro-batches of a "
                                                                  "multiple of 8)")):
        done = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", "configs/tiny.py", "--workdir",
                               str(tmp_path / "run"), "--config.batch_size=12", *extra], env=cpu_env(devices=8),
                              cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "config.batch_size=12 must be a multiple of the mesh's 8 batch shards" in done.stderr
        assert sizes in done.stderr, done.stderr[-1000:]


def test_a_task_that_sees_fewer_gpus_than_its_node_has_stops(monkeypatch, capsys):
    from jaxdistill import sharding

    calls = []
    monkeypatch.setattr(os, "environ", dict(SLURM))
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)  # as JAX gave the task GPU 0 only
    with pytest.raises(RuntimeError, match="sees 1 local device.*SLURM gave its node 8 GPUs"):
        sharding.initialize_distributed()
    assert calls == [{"local_device_ids": list(range(8))}]
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)
    assert sharding.initialize_distributed() is True
    # a Cloud TPU VM with nothing in its environment: JAX's own detection (the VM's metadata) finds the slice
    monkeypatch.setattr(os, "environ", {})
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: True)
    assert sharding.initialize_distributed() is True and calls[-1] == {}
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: False)
    assert sharding.initialize_distributed() is False and len(calls) == 3

    def no_cluster(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    # a TPU VM outside a GCE pod slice (JAX detects no cluster): one process, as before, said so
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: True)
    assert sharding.initialize_distributed() is False
    assert "runs as one process" in capsys.readouterr().err
    monkeypatch.setattr(os, "environ", dict(SLURM))  # where the environment names a cluster, the error stands
    with pytest.raises(ValueError, match="coordinator_address"):
        sharding.initialize_distributed()

    def no_count(**kwargs):
        raise ValueError("Number of processes must be defined.")

    # a coordinator address without a count where JAX detects no cluster: what to set, not "process 0 of 1"
    monkeypatch.setattr(jax.distributed, "initialize", no_count)
    monkeypatch.setattr(sharding, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(os, "environ", {"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID are not both.*set both"):
        sharding.initialize_distributed()


def test_an_fsdp_size_that_divides_no_width_is_refused_before_training(unet_folders, monkeypatch):
    """SDXL's widths are multiples of 64: fsdp=24 (3 nodes of 8 GPUs) would leave every parameter whole on
    every device, silently; the start is refused, naming sizes that split them on the same devices."""
    from jaxdistill import presets, train
    from jaxdistill.config import stages_of
    from jaxdistill.sharding import check_divided, param_shardings, undivided

    sdxl = abstract_params(presets.SDXL)
    sizes = {n: {"data": 1, "fsdp": n, "tensor": 1} for n in (16, 24, 256)}
    assert undivided(sdxl, sizes[16]).get("fsdp", 0.0) < 0.01 and undivided(sdxl, sizes[24])["fsdp"] > 0.99
    with pytest.raises(ValueError, match=r"mesh.sizes.fsdp=8 and mesh.sizes.data=3"):
        check_divided(sdxl, sizes[24])
    with pytest.raises(ValueError, match=r"over 'tensor'.*mesh.sizes.tensor=2 and mesh.sizes.data=6"):
        check_divided(sdxl, {"data": 2, "fsdp": 8, "tensor": 6})
    notes = check_divided(sdxl, sizes[256])  # small leftovers: said, not refused
    assert len(notes) == 1 and "mesh.sizes.fsdp=256 does not divide" in notes[0]
    assert check_divided(sdxl, {"data": 4, "fsdp": 16, "tensor": 2}) == []

    def left_whole(n):  # the share param_shardings does not split over fsdp (norms and biases never are)
        mesh = jax.sharding.AbstractMesh((1, n, 1), ("data", "fsdp", "tensor"))
        pairs = zip(jax.tree.leaves(sdxl), jax.tree.leaves(param_shardings(sdxl, mesh)), strict=True)
        return sum(x.size for x, sh in pairs if "fsdp" not in sh.spec) / sum(x.size for x in jax.tree.leaves(sdxl))

    assert left_whole(24) - left_whole(16) == pytest.approx(
        undivided(sdxl, sizes[24])["fsdp"] - undivided(sdxl, sizes[16]).get("fsdp", 0.0), abs=1e-9)
    # the trainer checks it with the stages, before any weights are read (the tiny teacher's widths are 32)
    config = small_config(unet_folders["micro"], "", batch_size=24, **{"mesh.sizes": {"data": 1, "fsdp": 24,
                                                                                       "tensor": 1}})
    monkeypatch.setattr(train, "make_mesh", lambda sizes, dcn=None: jax.sharding.AbstractMesh(
        tuple(sizes.values()), tuple(sizes)))
    with pytest.raises(ValueError, match=r"stage .*: mesh .* stay whole .*mesh.sizes.fsdp=8"):
        train.check_stages(stages_of(config), Path(unet_folders["micro"]).parent / "nowhere")


def test_bad_mesh_rules_are_named_before_anything_runs():
    from jaxdistill.config import base_config, validate
    from jaxdistill.sharding import DEFAULT_RULES, rule_errors

    assert rule_errors(DEFAULT_RULES) == []
    assert rule_errors([("embed", "fdsp")]) == [
        "rule ['embed', 'fdsp']: unknown mesh axis 'fdsp' (one of ('data', 'fsdp', 'tensor'), or None)"]
    assert "'embed', 'mlp'" in rule_errors([("embed", "fsdp"), ("mlp", "fsdp")])[0]  # one kernel, sharded twice
    assert rule_errors([("vocab", "tensor"), ("mlp", "tensor")]) == []  # never in one parameter
    assert "unknown logical name" in rule_errors([("emb", "fsdp")])[0]
    assert "has a rule already" in rule_errors([("embed", "fsdp"), ("embed", None)])[0]
    c = base_config()
    c.mesh.rules = [["embed", "fdsp"], ["mlp", "tensor"]]
    with pytest.raises(ValueError, match="mesh.rules: rule .'embed', 'fdsp'.: unknown mesh axis"):
        validate(c)


def test_every_parameter_has_logical_axes():
    from jaxdistill.layers import stack_layers

    params = abstract_params(TINY["micro"])
    flat = flatten_dict(logical_axes(params))
    shapes = flatten_dict(params)
    assert all(len(axes) == len(shapes[path].shape) for path, axes in flat.items())
    assert flat["conv_in", "kernel"] == ("kernel_h", "kernel_w", "conv_in", "conv_out")
    assert flat["time_embedding", "linear_1", "kernel"] == ("embed", "mlp")
    assert flat["conv_norm_out", "scale"] == ("norm",)
    stacked = flatten_dict(logical_axes(jax.eval_shape(stack_layers, params)))
    assert any(axes[0] == "layers" for axes in stacked.values())


@pytest.fixture(scope="module")
def runs(unet_folders, tmp_path_factory):
    """The same 2-step distillation on one device, on 8 devices with fsdp=8 and with data=2 × fsdp=4."""
    root = tmp_path_factory.mktemp("sharded")
    plan = root / "plan.json"
    PrunePlan(name="test", attentions={"up_blocks.0.attentions.0": [1]}).save(plan)
    out = {}
    procs = []
    for name, sizes, env in (("one", {"data": 1, "fsdp": -1, "tensor": 1}, ONE),
                             ("fsdp8", {"data": 1, "fsdp": -1, "tensor": 1}, EIGHT),
                             ("data2_fsdp4", {"data": 2, "fsdp": 4, "tensor": 1}, EIGHT)):
        c = small_config(unet_folders["micro"], str(plan), batch_size=16, steps=2, checkpoint_every=2,
                         **{"optimizer.accumulation": 2, "mesh.sizes": sizes})
        config = write_config_file(root / f"{name}.py", c)
        out[name] = root / name
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxdistill.train", "--config", config, "--workdir",
                                       str(out[name])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        log = p.communicate()[0]
        assert p.returncode == 0, log[-3000:]
    return out, plan


def _losses(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([line["loss"] for line in lines if "loss" in line])


def _assert_same_student(a, b, lr=1e-3):
    _, pa = load_unet(os.path.join(a, "stages", "main"))
    _, pb = load_unet(os.path.join(b, "stages", "main"))
    fa, fb = flatten_dict(pa), flatten_dict(pb)
    worst = max(float(np.max(np.abs(np.asarray(fa[k]) - np.asarray(fb[k])))) for k in fa)
    assert worst <= 0.05 * lr, f"parameters differ by {worst} (2 Adam steps of lr {lr})"


def test_sharded_steps_equal_one_device(runs):
    out, _ = runs
    reference = _losses(out["one"])
    assert len(reference) == 2
    for name in ("fsdp8", "data2_fsdp4"):
        np.testing.assert_allclose(_losses(out[name]), reference, rtol=LOSS_RTOL)
        _assert_same_student(out[name], out["one"])


def test_parameter_memory_per_device_falls_with_fsdp_and_the_optimizer_state_follows(unet_folders):
    code = """
import jax, json, sys
from jaxdistill import load_unet
from jaxdistill.sharding import make_mesh, shard_params
_, params = load_unet(sys.argv[1])
out = {}
for name, sizes in (("data8", {"data": 8, "fsdp": 1, "tensor": 1}), ("fsdp8", {"data": 1, "fsdp": 8, "tensor": 1})):
    sharded = shard_params(params, make_mesh(sizes))
    compiled = jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p)).lower(sharded).compile()
    out[name] = compiled.memory_analysis().argument_size_in_bytes
# the optimizer state and EMA follow their parameters (zeros would otherwise come out replicated)
from jaxdistill.step import init_state, make_optimizer
state = init_state(sharded, make_optimizer(1e-3)[0], ema=True)
specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
adam = state.opt_state[1][0]
out["moments_like_params"] = specs(adam.mu) == specs(adam.nu) == specs(state.params) == specs(state.ema_params)
out["some_sharded"] = any(any(a is not None for a in spec) for spec in specs(adam.mu))
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code, unet_folders["micro"]], env=EIGHT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sizes["fsdp8"] < sizes["data8"] / 3, sizes  # replicated vs sharded (small leaves stay whole)
    assert sizes["moments_like_params"] and sizes["some_sharded"]


def test_two_processes_train_and_one_process_continues(runs, unet_folders, tmp_path):
    """Two real processes (one CPU device each, gloo; started by launch/local.sh) train 2 steps and
    checkpoint; their losses equal the one-device run's. One process (a 1-device mesh) then restores that
    checkpoint and trains to step 4."""
    out, plan = runs
    c = small_config(unet_folders["micro"], str(plan), batch_size=16, steps=2, checkpoint_every=2,
                     **{"optimizer.accumulation": 2})
    config = write_config_file(tmp_path / "two.py", c)
    workdir = tmp_path / "two"
    launcher = Path(__file__).parents[1] / "launch" / "local.sh"
    result = subprocess.run(["bash", str(launcher), "2", "--config", config, "--workdir", str(workdir)],
                            env=ONE | {"PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, "\n----\n".join(log[-3000:] for log in logs)
    np.testing.assert_allclose(_losses(workdir), _losses(out["one"]), rtol=LOSS_RTOL)
    _assert_same_student(workdir, out["one"])
    assert (workdir / "checkpoints" / "main" / "2").is_dir()

    c.steps = 4
    (workdir / "stages" / "main" / "jaxdistill_stage.json").unlink()  # let the stage continue past step 2
    config = write_config_file(tmp_path / "more.py", c)
    # one host without the teacher: both stop at once, naming it and why (before, process 0 went on into
    # orbax's barrier and died there ~30 s later with a Gloo timeout that named neither)
    missing = tmp_path / "not_mounted"
    logs = _both_stop(_two_processes(_train(config, workdir), [], [f"--config.teacher={missing}"]))
    for log in logs:
        assert "process 1 of 2 could not check the stages before training, so every process stops" in log, log
        assert "process 1: FileNotFoundError" in log and str(missing) in log, log[-2000:]
    # one host's copy of the teacher is damaged (its config reads, its weights do not): the same
    broken = tmp_path / "partial_copy"
    shutil.copytree(unet_folders["micro"], broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    logs = _both_stop(_two_processes(_train(config, workdir), [], [f"--config.teacher={broken}"]))
    for log in logs:
        assert "process 1 of 2 could not read its weights, so every process stops" in log, log[-2000:]
        assert f"process 1: cannot read {weights}" in log, log[-2000:]
    assert sorted(p.name for p in (workdir / "checkpoints" / "main").iterdir()) == ["2"]  # nothing lost
    result = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", config, "--workdir", str(workdir)],
                            env=ONE, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
    assert steps == [1, 2, 3, 4]


def test_sigterm_to_one_of_two_processes_checkpoints_both(unet_folders, tmp_path):
    """A preemption signal reaches hosts at different times: the processes agree to stop after the same step,
    save that checkpoint together and exit cleanly (alone, the signalled one would wait in the save while
    the other waits in the next step's collectives)."""
    plan = tmp_path / "plan.json"
    PrunePlan(name="test", attentions={"up_blocks.0.attentions.0": [1]}).save(plan)
    c = small_config(unet_folders["micro"], str(plan), batch_size=8, steps=10_000, checkpoint_every=10_000)
    config = write_config_file(tmp_path / "long.py", c)
    workdir = tmp_path / "run"
    procs = _two_processes(_train(config, workdir))
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs) and len(_losses_if_any(workdir)) < 3:
        time.sleep(0.5)
    assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
    procs[1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    assert "stopped by a signal to another process at step" in logs[0], logs[0][-2000:]
    stopped = int(logs[1].split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert f"at step {stopped};" in logs[0]
    assert (workdir / "checkpoints" / "main" / str(stopped)).is_dir()


def _two_processes(command: list[str], *extra: list[str]) -> list[subprocess.Popen]:
    """Two processes of one multi-host job (gloo on this machine), started as a launcher would: `python
    COMMAND` on each, `extra` each process's own further arguments."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    extra = extra or ([], [])
    return [subprocess.Popen([sys.executable, *command, *extra[i]], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=ONE | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": str(i)}) for i in range(2)]


def _train(config: str, workdir) -> list[str]:
    return ["-m", "jaxdistill.train", "--config", config, "--workdir", str(workdir)]


def _both_stop(procs: list[subprocess.Popen], code: int = 1) -> list[str]:
    """The logs of two processes that must both fail (exit `code`), the second within seconds of the first,
    not after the distributed heartbeat's minutes."""
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    try:
        logs = [p.communicate(timeout=30)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail("the processes did not both stop promptly:\n" + "\n----\n".join(log[-2000:] for log in logs))
    assert [p.returncode for p in procs] == [code, code], "\n----\n".join(log[-3000:] for log in logs)
    return logs


def _losses_if_any(workdir) -> list:
    return list(_losses(workdir)) if (Path(workdir) / "metrics.jsonl").is_file() else []


def test_a_process_without_usable_images_stops_both(tmp_path):
    """An images source with one usable record for two hosts: one host's share is empty. Both processes stop
    at once with the same error naming it (alone, the other would wait in the step's collectives until the
    distributed heartbeat gives up)."""
    from test_sources import _encode, _noise, _write

    from jaxdistill.reference import write_random_pipeline

    pipeline = str(write_random_pipeline(tmp_path / "pipeline"))
    images = tmp_path / "images"
    _write(images, "good.png", _encode(_noise(40, 40, 0), "PNG"))
    _write(images, "good.txt", b"a picture")
    _write(images, "nocap.png", _encode(_noise(40, 40, 1), "PNG"))  # no caption: skipped
    c = small_config(pipeline, "", batch_size=2, steps=2, **{"loss.output": 0.0, "loss.feature": 0.0})
    c.data.update(source="images", path=f"folder:{images}", pipeline=pipeline, resolution=32)
    config = write_config_file(tmp_path / "images.py", c)
    logs = _both_stop(_two_processes(_train(config, tmp_path / "run")))
    for log in logs:
        assert "could not read its batch for step 1, so every process stops" in log, log[-3000:]
        assert "no usable example for process" in log and "caption_missing" in log, log[-3000:]
    saved = tmp_path / "run" / "checkpoints" / "main"
    assert not (saved.is_dir() and any(p.name.isdigit() for p in saved.iterdir()))  # nothing saved


def test_splash_attention_runs_per_device_under_the_mesh():
    """Under the trainer's mesh context (fsdp=8 and data=2 × fsdp=4) splash attention runs on each
    device's share of the batch: same numbers as the XLA path (forward and gradients, Pallas' interpreter
    on these CPU devices) and no all-gather of the activations in the compiled program."""
    code = """
import jax, jax.numpy as jnp, json, numpy as np
from jaxdistill.layers import attention
from jaxdistill.sharding import batch_sharding, make_mesh
keys = jax.random.split(jax.random.key(5), 4)
q, k, v, cot = (jax.random.normal(key, (8, 128, 2, 64)) for key in keys)
def both(impl, q, k, v, cot):
    out, vjp = jax.vjp(lambda *x: attention(*x, impl), q, k, v)
    return (out, *vjp(cot))
ref = jax.jit(lambda *x: both("xla", *x))(q, k, v, cot)
out = {}
for name, sizes in (("fsdp8", (1, 8)), ("data2fsdp4", (2, 4))):
    mesh = make_mesh({"data": sizes[0], "fsdp": sizes[1], "tensor": 1})
    args = [jax.device_put(x, batch_sharding(mesh)) for x in (q, k, v, cot)]
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *x: both("splash", *x))
        ours = fn(*args)
        hlo = fn.lower(*args).compile().as_text()
    out[name] = {"err": max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(ours, ref)),
                 "all_gather": hlo.count("all-gather"), "spec": str(ours[0].sharding.spec)}
# a batch the mesh cannot split (4 examples, 8 devices): XLA places the kernel, same numbers
with jax.set_mesh(mesh):
    small = jax.jit(lambda *x: both("splash", *x))(*(x[:4] for x in (q, k, v, cot)))
out["indivisible"] = {"err": max(float(np.max(np.abs(a - b[:4])) / np.max(np.abs(b[:4])))
                                 for a, b in zip(small, ref)), "all_gather": 0}
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code], env=EIGHT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name, figures in out.items():
        assert figures["err"] <= 1e-5, (name, figures)
        assert figures["all_gather"] == 0, (name, figures)
