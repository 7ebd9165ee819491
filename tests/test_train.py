"""Training: losses and schedule by hand and against diffusers, exact resume, SIGTERM, NaN guard, the loss
falls, progressive stages, config errors. The "micro" teacher (written by diffusers), 8×8 latents."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env
from diffusers import DDPMScheduler
from flax.traverse_util import flatten_dict

from jaxdistill import load_unet
from jaxdistill.config import base_config, fields_like, stages_of, tap_list, validate
from jaxdistill.data import SyntheticLatents
from jaxdistill.losses import distill_loss
from jaxdistill.prune import PrunePlan
from jaxdistill.schedule import add_noise, alphas_cumprod, prediction_target
from jaxdistill.train import STAGE_MARKER, NonFiniteLoss, check_stages, memory_advice, run
from jaxdistill.unet import flops

ENV = cpu_env()


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    PrunePlan(name="test", attentions={"up_blocks.0.attentions.0": 1, "up_blocks.0.attentions.1": [1]}).save(path)
    return str(path)


def small_config(teacher: str, plan: str, **changes):
    c = base_config()
    c.teacher, c.plan = teacher, plan
    c.batch_size, c.optimizer.accumulation, c.optimizer.lr = 4, 1, 1e-3
    c.precision.teacher = c.precision.student_compute = "float32"
    c.data.resolution, c.data.seq_len, c.data.num_examples = 64, 8, 16
    c.steps, c.log_every, c.checkpoint_every = 6, 1, 3
    # training commands the tests start read the programs other runs compiled (conftest's session cache)
    c.compilation_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "auto")
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def write_config_file(path, config) -> str:
    """A config file for the command line that returns exactly `config`."""
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict({config.to_dict()!r})\n")
    return str(path)


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_losses_by_hand():
    rng = np.random.default_rng(0)
    s, t, y = (rng.standard_normal((2, 4, 4, 3)).astype(np.float32) for _ in range(3))
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    sf = {"a": normal(2, 2, 2, 5), "b": normal(2, 3)}
    tf = {"a": 3 * normal(2, 2, 2, 5), "b": normal(2, 3)}
    pairs = [("a", "a"), ("b", "b")]
    mse = lambda u, v: np.mean((u - v) ** 2)  # noqa: E731
    total, terms = distill_loss(s, y, teacher_pred=t, student_features=sf, teacher_features=tf, pairs=pairs)
    feature = mse(sf["a"], tf["a"]) + mse(sf["b"], tf["b"])
    np.testing.assert_allclose(terms["task"], mse(s, y), rtol=1e-6)
    np.testing.assert_allclose(terms["output_kd"], mse(s, t), rtol=1e-6)
    np.testing.assert_allclose(terms["feature_kd"], feature, rtol=1e-6)
    np.testing.assert_allclose(total, mse(s, y) + 0.5 * mse(s, t) + 0.5 * feature, rtol=1e-6)
    total, terms = distill_loss(s, y, teacher_pred=t, student_features=sf, teacher_features=tf, pairs=pairs,
                                weights={"task": 0.0, "output": 2.0, "feature": 1.0}, normalize="teacher_ms")
    normalised = sum(mse(sf[k], tf[k]) / (np.mean(tf[k] ** 2) + 1e-8) for k in "ab")
    np.testing.assert_allclose(terms["feature/a"], mse(sf["a"], tf["a"]) / (np.mean(tf["a"] ** 2) + 1e-8), rtol=1e-6)
    np.testing.assert_allclose(total, 2 * mse(s, t) + normalised, rtol=1e-6)
    total, terms = distill_loss(s, y, weights={"output": 0.0, "feature": 0.0})
    assert set(terms) == {"task"}


def test_schedule_matches_diffusers():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction")
    acp = alphas_cumprod()
    # float32 rounding of linspace/cumprod differs between numpy and torch by an ulp or two
    np.testing.assert_allclose(acp, scheduler.alphas_cumprod.numpy(), rtol=3e-6, atol=0)
    import torch

    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal((3, 4, 4, 4)).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 999])
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(add_noise(acp, x0, noise, t), scheduler.add_noise(*args).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prediction_target(acp, x0, noise, t, "v_prediction"),
                               scheduler.get_velocity(*args).numpy(), rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(unet_folders, plan_file, tmp_path, monkeypatch):
    from jaxdistill import train

    teacher = unet_folders["micro"]
    # a resume restores into the training state's shapes alone: no second state on the devices beside it
    targets = []
    restore = train._restore
    monkeypatch.setattr(train, "_restore", lambda manager, state: (targets.append(state), restore(manager, state))[1])
    # EMA on: its state must resume exactly too (the stage's output is the EMA), and so must the draws of
    # diffusers' script's options. The straight run also traces steps 2–3 (config.profile): the trace must
    # hold the step's XLA ops and change nothing.
    options = {"ema_decay": 0.9, "noise_offset": 0.05, "empty_prompt_rate": 0.3, "loss.snr_gamma": 5.0}
    straight_summary = run(small_config(teacher, plan_file, **options, **{"profile.first": 2, "profile.steps": 2}),
                           tmp_path / "straight")
    traces = list((tmp_path / "straight" / "tensorboard" / "main" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    planes = jax.profiler.ProfileData.from_file(str(traces[0])).planes
    assert any(dict(e.stats).get("hlo_op") for p in planes for line in p.lines for e in line.events)
    (tmp_path / "resumed").mkdir()
    with open(tmp_path / "resumed" / "metrics.jsonl", "w") as f:  # a run killed before its first checkpoint
        f.write(json.dumps({"stage": "main", "step": 1, "loss": 5.0}) + '\n{"stage": "ma')
    run(small_config(teacher, plan_file, **options, steps=3), tmp_path / "resumed")  # checkpoint at 3, stop
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # what a killed run logged after its checkpoint
        f.write(json.dumps({"stage": "main", "step": 4, "loss": 123.0}) + '\n{"stage": "ma')
    resumed_summary = run(small_config(teacher, plan_file, **options), tmp_path / "resumed")  # at 3: 4..6
    assert len(targets) == 1 and all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(targets[0]))
    _, straight = load_unet(tmp_path / "straight" / "stages" / "main")
    _, resumed = load_unet(tmp_path / "resumed" / "stages" / "main")
    for k, v in flatten_dict(straight).items():
        assert np.array_equal(np.asarray(v), np.asarray(flatten_dict(resumed)[k])), k
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert {"task", "output_kd", "feature_kd", "grad_norm", "lr"} <= set(a[-1])
    assert any(k.startswith("feature/") for k in a[-1])
    # rates leave out each process's first step (its compilation): none at steps 1 and 4 of the resumed run
    assert [r["step"] for r in b if "samples_per_s" in r] == [2, 3, 5, 6]
    # the agreement before training is the initial student's, also for the resumed run (kept in the checkpoint)
    assert straight_summary["main"]["agreement_before"] is not None
    assert resumed_summary == straight_summary
    assert os.listdir(tmp_path / "straight" / "tensorboard" / "main")
    # a config whose training state differs from the checkpoint's (EMA off now) is refused, naming the cause
    saved = (tmp_path / "resumed" / "config.json").read_text()
    with pytest.raises(ValueError, match="another layout than this config builds .*ema_decay"):
        run(small_config(teacher, plan_file, ema_decay=0.0, steps=8), tmp_path / "resumed")
    # so is one that would draw other noise or batches — before any model is read — and the run's record stays
    for changes, named in ((dict(seed=7), "seed: 0 → 7"), ({"optimizer.accumulation": 2}, "accumulation: 1 → 2"),
                           ({"data.num_examples": 8}, "num_examples: 16 → 8")):
        with pytest.raises(ValueError, match=f"{named}.*allow_resume_changes"):
            run(small_config(teacher, plan_file, ema_decay=0.9, steps=8, **changes), tmp_path / "resumed")
    assert (tmp_path / "resumed" / "config.json").read_text() == saved
    # other changes are allowed and said; the plan must cut the student from the same teacher layers
    stages = stages_of(small_config(teacher, plan_file, ema_decay=0.9, steps=8, **{"optimizer.lr": 2e-3}))
    checked, notes = check_stages(stages, tmp_path / "resumed")
    assert not checked["main"].finished and "optimizer.lr: 0.001 → 0.002" in notes[0] and "steps: 6 → 8" in notes[0]
    other = tmp_path / "other_layers.json"  # the same architecture from layer 0 instead of 1
    PrunePlan(name="test", attentions={"up_blocks.0.attentions.0": 1, "up_blocks.0.attentions.1": [0]}).save(other)
    (tmp_path / "resumed" / "stages" / "main" / STAGE_MARKER).unlink()  # as if killed before the end: the checkpoint
    with pytest.raises(ValueError, match=r"checkpoint .* was trained with other settings \(kept_layers"):
        check_stages(stages_of(small_config(teacher, str(other), ema_decay=0.9, steps=8)), tmp_path / "resumed")
    # allowed, other data is still said; so is a checkpoint already past the steps asked for
    allowed = small_config(teacher, plan_file, ema_decay=0.9, steps=8, allow_resume_changes=True,
                           **{"data.num_examples": 8})
    _, notes = check_stages(stages_of(allowed), tmp_path / "resumed")
    assert any("resuming anyway (allow_resume_changes)" in n and "num_examples" in n for n in notes), notes
    _, notes = check_stages(stages_of(small_config(teacher, plan_file, ema_decay=0.9, steps=2)), tmp_path / "resumed")
    assert any("its checkpoint is at step 6, past steps=2" in n for n in notes), notes


def test_sigterm_checkpoints_and_the_command_resumes(unet_folders, plan_file, tmp_path):
    config = write_config_file(tmp_path / "config.py",
                               small_config(unet_folders["micro"], plan_file, steps=10_000,
                                            checkpoint_every=10_000, compilation_cache="auto"))
    cmd = [sys.executable, "-m", "jaxdistill.train", "--config", config, "--workdir", str(tmp_path / "run")]
    # during setup (its first line is printed before the model loads): nothing to save, and a line says so
    proc = subprocess.Popen(cmd, env=ENV | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out = first + proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM: stopped outside the training loop" in out, out
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            os.path.exists(tmp_path / "run" / "metrics.jsonl") and len(metrics(tmp_path / "run")) >= 3):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped >= 3
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "main" / str(stopped))
    cache = tmp_path / "run" / "xla_cache"  # compilation_cache "auto": the compiled programs are kept
    entries = set(os.listdir(cache))
    assert any("step" in name for name in entries), entries
    # the same command, now with a reachable end, resumes where it stopped
    write_config_file(tmp_path / "config.py", small_config(unet_folders["micro"], plan_file, steps=stopped + 2,
                                                          checkpoint_every=10_000, compilation_cache="auto"))
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=True).stdout
    assert f"resumed from step {stopped}" in out
    assert [r["step"] for r in metrics(tmp_path / "run")][-2:] == [stopped + 1, stopped + 2]
    assert set(os.listdir(cache)) == entries  # the resumed run read every program back, compiled nothing new


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(unet_folders, plan_file, tmp_path,
                                                                          monkeypatch):
    clean = SyntheticLatents.batch

    def poisoned(self, step, whole=False):
        batch = clean(self, step, whole)
        if step == 4:  # the 5th step
            batch["latents"] = np.full_like(batch["latents"], np.nan)
        return batch

    monkeypatch.setattr(SyntheticLatents, "batch", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 5: non-finite .*task=nan") as info:
        run(small_config(unet_folders["micro"], plan_file, steps=8, checkpoint_every=2), tmp_path)
    assert "last good checkpoint is step 4" in str(info.value)
    assert sorted(os.listdir(tmp_path / "checkpoints" / "main")) == ["2", "4"]
    assert not (tmp_path / "stages" / "main").exists()


def test_out_of_device_memory_says_what_to_change_and_keeps_the_last_checkpoint(unet_folders, plan_file, tmp_path,
                                                                                  monkeypatch):
    """XLA's RESOURCE_EXHAUSTED (here raised when the 3rd step's metrics are read, as a GPU's allocator raised it
    on the H100) stops the run with the micro-batch and what to change, not a 40-line traceback. The same run
    trains with a timestep bias: the trainer hands its weights to the step."""
    import jaxdistill.train as train_module

    reads, handed = [], {}

    class ThirdStepTooBig:  # jax, but reading the 3rd step's metrics runs out of device memory
        def __getattr__(self, name):
            return getattr(jax, name)

        def device_get(self, tree):
            if isinstance(tree, dict) and "grad_norm" in tree:
                reads.append(1)
                if len(reads) == 3:
                    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                                     "37.56GiB with allocator GPU_0_bfc on device 0. [tf-allocator]")
            return jax.device_get(tree)

    real_make_train_step = train_module.make_train_step

    def make_train_step(*args, **kwargs):
        handed["timestep_weights"] = kwargs.get("timestep_weights")
        return real_make_train_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "make_train_step", make_train_step)
    monkeypatch.setattr(train_module, "jax", ThirdStepTooBig())
    config = small_config(unet_folders["micro"], plan_file, steps=6, checkpoint_every=2)  # batch 4, no accumulation
    config.timestep_bias.strategy, config.timestep_bias.multiplier = "later", 3.0
    with pytest.raises(train_module.OutOfDeviceMemory) as info:
        run(config, tmp_path)
    np.testing.assert_allclose(handed["timestep_weights"][-1], 3 / 1500)  # the last quarter, thrice as often
    message = str(info.value)
    assert message.startswith("stage main, step 3: a micro-batch of 4 does not fit")
    assert "(--config.optimizer.accumulation=2: 2 per batch shard)" in message and "--config.remat=dots" in message
    assert "last good checkpoint is step 2" in message and "it resumes from step 2" in message
    assert "allow_resume_changes" in message and "37.56GiB" in message and "[tf-allocator]" not in message
    assert sorted(os.listdir(tmp_path / "checkpoints" / "main")) == ["2"]

    # the advice by device count: accumulation only where it shrinks the micro-batch on each shard
    assert memory_advice(config, {"data": 1, "fsdp": 1}, "gpu").endswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.97)")
    config.batch_size = 8
    on_eight = memory_advice(config, {"data": 1, "fsdp": 8, "tensor": 1}, "cpu")  # 1 example per device already
    assert on_eight.startswith("a micro-batch of 8 (1 per batch shard)") and "accumulation" not in on_eight
    assert "fsdp" not in on_eight
    config.batch_size = 64
    by_data = memory_advice(config, {"data": 8, "fsdp": 1, "tensor": 1}, "cpu")  # fsdp -1 resolved to 1
    assert "accumulation=2: 4 per batch shard" in by_data and "an fsdp axis" in by_data
    config.batch_size, config.remat = 1, "full"  # nothing left to change in this run's own settings
    assert memory_advice(config, {"data": 1, "fsdp": 1}, "cpu").endswith("try a smaller student, resolution or "
                                                                        "batch_size")


def test_the_logger_writes_tensorboard_without_importing_pytorch(tmp_path):
    """tensorboardX imports PyTorch where it is installed (~2 s of every training start) to accept its tensors; a
    training process keeps it out and still writes TensorBoard's scalars and images."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    script = ("import sys; from pathlib import Path; from PIL import Image; from jaxdistill.train import _Logger\n"
              f"log = _Logger(Path({str(tmp_path)!r}), 'main', 2, 0, 4)\n"
              "log.scalars(1, {'loss': 0.5}); log.image(1, 'grid', Image.new('RGB', (8, 6))); log.writer.close()\n"
              "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], env=cpu_env(), capture_output=True, text=True, check=True)
    assert "torch imported: False" in out.stdout, out.stdout + out.stderr
    [events_file] = (tmp_path / "tensorboard" / "main").glob("events.out.tfevents.*")
    data, at, values = events_file.read_bytes(), 0, {}
    while at < len(data):  # TFRecords: length (8 bytes), its CRC (4), the event, its CRC (4)
        (length,) = struct.unpack("<Q", data[at:at + 8])
        for value in Event.FromString(data[at + 12:at + 12 + length]).summary.value:
            values[value.tag] = value
        at += 16 + length
    assert values["main/loss"].simple_value == 0.5
    assert (values["main/grid"].image.width, values["main/grid"].image.height) == (8, 6)


def test_a_setting_newer_than_the_checkpoint_counts_as_its_default_on_resume():
    """A checkpoint written before `timestep_bias` (or `loss.snr_gamma`) existed trained without it: turning it on
    at the resume is a change, noted and recorded (it was not: fields one side lacked were skipped)."""
    from jaxdistill.train import _resume_changes

    old = base_config().to_dict()
    del old["timestep_bias"], old["loss"]["snr_gamma"]
    now = base_config()
    now.timestep_bias.strategy, now.timestep_bias.multiplier = "later", 2.0
    assert _resume_changes({"config": old}, now) == {"timestep_bias.multiplier": (1.0, 2.0),
                                                     "timestep_bias.strategy": ("none", "later")}


def test_a_failed_or_damaged_checkpoint_is_named_with_the_last_good_one(unet_folders, plan_file, tmp_path,
                                                                        monkeypatch, capsys):
    """A background save that fails (a full disk) stops the run at the next step, naming the last good
    checkpoint; it used to surface only at the next save, a whole interval of training later. A damaged newest
    checkpoint is named with the step the run resumes from once it is moved aside (it was blamed on a config
    change, and a new --workdir advised). A finished run started again with other settings says they were not
    applied, and its config.json stays the one it trained with."""
    import orbax.checkpoint as ocp

    real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished

    def save(self, step, *args, **kwargs):
        saved = real_save(self, step, *args, **kwargs)  # it waits for the save before (wait, below)
        self.fail_step = step if step == 4 else None
        return saved

    def wait(self):  # orbax re-raises a background save's error here, once
        real_wait(self)
        if getattr(self, "fail_step", None):
            shutil.rmtree(self.directory / str(self.fail_step))
            self.fail_step = None
            raise ValueError("RESOURCE_EXHAUSTED: Error writing \"opt_state\": No space left on device")

    config = small_config(unet_folders["micro"], plan_file, steps=8, checkpoint_every=2)
    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", save)
        patch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
        with pytest.raises(ValueError, match=r"could not write the checkpoint of step 4 in .*No space left on device; "
                                             r".* [kMG]?B free there\nstage main: the last good checkpoint is step 2"):
            run(config, tmp_path)
    assert max(r["step"] for r in metrics(tmp_path)) <= 6  # stopped within steps of the failure, not at step 8
    assert "main: checkpoint of step 2 written (" in capsys.readouterr().out

    run(small_config(unet_folders["micro"], plan_file, steps=4, checkpoint_every=2), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints" / "main"
    shutil.rmtree(tmp_path / "run" / "stages")
    for f in (checkpoints / "4" / "state").rglob("*"):  # a copy cut short
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"cannot restore the checkpoint {checkpoints / '4'}: .* or it is damaged: "
                                         rf"move it aside \(mv {checkpoints / '4'} {checkpoints / '4.damaged'}\) and "
                                         r"the same command resumes from step 2, the newest before it"):
        run(small_config(unet_folders["micro"], plan_file, steps=4, checkpoint_every=2), tmp_path / "run")
    os.rename(checkpoints / "4", checkpoints / "4.damaged")
    capsys.readouterr()
    run(small_config(unet_folders["micro"], plan_file, steps=4, checkpoint_every=2, **{"optimizer.lr": 5e-3}),
        tmp_path / "run")
    assert "resumed from step 2" in capsys.readouterr().out and (tmp_path / "run" / "stages" / "main").is_dir()
    # the record keeps what the resume changed: the config alone claimed lr 0.005 for every step
    from jaxdistill.export import export

    card = (export(tmp_path / "run", tmp_path / "export") / "README.md").read_text()
    assert "| changed on resume | from step 2: optimizer.lr: 0.001 → 0.005 |" in card
    recorded = (tmp_path / "run" / "config.json").read_text()
    run(small_config(unet_folders["micro"], plan_file, steps=4, checkpoint_every=2, **{"optimizer.lr": 1e-2}),
        tmp_path / "run")
    assert ("already finished" in (out := capsys.readouterr().out) and
            "not trained again with the changed optimizer.lr: 0.005 → 0.01" in out)
    assert (tmp_path / "run" / "config.json").read_text() == recorded


def test_student_loss_falls_over_30_steps_and_progressive_stages(unet_folders, plan_file, tmp_path, monkeypatch):
    config = small_config("", "", steps=30, checkpoint_every=30)
    config.stages = [
        # plain diffusion training (fine-tuning a UNet): no teacher, output and feature weights 0
        dict(name="teacher", student=str(shutil.copytree(unet_folders["micro"], tmp_path / "micro")), steps=30,
             loss=dict(output=0.0, feature=0.0)),
        # distil a pruned student from it; the plan named relative to the working directory
        dict(name="student", teacher="previous", plan=os.path.basename(plan_file), steps=30, lr=3e-4),
    ]
    monkeypatch.chdir(os.path.dirname(plan_file))
    summary = run(config, tmp_path)
    # recorded in full: the records name the same files read from any working directory
    recorded = [json.loads((tmp_path / "config.json").read_text())["stages"][1]["plan"],
                json.loads((tmp_path / "stages" / "student" / STAGE_MARKER).read_text())["plan"]]
    assert recorded == [os.path.abspath(plan_file)] * 2
    rows = metrics(tmp_path)
    for stage in ("teacher", "student"):
        losses = [r["loss"] for r in rows if r["stage"] == stage]
        assert len(losses) == 30
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (stage, losses)
    assert {"agreement_before", "agreement_after"} <= set(summary["student"])
    student_spec, _ = load_unet(tmp_path / "stages" / "student")
    assert student_spec.up_depths[0] == (1, 1)
    # model TFLOP/s per device beside samples/s: plain training counts 3 student forwards per sample,
    # distillation adds the teacher's forward (8×8 latents, 8 text tokens)
    teacher_spec, _ = load_unet(tmp_path / "stages" / "teacher")
    per_sample = {"teacher": 3 * flops(teacher_spec, 1, (8, 8), 8),
                  "student": flops(teacher_spec, 1, (8, 8), 8) + 3 * flops(student_spec, 1, (8, 8), 8)}
    for r in rows:
        if "samples_per_s" in r and r["step"] > 1:
            expected = per_sample[r["stage"]] * r["samples_per_s"] / jax.device_count() / 1e12
            assert expected > 0 and r["tflop_per_s_per_device"] == pytest.approx(expected, rel=1e-9), r
            assert 0 <= r["data_wait"] < 1, r  # a share of the time since the last record
    # the whole sequence resumes like a single run: finished stages are not trained again, and need only their
    # own folders (the first stage's source may be gone by then)
    shutil.rmtree(tmp_path / "micro")
    assert run(config, tmp_path) == {}
    shutil.copytree(unet_folders["micro"], tmp_path / "micro")
    # a finished stage made with another plan is not silently taken as this config's; the run's config stays
    saved = (tmp_path / "config.json").read_text()
    config.stages[1]["plan"] = "vega"
    with pytest.raises(ValueError, match=r"stage student in .* was finished with other settings \(plan: "):
        run(config, tmp_path)
    assert (tmp_path / "config.json").read_text() == saved
    # the same plan file by another spelling of its path is the same plan: still finished
    config.stages[1]["plan"] = os.path.join(os.path.dirname(plan_file), ".", os.path.basename(plan_file))
    assert run(config, tmp_path) == {}
    monkeypatch.chdir(tmp_path)  # also relative to another working directory (the record was not read from it)
    config.stages[1]["plan"] = os.path.relpath(plan_file, tmp_path)
    assert run(config, tmp_path) == {}
    # the student was distilled from the 30-step teacher stage: a longer teacher stage would make another one
    config.stages[1]["plan"] = plan_file
    config.stages[0]["steps"] = 40
    with pytest.raises(ValueError, match=r"stage student .* \(previous.steps: 30 → 40\)"):
        run(config, tmp_path)


@pytest.mark.parametrize("changes, fields", [
    (dict(steps=-1), ["config.steps=-1"]),
    ({"loss.normalize": "l2", "optimizer.accumulation": 3}, ["config.loss.normalize='l2'",
                                                            "config.optimizer.accumulation=3"]),
    ({"precision.teacher": "float16", "schedule.prediction_type": "sample"}, ["config.precision.teacher",
                                                                               "config.schedule.prediction_type"]),
    (dict(teacher=""), ["config.teacher"]),
    (dict(attention="flash", remat="some"), ["config.attention='flash'", "config.remat='some'"]),
    ({"profile.first": 0, "compilation_cache": None}, ["config.profile.first=0", "config.compilation_cache=None"]),
    (dict(stages=[dict(name="a", learning_rate=1.0)]), ["config.stages[0]", "learning_rate"]),
    # a stage's values are checked before the first stage trains, nested typos included
    (dict(stages=[dict(name="a", steps=10), dict(name="b", steps=-5, lr=-1.0)]),
     ["config.stages[b].steps=-5", "config.stages[b].optimizer.lr=-1.0"]),
    (dict(stages=[dict(name="a", loss=dict(fetaure=0.0))]), ["config.stages[a].loss", "['fetaure']"]),
    (dict(stages=[dict(name="a", steps="ten")]), ["config.stages[a].steps='ten'"]),
    (dict(stages=[dict(name="a"), dict(name="a")]), ["config.stages[1] repeats the name 'a'"]),
    (dict(stages=[dict(name="a"), "b"], steps=-1), ["config.stages[1]='b': expected a dict", "config.steps=-1"]),
    # orbax's max_to_keep=0 keeps nothing; a negative clip is gradient ascent; a negative warmup holds lr at 0
    ({"keep_checkpoints": 0, "optimizer.grad_clip": -1.0, "optimizer.warmup_steps": -10},
     ["config.keep_checkpoints=0", "config.optimizer.grad_clip=-1.0", "config.optimizer.warmup_steps=-10"]),
    ({"seed": 2**32, "optimizer.b2": 1.0, "optimizer.eps": 0.0, "optimizer.weight_decay": -0.1},
     ["config.seed=4294967296", "config.optimizer.b2=1.0", "config.optimizer.eps=0.0", "optimizer.weight_decay"]),
    ({"loss.taps": " , "}, ["config.loss.taps"]),
    ({"data.workers": -1, "mesh.dcn.data": -1}, ["config.data.workers=-1", "config.mesh.dcn"]),
    ({"noise_offset": -0.1, "empty_prompt_rate": 1.5, "loss.snr_gamma": -5.0},
     ["config.noise_offset=-0.1", "config.empty_prompt_rate=1.5", "config.loss.snr_gamma=-5.0"]),
    # a zero loss (it only decayed the weights); sizes the VAE cannot take; no validation steps
    ({"loss.task": 0.0, "loss.output": 0.0, "loss.feature": 0.0, "data.resolution": 100, "eval.steps": 0},
     ["config.loss.task=0.0: expected > 0 where", "config.data.resolution=100", "config.eval.steps=0"]),
    # a data.path the synthetic source would not read (it trained on generated latents without a word)
    ({"data.path": "data/laion", "data.resolution": 0}, ["config.data.source='synthetic': expected 'prepared' or "
                                                         "'images' to read data.path='data/laion'",
                                                         "config.data.resolution=0"]),
    # diffusers' timestep bias: an unknown strategy; a multiplier with no strategy (it would bias nothing)
    ({"timestep_bias.strategy": "late"}, ["config.timestep_bias.strategy='late': expected one of"]),
    ({"timestep_bias.multiplier": 2.0}, ["config.timestep_bias.multiplier=2.0: expected 1.0 where timestep_bias."
                                          "strategy is 'none', which does not use it"]),
    ({"timestep_bias.strategy": "later", "timestep_bias.end": 500}, ["config.timestep_bias.end=500: expected 1000 "
                                                                      "where timestep_bias.strategy is 'later'"]),
    # a portion under one timestep (diffusers' slice(-0, None) would favour all of them); an empty range
    ({"timestep_bias.strategy": "later", "timestep_bias.portion": 0.0001, "timestep_bias.multiplier": 0.0},
     ["config.timestep_bias.portion=0.0001: expected in [1/1000, 1]", "config.timestep_bias.multiplier=0.0"]),
    ({"timestep_bias.strategy": "range", "timestep_bias.begin": 500, "timestep_bias.end": 200},
     ["config.timestep_bias.end=200: expected in (begin=500, 1000]"]),
    ({"timestep_bias.strategy": "range", "timestep_bias.begin": -1, "timestep_bias.end": 1001},
     ["config.timestep_bias.begin=-1: expected in [0, 1000)", "config.timestep_bias.end=1001"]),
])
def test_bad_config_values_are_named(changes, fields):
    config = small_config("some/teacher", "ssd1b")
    with config.unlocked():
        for key, value in changes.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    with pytest.raises(ValueError) as info:
        validate(config)
    for field in fields:
        assert field in str(info.value)


def test_bad_command_line_override_is_reported(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", "configs/tiny.py",
                             "--workdir", str(tmp_path), "--config.optimizer.lr=-1",
                             # tuple fields take Python's tuple syntax (ml_collections refuses lists)
                             "--config.eval.prompts=('a cat',)", "--config.eval.seeds=(0, 1)",
                             "--config.mesh.rules=(('embed', 'fsdp'), ('mlp', 'tensor'))"],
                            env=ENV, capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert result.returncode == 1 and "parsing error" not in result.stderr, result.stderr[-2000:]
    assert "config.optimizer.lr=-1" in result.stderr
    typo = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", "configs/tiny.py",
                           "--workdir", str(tmp_path), "--config.optimzer.lr=1e-3"], env=ENV, capture_output=True,
                          text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert 'unknown config field on the command line: \'optimzer\': Did you mean "optimizer"' in typo.stderr
    nested = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", "configs/tiny.py",
                             "--workdir", str(tmp_path), "--config.resolution=64"], env=ENV, capture_output=True,
                            text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert nested.returncode == 2 and "did you mean --config.data.resolution?" in nested.stderr, nested.stderr[-2000:]
    staged = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", "configs/tiny.py",
                             "--workdir", str(tmp_path), "--config.stages[1].stesp=5"], env=ENV, capture_output=True,
                            text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert "did you mean --config.stages[1].steps?" in staged.stderr, staged.stderr[-2000:]  # a stage's own field
    assert fields_like("warmup_step") == ["optimizer.warmup_steps"] and fields_like("nothing_like_it") == []
    stray = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", "configs/tiny.py",
                            "--workdir", str(tmp_path), "steps=10"], env=ENV, capture_output=True, text=True,
                           cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert stray.returncode == 2 and "unexpected arguments ['steps=10']" in stray.stderr, stray.stderr[-2000:]
    # the same mistake inside a config file is not the command line's: the traceback says where it is
    (tmp_path / "bad.py").write_text("from jaxdistill.config import base_config\n\n\ndef get_config():\n"
                                     "    c = base_config()\n    c.optimzer.lr = 1e-3\n    return c\n")
    in_file = subprocess.run([sys.executable, "-m", "jaxdistill.train", "--config", str(tmp_path / "bad.py"),
                              "--workdir", str(tmp_path)], env=ENV, capture_output=True, text=True)
    assert in_file.returncode != 0 and "bad.py" in in_file.stderr and "command line" not in in_file.stderr
    missing = subprocess.run([sys.executable, "-m", "jaxdistill.train", f"--config={tmp_path}/tinyy.py",
                              "--workdir", str(tmp_path)], env=ENV, capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"--config {tmp_path}/tinyy.py: no such file" in missing.stderr


def test_paths_are_recorded_in_full(tmp_path, monkeypatch):
    from jaxdistill.config import absolute_path, absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "plan.json").write_text("{}")
    assert absolute_path("teacher", "sdxl") == str(tmp_path / "sdxl")
    assert absolute_path("plan", "plan.json") == str(tmp_path / "plan.json")
    assert absolute_path("data.path", "tar:shards/*.tar") == f"tar:{tmp_path}/shards/*.tar"  # a glob: as given
    assert absolute_path("data.path", "folder:sdxl") == f"folder:{tmp_path}/sdxl"
    # kept as typed: presets, "previous", tfds names, URLs, and paths that do not exist (their errors name them)
    for field, value in (("plan", "ssd1b"), ("teacher", "previous"), ("data.path", "tfds:laion:train"),
                         ("data.path", "gs://bucket/prepared"), ("data.path", "tar:gs://b/*.tar"), ("teacher", "nope"),
                         ("teacher", "")):
        assert absolute_path(field, value) == value, (field, value)
    c = base_config()
    c.teacher, c.data.pipeline = "sdxl", "sdxl"
    c.stages = [dict(name="a", plan="plan.json"), dict(name="b", teacher="previous", plan="vega")]
    out = absolute_paths(c)
    assert (out.teacher, out.data.pipeline, out.stages[0]["plan"], out.stages[1]["plan"], out.stages[1]["teacher"]) == (
        str(tmp_path / "sdxl"), str(tmp_path / "sdxl"), str(tmp_path / "plan.json"), "vega", "previous")
    assert c.teacher == "sdxl" and c.stages[0]["plan"] == "plan.json"  # the caller's config is left as it was


def test_command_line_values_apply_to_every_stage():
    """--config.steps=4 with the tiny config's stages (400 and 150 steps): 4 in both, and said so."""
    import ml_collections

    from jaxdistill.config import command_line_wins, stages_of

    c = base_config()
    c.stages = [ml_collections.ConfigDict(dict(name="a", plan="ssd1b", steps=400, loss=dict(output=0.0),
                                               optimizer=dict(lr=1e-3, schedule="cosine"))),
                dict(name="b", teacher="previous", plan="vega", steps=150, lr=5e-5)]
    c.teacher, c.plan, c.steps, c.optimizer.lr = "SDXL_DIR", "x.json", 4, 2e-4
    notes = command_line_wins(c, ["teacher", "plan", "steps", "optimizer.lr", "batch_size"])
    assert "stage a's steps=400" in notes[1] and "stage b's lr=5e-05" in notes[-1]
    assert "does not apply to stage b, which sets its own plan='vega'" in notes[3]
    a, b = stages_of(c)
    assert (a.steps, b.steps, a.optimizer.lr, b.optimizer.lr) == (4, 4, 2e-4, 2e-4)
    assert a.optimizer.schedule == "cosine" and a.loss.output == 0.0  # what the command line did not set stays
    # the stages keep what makes them: their plans, and b distils from a's student, not from --config.teacher
    assert (a.plan, b.plan, a.teacher, b.teacher) == ("ssd1b", "vega", "SDXL_DIR", "previous")
    # a stage that trains from scratch is skipped when --config.teacher is given (tiny.py's "teacher"): no
    # note about its values
    c.stages = [dict(name="scratch", model="tiny-sdxl", steps=400), dict(name="b", teacher="previous", steps=150)]
    notes = command_line_wins(c, ["teacher", "steps"])
    assert len(notes) == 1 and "stage b's steps=150" in notes[0], notes
    assert [s.name for s in stages_of(c)] == ["b"]
    # --config.teacher is the first stage's teacher also where that stage names its own; a later one keeps its
    c.stages = [dict(name="a", teacher="/models/sdxl"), dict(name="b", teacher="previous"),
                dict(name="c", teacher="/models/other")]
    notes = command_line_wins(c, ["teacher"])
    assert notes == ["config.teacher from the command line replaces stage a's teacher='/models/sdxl'",
                     "config.teacher from the command line does not apply to stage c, which sets its own "
                     "teacher='/models/other'"], notes
    assert [s.teacher for s in stages_of(c)] == ["SDXL_DIR", "previous", "/models/other"]


def test_distillation_without_a_teacher_is_refused(tmp_path):
    config = small_config("", "", steps=2)
    config.model = "tiny-vega"  # from scratch, but the default loss weights ask for a teacher
    with pytest.raises(ValueError, match="there is none"):
        run(config, tmp_path)
    jax.clear_caches()


def test_a_pipeline_trained_on_another_noise_schedule_is_refused(tmp_path):
    """A v-prediction teacher (its scheduler config says so) is not distilled with epsilon targets."""
    from jaxdistill.reference import write_random_pipeline
    from jaxdistill.schedule import schedule_mismatches

    pipeline = write_random_pipeline(tmp_path / "sdxl")
    scheduler = pipeline / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    assert schedule_mismatches(base_config().schedule, config) == []  # SDXL's own: agrees
    scheduler.write_text(json.dumps(config | {"prediction_type": "v_prediction", "beta_end": 0.02}))
    with pytest.raises(ValueError, match="prediction_type: the config has 'epsilon', the pipeline 'v_prediction'"):
        run(small_config(str(pipeline), "", steps=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    fixed = small_config(str(pipeline), "", **{"schedule.prediction_type": "v_prediction", "schedule.beta_end": 0.02})
    assert schedule_mismatches(fixed.schedule, json.loads(scheduler.read_text())) == []
    assert "rescale_betas_zero_snr" in schedule_mismatches(fixed.schedule, {"rescale_betas_zero_snr": True})[0]


def test_synthetic_data_is_deterministic_per_step():
    from jaxdistill import presets

    a = SyntheticLatents(presets.tiny(presets.VEGA), resolution=64, seq_len=8, num_examples=16, batch_size=4, seed=3)
    b = SyntheticLatents(presets.tiny(presets.VEGA), resolution=64, seq_len=8, num_examples=16, batch_size=4, seed=3)
    for step in (0, 5, 17):
        for k, v in a.batch(step).items():
            np.testing.assert_array_equal(v, b.batch(step)[k])
    assert not np.array_equal(a.batch(0)["latents"], a.batch(1)["latents"])
    assert a.batch(0)["latents"].shape == (4, 8, 8, 4) and jnp.isfinite(a.batch(0)["latents"]).all()


def test_tiny_config_with_a_given_teacher_distils_that_teacher():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert [(s.name, s.teacher, s.plan) for s in stages_of(config)] == [("teacher", "", ""),
                                                                        ("ssd1b", "previous", "ssd1b")]
    config.teacher = "/some/sdxl-pipeline"
    assert [(s.name, s.teacher, s.plan) for s in stages_of(config)] == [("ssd1b", "/some/sdxl-pipeline", "ssd1b")]


def test_taps_and_sensitivity_settings_reach_the_run(unet_folders, plan_file, tmp_path):
    assert tap_list("all") == "all" and tap_list("stages") == "stages"
    assert tap_list("down_blocks.0.resnets.0, mid_block") == ["down_blocks.0.resnets.0", "mid_block"]
    config = small_config(unet_folders["micro"], plan_file, steps=0)
    config.loss.taps = "mid_block,no_such_tap"
    with pytest.raises(ValueError, match=r"feature taps \['no_such_tap'\] do not exist"):
        run(config, tmp_path / "taps")
    config = small_config(unet_folders["micro"], plan_file, steps=0, sensitivity=str(tmp_path))
    with pytest.raises(ValueError, match="holds no sensitivity.json"):
        run(config, tmp_path / "sensitivity")


def test_a_sensitivity_plan_takes_its_layers_from_a_report_of_its_own_teacher(unet_folders, tmp_path):
    """As `python -m jaxdistill.prune --sensitivity` does: a report of another architecture or of other weights
    (a fine-tune) is refused, not used to pick the layers; a missing report names the config field."""
    import dataclasses

    from jaxdistill import sensitivity as S
    from jaxdistill.train import build_models

    plan = tmp_path / "plan.json"
    PrunePlan(name="s", strategy="sensitivity", attentions={"up_blocks.0.attentions.0": 1}).save(plan)

    def kept(report=None, weights=True):
        if report is not None:
            S.write_report(report, tmp_path / "report")
        config = small_config(unet_folders["micro"], str(plan), sensitivity=str(tmp_path / "report") if report else "")
        return build_models(stages_of(config)[0], None, weights=weights)[2]

    with pytest.raises(ValueError, match="give --config.sensitivity=REPORT_DIR"):
        kept(weights=False)
    spec, params = load_unet(unet_folders["micro"])
    priced = S.priced(spec, 8, teacher_flops=1.0)
    # layer 1 of up_blocks.0.attentions.0 hurts most when removed: the one kept
    rows = tuple(S.Row(r.unit, 2.0 if (r.unit.module, r.unit.index) == ("up_blocks.0.attentions.0", 1) else 1.0)
                 for r in priced.rows)
    report = dataclasses.replace(priced, rows=rows, teacher_digest=S.weights_digest(params))
    assert kept(report)["up_blocks.0.attentions.0"] == (1,)
    with pytest.raises(ValueError, match="of the same architecture .its weights differ"):
        kept(dataclasses.replace(report, teacher_digest="0" * 16))
    kept(dataclasses.replace(report, teacher_digest="0" * 16), weights=False)  # the weights are not read yet
    with pytest.raises(ValueError, match="another teacher architecture .* differs in mid_depth"):
        kept(dataclasses.replace(report, spec=spec.replace(mid_depth=1)), weights=False)


def test_a_student_folder_says_which_teacher_layers_it_kept(unet_folders, tmp_path):
    """A finished stage (or an export) as config.student: its marker's kept layers pair the resnet taps."""
    from jaxdistill.train import build_models

    folder = shutil.copytree(unet_folders["micro"], tmp_path / "stages" / "first")
    kept = {"down_blocks.1.resnets": [1]}
    (folder / STAGE_MARKER).write_text(json.dumps({"stage": "first", "steps": 3, "kept_layers": kept}))
    stage = stages_of(small_config(unet_folders["micro"], "", student=str(folder)))[0]
    assert build_models(stage, None)[2] == kept


def test_every_stage_is_checked_before_the_first_trains(unet_folders, plan_file, tmp_path):
    """A mistake in a later stage (or in the data) is found before anything trains, not days later."""
    for later, error in ((dict(plan="/plans/typo.json"), "typo.json"), (dict(teacher="/models/typo"), "/models/typo"),
                         (dict(data=dict(source="prepared", path=str(tmp_path / "none"))), "none")):
        config = small_config("", "", steps=2)
        config.stages = [dict(name="a", teacher=unet_folders["micro"], plan=plan_file),
                         dict(name="b", teacher="previous", plan="") | later]
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            run(config, tmp_path / "run")
        assert not (tmp_path / "run" / "stages").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_another_runs_workdir_is_refused(unet_folders, tmp_path):
    """Stages are compared by name on a resume: a workdir holding stages this config does not name (the
    tiny run's, given to the ssd1b config) would otherwise take a new stage beside them without a word."""
    (tmp_path / "run" / "stages" / "teacher").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "ssd1b").mkdir(parents=True)
    (tmp_path / "run" / "stages" / ".DS_Store").write_text("")  # not a stage: not named below
    config = small_config(unet_folders["micro"], "", steps=2)
    with pytest.raises(ValueError, match=r"holds stages this config does not define \(ssd1b, teacher; it defines "):
        run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_second_ctrl_c_exits_with_one_line_and_its_cut_save_is_removed_later(tmp_path):
    # the trainer's command, interrupted in the middle of the run: 130, one line, no tracebacks
    script = ("import sys; from jaxdistill import train\n"
              "def interrupted(config, workdir): raise KeyboardInterrupt\n"
              "train.run = interrupted\n"
              f"train.main(['train', '--config', 'configs/tiny.py', '--workdir', {str(tmp_path / 'run')!r}])\n")
    result = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True,
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert result.returncode == 130, result.stderr[-2000:]
    assert "stopped at once, unsaved" in result.stderr and "Traceback" not in result.stderr
    # the save it cut short is removed when the next run opens the stage's checkpoints; finished ones stay
    from jaxdistill.train import _checkpoint_manager

    stage = tmp_path / "checkpoints" / "main"
    (stage / "4.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    (stage / "4.orbax-checkpoint-tmp-1700000000" / "state").write_text("half")
    (stage / "2").mkdir()
    _checkpoint_manager(stage, small_config("", "")).close()
    assert sorted(p.name for p in stage.iterdir()) == ["2"]


def test_a_checkpoint_that_fills_the_disk_warns_of_the_next(tmp_path, monkeypatch):
    """The announcement of a written checkpoint gives its size and the free space in fitting units, and warns
    when the next checkpoint (about as large) will not fit."""
    import collections

    from jaxdistill import train

    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "state").write_bytes(bytes(3_000_000))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage(0, 0, 50_000_000_000))
    assert train._saved_note(7, tmp_path / "7") == "checkpoint of step 7 written (3.0 MB; 50.0 GB free there)"
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: usage(0, 0, 2_500_000))
    assert train._saved_note(7, tmp_path / "7") == (
        "checkpoint of step 7 written (3.0 MB; 2.5 MB free there; the next checkpoint will not fit: free space there, "
        "or lower keep_checkpoints)")


def test_a_second_ctrl_c_stops_at_once():
    from jaxdistill.train import _StopFlag

    for first in ((signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)):
        # Ctrl-C under launch/local.sh: the terminal's SIGINT and the launcher's SIGTERM, in either order
        with _StopFlag() as stop:
            for sig in first:
                os.kill(os.getpid(), sig)
                time.sleep(0.1)
            assert stop.requested in ("SIGINT", "SIGTERM")  # one request: checkpoint after this step
            with pytest.raises(KeyboardInterrupt):
                for sig in (signal.SIGINT, signal.SIGTERM):  # the second Ctrl-C, its SIGINT first
                    os.kill(os.getpid(), sig)
                    time.sleep(0.1)


def test_a_closed_terminal_asks_for_a_checkpoint():
    """SIGHUP (ssh or terminal gone) is a stop request like SIGTERM, not the default death, unsaved; the handler
    is the old one again afterwards."""
    from jaxdistill.train import _StopFlag

    before = signal.getsignal(signal.SIGHUP)
    with _StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)
        assert stop.requested == "SIGHUP"
    assert signal.getsignal(signal.SIGHUP) is before


def test_the_recipe_configs_read_prepared_data_and_startup_checks_name_what_is_wrong(unet_folders, tmp_path,
                                                                                     monkeypatch):
    """configs/ssd1b.py and vega.py want a prepared set (they used to train on synthetic latents unless told);
    a workdir that is a file, a validation pipeline that is not one and validation steps its scheduler cannot
    take are refused before anything trains; an image source's pipeline is checked before transformers reads
    it (its error spoke of Hub repo ids)."""
    import importlib.util

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("ssd1b", "vega"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.teacher = unet_folders["sdxl"]
        with pytest.raises(ValueError, match="config.data.path='': expected the prepared folder"):
            validate(config)
    config = small_config(unet_folders["sdxl"], "ssd1b")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile is a file; give a folder"):
        run(config, tmp_path / "afile" / "run")
    with monkeypatch.context() as patch:  # a read-only disk (root may write anywhere else): refused before loading
        patch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(tmp_path))
        with pytest.raises(ValueError, match=f"--workdir .*new/run: {tmp_path} is not writable"):
            run(config, tmp_path / "new" / "run")
    from jaxdistill.records import folder_lock

    (tmp_path / "held").mkdir()  # a run already training there (here: this process's own lock)
    with folder_lock(tmp_path / "held", "a training run"):
        with pytest.raises(ValueError, match=r"held is in use by a training run \(process \d+ on .+, since .+\); wait"):
            run(config, tmp_path / "held")
    for changes, message in [({"eval.every": 5, "eval.pipeline": str(tmp_path / "nowhere")},
                              "stage main: image validation \\(config.eval\\): .*nowhere: no such folder"),
                             ({"data.source": "images", "data.path": f"folder:{tmp_path}",
                               "data.pipeline": unet_folders["sdxl"]},
                              "config.data.pipeline=.*: no vae/config.json, text_encoder/config.json")]:
        bad = config.copy_and_resolve_references()
        for key, value in changes.items():
            section, _, field = key.partition(".")
            bad[section][field] = value
        with pytest.raises(ValueError, match=message):
            run(bad, tmp_path / "never")
    bad = config.copy_and_resolve_references()
    bad.plan = "vga"
    with pytest.raises(ValueError, match="stage main: prune plan 'vga' is neither a preset"):  # which stage's plan
        run(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()
