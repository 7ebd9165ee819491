"""`load_checkpoint` on another machine than the one that trained: a state sharded over 8 (simulated CPU)
devices, saved the way `jaxdistill.train` saves it, read back by a process with one device — weights equal
bit for bit, by default the EMA weights when the run kept them (what it hands on), and nothing of the optimizer
state or the other weights read."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY, cpu_env

SAVE = """
import json, sys
from pathlib import Path
import jax, numpy as np
from flax.traverse_util import flatten_dict
from ml_collections import ConfigDict
from jaxdistill.sharding import make_mesh, shard_params
from jaxdistill.spec import UNetSpec
from jaxdistill.step import init_state, make_optimizer
from jaxdistill.train import _checkpoint_manager, _save_args
from jaxdistill.unet import init_params

workdir, spec = Path(sys.argv[1]), UNetSpec.from_diffusers_config(json.loads(sys.argv[2]))
assert jax.device_count() == 8, jax.devices()
mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
state = init_state(shard_params(init_params(spec, jax.random.key(0)), mesh), make_optimizer(1e-3)[0], ema=True)
# EMA weights that differ from the trained ones, placed like them
state = state.replace(ema_params=jax.tree.map(lambda x: x * 2 + 1, state.ema_params))
assert any(s is not None for x in jax.tree.leaves(state.params) for s in x.sharding.spec), "nothing sharded"
meta = {"stage": "main", "student_config": spec.to_diffusers_config(), "config": {"scan_layers": False},
        "data_position": 3}
for stage, s in (("ema", state), ("plain", state.replace(ema_params=None))):
    manager = _checkpoint_manager(workdir / "checkpoints" / stage, ConfigDict({"keep_checkpoints": 2}))
    manager.save(3, args=_save_args(s, meta))
    manager.wait_until_finished()
    manager.close()
for name, tree in (("params", state.params), ("ema_params", state.ema_params)):
    np.savez(workdir / f"{name}.npz", **{"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()})
"""

LOAD = """
import json, sys
from pathlib import Path
import jax, numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict
from jaxdistill.checkpoint import CheckpointError, load_checkpoint

# every array orbax reads passes through one of these handlers: record what was read
read = []
for handler in (ocp.type_handlers.NumpyHandler, ocp.type_handlers.ScalarHandler, ocp.type_handlers.ArrayHandler):
    async def spy(self, infos, args=None, _original=handler.deserialize):
        read.extend(info.name for info in infos)
        return await _original(self, infos, args)
    handler.deserialize = spy

workdir, out = Path(sys.argv[1]), {"devices": jax.device_count()}
for name, stage, ema in (("params", "ema", False), ("ema_params", "ema", True), ("default", "ema", None),
                         ("plain_default", "plain", None)):
    read.clear()
    _, params, meta = load_checkpoint(workdir, ema=ema, stage=stage)
    np.savez(workdir / f"loaded_{name}.npz", **{"/".join(k): v for k, v in flatten_dict(params).items()})
    out[name] = {"read": sorted(read), "types": sorted({type(v).__name__ for v in jax.tree.leaves(params)}),
                 "step": meta["step"], "data_position": meta["data_position"], "ema": meta["ema"]}
try:
    load_checkpoint(workdir, ema=True, stage="plain")
except CheckpointError as e:
    out["refusal"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with stage `ema` (state with EMA) and stage `plain` (without), step 3, written on 8 devices."""
    workdir = tmp_path_factory.mktemp("workdir")
    result = subprocess.run([sys.executable, "-c", SAVE, str(workdir), json.dumps(TINY["micro"].to_diffusers_config())],
                            env=cpu_env(8), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_a_checkpoint_saved_on_8_devices_loads_on_one_without_the_optimizer_state(saved):
    result = subprocess.run([sys.executable, "-c", LOAD, str(saved)], env=cpu_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 1
    # the default follows the run: its EMA weights when it kept them, else the trained ones
    taken = {"params": "params", "ema_params": "ema_params", "default": "ema_params", "plain_default": "params"}
    for name, weights in taken.items():
        expected, loaded = np.load(saved / f"{weights}.npz"), np.load(saved / f"loaded_{name}.npz")
        assert sorted(loaded.files) == sorted(expected.files)
        for key in expected.files:
            assert loaded[key].dtype == np.float32 and np.array_equal(loaded[key], expected[key]), (name, key)
        # exactly the asked-for weights were read from disk: no step, AdamW moments or other weights
        assert out[name]["read"] == sorted(f"{weights}.{key.replace('/', '.')}" for key in expected.files)
        assert out[name]["types"] == ["ndarray"]
        assert (out[name]["step"], out[name]["data_position"]) == (3, 3)
        assert out[name]["ema"] is (weights == "ema_params")  # meta says which weights were taken
    assert not np.array_equal(np.load(saved / "params.npz")["conv_in/kernel"],
                              np.load(saved / "loaded_ema_params.npz")["conv_in/kernel"])
    assert "has no EMA weights" in out["refusal"] and str(saved / "checkpoints" / "plain" / "3") in out["refusal"]


def test_a_workdir_named_by_a_number_is_a_workdir(saved, tmp_path):
    from jaxdistill.checkpoint import resolve_checkpoint

    dated = tmp_path / "20240601"
    (dated / "checkpoints").mkdir(parents=True)
    os.symlink(saved / "checkpoints" / "plain", dated / "checkpoints" / "plain")
    assert resolve_checkpoint(dated) == (dated / "checkpoints" / "plain", 3)
    assert resolve_checkpoint(dated / "checkpoints" / "plain" / "3") == (dated / "checkpoints" / "plain", 3)
    # so is a stage named by a number (progressive stages "1", "2"): its folder holds steps
    os.symlink(saved / "checkpoints" / "plain", dated / "checkpoints" / "2")
    assert resolve_checkpoint(dated / "checkpoints" / "2") == (dated / "checkpoints" / "2", 3)
    assert resolve_checkpoint(dated / "checkpoints" / "2" / "3") == (dated / "checkpoints" / "2", 3)
