"""Weights in and out: diffusers UNet folders ↔ (`UNetSpec`, Flax parameter tree), without PyTorch.

A diffusers key `down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_q.weight` is the Flax path
`down_blocks_2/attentions_1/transformer_blocks_3/attn1/to_q/kernel`: list indices join their module
list's name (`MODULE_LISTS`), and the leaf is renamed and transposed by its rank (4-D conv weight OIHW ↔
kernel HWIO, 2-D linear weight out×in ↔ kernel in×out, 1-D norm weight ↔ scale). Reads and writes
`diffusion_pytorch_model[.VARIANT].safetensors` and its sharded `*.safetensors.index[.VARIANT].json`
form. Pickled `.bin` weights are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: bf16 safetensors read and write)
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxdistill.spec import UNetSpec
from jaxdistill.unet import abstract_params

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
# diffusers' nn.ModuleList names: `name.N` ↔ `name_N`. Every other `_N` (linear_1, attn1) is a name.
MODULE_LISTS = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
                    "upsamplers", "to_out", "net"})


class WeightsError(ValueError):
    """Weights that do not fit the architecture, or that we will not read."""


class OutFolderError(ValueError):
    """An output folder that would replace something it should not (see `check_out`)."""


def load_unet(path: str | os.PathLike, dtype: jnp.dtype | type | None = None,
              variant: str | None = None) -> tuple[UNetSpec, dict]:
    """Reads a diffusers UNet folder (or a pipeline folder with `unet/`) → (spec, params).

    `dtype` casts every parameter (None keeps the file's dtype); `variant` picks
    `diffusion_pytorch_model.<variant>.safetensors` (e.g. "fp16"). When no variant is given and only an
    fp16 file is present, that file is read. Parameters come back as jax arrays on the default device.
    """
    folder = resolve_unet_folder(path)
    spec = UNetSpec.from_diffusers_config(folder / CONFIG_NAME)
    state = read_safetensors(folder, variant)
    params = from_diffusers_state_dict(state, spec)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return spec, jax.tree.map(jnp.asarray, params)


def save_unet(path: str | os.PathLike, spec: UNetSpec, params: Mapping, *, dtype: jnp.dtype | type | None = None,
              variant: str | None = None, max_shard_size: int | None = None) -> Path:
    """Writes a diffusers UNet folder: `config.json` and safetensors weights (sharded with an index when
    the weights exceed `max_shard_size` bytes). `dtype` casts on the way out. Returns the folder."""
    check_params(spec, params)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_diffusers_state_dict(params)
    if dtype is not None:
        state = {k: v.astype(dtype) for k, v in state.items()}
    _atomic_write(folder / CONFIG_NAME, lambda f: Path(f).write_text(json.dumps(spec.to_diffusers_config(), indent=2)))
    write_safetensors(folder, state, variant, max_shard_size)
    return folder


def resolve_unet_folder(path: str | os.PathLike) -> Path:
    """A UNet folder itself, or the `unet/` folder of a diffusers pipeline folder."""
    return resolve_component(path, "unet", "UNet")


def is_workdir(path: str | os.PathLike) -> bool:
    """A `python -m jaxdistill.train` workdir: checkpoints/ or stages/ beside a config.json that is the run's
    (a diffusers model's names its `_class_name`; one that cannot be read counts as the run's)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not any((path / name).is_dir() for name in TRAINER_FOLDERS):
        return False
    try:
        return "_class_name" not in json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return True


def resolve_component(path: str | os.PathLike, component: str, what: str) -> Path:
    """A model folder itself, or the `component/` folder (unet, vae, ...) of a diffusers pipeline folder."""
    path = Path(path)
    if is_workdir(path):
        raise FileNotFoundError(f"{path} is a training workdir, not a diffusers {what} folder: use one of its "
                                f"stage folders ({path}/stages/NAME) or export it (python -m jaxdistill.export)")
    for folder in (path, path / component):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise FileNotFoundError(f"{path} is not a diffusers {what} folder (no config.json in it or in "
                            f"{path}/{component}).")


def read_safetensors(folder: Path, variant: str | None = None, name: str = WEIGHTS_NAME) -> dict[str, np.ndarray]:
    """All tensors of a weights folder, single-file `name` or sharded (`name`.index.json), as numpy arrays.
    `name` is diffusers' `diffusion_pytorch_model.safetensors` or transformers' `model.safetensors`."""
    candidates = [variant] if variant else [None, "fp16"]
    if not variant:  # an export with another --variant (bf16, ...): its one variant, where it holds just one
        others = _variants(folder, name) - {None, "fp16"}
        candidates += sorted(others) if len(others) == 1 else []
    for v in candidates:
        index, single = folder / _variant(name + ".index.json", v), folder / _variant(name, v)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise WeightsError(f"cannot read the shard index {index} ({type(e).__name__}: {e}); download or "
                                   "copy it again") from e
            state = {}
            for shard in sorted(set(weight_map.values())):
                state |= _load_file(folder / shard)
            return state
        if single.is_file():
            return _load_file(single)
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickled:
        raise WeightsError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); jaxdistill reads safetensors only, "
            "because unpickling a file can run arbitrary code. If you trust the file, convert it once with "
            "PyTorch: python -c \"from diffusers import UNet2DConditionModel as U; "
            f"U.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\"")
    wanted = " or ".join(_variant(name, v) for v in candidates)
    others = sorted(_variants(folder, name) - {None})
    hint = f"; it holds the variants {', '.join(others)}: name one (variant=)" if others and not variant else ""
    raise FileNotFoundError(f"{folder} has no weights: expected {wanted} (or a sharded index){hint}.")


def weights_variant(name: str) -> str | None:
    """The variant of a weights file or shard index as diffusers and transformers name them, None for plain
    ones: model.safetensors → None, model.fp16.safetensors → "fp16", model.fp16-00001-of-00002.safetensors →
    "fp16", diffusion_pytorch_model.safetensors.index.fp16.json → "fp16"."""
    parts = [re.sub(r"-\d+-of-\d+$", "", part) for part in name.split(".")[1:]]
    return next((part for part in parts if part not in ("safetensors", "index", "json")), None)


def _variants(folder: Path, name: str) -> set[str | None]:
    """The variants of `name`'s safetensors weights in `folder` (None: the plain ones)."""
    stem = name.partition(".")[0]
    return {weights_variant(p.name) for p in folder.glob(f"{glob.escape(stem)}*") if ".safetensors" in p.name}


def _load_file(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except SafetensorError as e:  # a partial download or copy, or another format under this name
        raise WeightsError(f"cannot read {path}: {e} (a truncated or damaged file? copy or download it "
                           "again)") from e


def write_safetensors(folder: Path, state: Mapping[str, np.ndarray], variant: str | None = None,
                      max_shard_size: int | None = None):
    """Writes `state` in diffusers' file layout; each file appears atomically (written, then renamed). The
    variant's weight files of an earlier write that the new layout does not reuse (a single file, or an
    index and its shards) are removed afterwards: readers take an index before a single file, so a stale
    one would shadow the new weights."""
    stale = _weight_files(folder, variant)
    sizes = {k: v.nbytes for k, v in state.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    for key in sorted(state):
        if max_shard_size and shards[-1] and sum(sizes[k] for k in shards[-1]) + sizes[key] > max_shard_size:
            shards.append({})
        shards[-1][key] = np.ascontiguousarray(state[key])
    metadata = {"format": "pt"}
    if len(shards) == 1:
        written = {_variant(WEIGHTS_NAME, variant)}
        _atomic_write(folder / _variant(WEIGHTS_NAME, variant), lambda f: save_file(shards[0], f, metadata))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = _shard_name(variant).format(i + 1, len(shards))
            _atomic_write(folder / name, lambda f, shard=shard: save_file(shard, f, metadata))
            weight_map |= dict.fromkeys(shard, name)
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        written = {*weight_map.values(), _variant(INDEX_NAME, variant)}
        _atomic_write(folder / _variant(INDEX_NAME, variant), lambda f: Path(f).write_text(json.dumps(index, indent=2)))
    for name in stale - written:
        (folder / name).unlink(missing_ok=True)


def _shard_name(variant: str | None) -> str:
    """diffusers' shard file name, to be filled with (shard, shard count)."""
    return _variant(WEIGHTS_NAME, variant).replace(".safetensors", "-{:05d}-of-{:05d}.safetensors")


def _weight_files(folder: Path, variant: str | None) -> set[str]:
    """The names of `folder`'s diffusers weight files of `variant` (not of other variants): single, index, shards."""
    names = {p.name for p in folder.glob(_shard_name(variant).replace("{:05d}", "[0-9]" * 5))}
    return names | {n for n in (_variant(WEIGHTS_NAME, variant), _variant(INDEX_NAME, variant))
                    if (folder / n).exists()}


def from_diffusers_state_dict(state: Mapping[str, np.ndarray], spec: UNetSpec) -> dict:
    """diffusers state dict (numpy) → Flax parameter tree, checked strictly against `spec`."""
    params = torch_to_flax(state)
    check_params(spec, params)
    return params


def to_diffusers_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Flax parameter tree → diffusers state dict (numpy, PyTorch layouts)."""
    return flax_to_torch(params)


def torch_to_flax(state: Mapping[str, np.ndarray], lists: frozenset[str] = MODULE_LISTS) -> dict:
    """Any PyTorch state dict (numpy) → Flax tree by the rename-and-transpose rule; `lists` names the
    nn.ModuleLists whose `.N` joins the name (`layers.3` → `layers_3`). No shape checking."""
    flat = {}
    for key, value in state.items():
        *path, leaf = flax_path(key, lists)
        leaf, value = _to_flax_leaf(leaf, np.asarray(value))
        flat[(*path, leaf)] = value
    return unflatten_dict(flat)


def flax_to_torch(params: Mapping, lists: frozenset[str] = MODULE_LISTS) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: Flax tree → PyTorch state dict (numpy, PyTorch layouts)."""
    state = {}
    for path, value in flatten_dict(dict(params)).items():
        *path, leaf = path
        leaf, value = _to_torch_leaf(leaf, np.asarray(value))
        state[".".join([_torch_name(p, lists) for p in path] + [leaf])] = value
    return state


def check_params(spec: UNetSpec, params: Mapping):
    """Raises one `WeightsError` listing every missing, unexpected and misshaped parameter."""
    if any("transformer_blocks" in path for path in flatten_dict(dict(params))):
        raise WeightsError("the parameters are in the scanned layout of UNet(scan_layers=True) (stacked "
                           "`transformer_blocks`); convert them with jaxdistill.layers.unstack_layers(params) first")
    check_tree(abstract_params(spec), params, "UNet")


def check_tree(expected: Mapping, params: Mapping, what: str):
    """Raises one `WeightsError` listing every parameter of `params` missing from, unexpected in or
    misshaped against the `expected` (abstract) tree; names and shapes in diffusers' form."""
    expected = {_torch_key(k): _torch_shape(tuple(v.shape)) for k, v in flatten_dict(dict(expected)).items()}
    given = {_torch_key(k): _torch_shape(tuple(np.shape(v))) for k, v in flatten_dict(dict(params)).items()}
    check_shapes(expected, given, what)


def check_shapes(expected: Mapping[str, tuple], given: Mapping[str, tuple], what: str):
    """Raises one `WeightsError` listing every name missing from, unexpected in or misshaped in `given`
    against `expected` (PyTorch names and shapes)."""
    problems = [f"missing: {k}" for k in expected if k not in given]
    problems += [f"unexpected: {k}" for k in given if k not in expected]
    problems += [f"shape mismatch: {k} has {given[k]}, the architecture needs {expected[k]}"
                 for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    if problems:
        shown = "\n  ".join(problems[:200]) + (f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else "")
        raise WeightsError(f"the weights do not fit the {what} described by its config ({len(problems)} problems, "
                           f"names and shapes as in the PyTorch files):\n  {shown}")


# ---- helpers ------------------------------------------------------------------------------------

def flax_path(key: str, lists: frozenset[str] = MODULE_LISTS) -> list[str]:
    """diffusers' dotted name → Flax path parts (`down_blocks.2.attentions.1` → down_blocks_2, attentions_1)."""
    parts = []
    for part in key.split("."):
        if part.isdigit() and parts and parts[-1] in lists:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return parts


def _torch_name(part: str, lists: frozenset[str] = MODULE_LISTS) -> str:
    name, _, index = part.rpartition("_")
    return f"{name}.{index}" if name in lists and index.isdigit() else part


def _to_flax_leaf(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf != "weight":
        return leaf, value
    if value.ndim == 4:
        return "kernel", value.transpose(2, 3, 1, 0)  # OIHW → HWIO
    if value.ndim == 2:
        return "kernel", value.T  # out×in → in×out
    return "scale", value


def _to_torch_leaf(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "kernel":
        return "weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    if leaf == "scale":
        return "weight", value
    return leaf, value


def _torch_key(path: tuple[str, ...]) -> str:
    leaf = "weight" if path[-1] in ("kernel", "scale") else path[-1]
    return ".".join([_torch_name(p) for p in path[:-1]] + [leaf])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if len(shape) == 2 else shape


def _variant(name: str, variant: str | None) -> str:
    """diffusers' `_add_variant`: the variant goes before the last suffix."""
    if not variant:
        return name
    head, _, tail = name.rpartition(".")
    return f"{head}.{variant}.{tail}"


def check_out(out: str | os.PathLike, overwrite: bool, sources: Sequence[str | os.PathLike | None] = ()):
    """Raises `OutFolderError` unless `out` may become a command's new output folder: not a file, empty unless
    `overwrite`, neither holding any of `sources` nor inside a component of a pipeline among them (replacing
    `out` must never delete what it is made from; other subfolders are fine), and neither a training run's
    workdir nor inside its checkpoints/ or stages/ (the trainer's)."""
    out = Path(os.path.abspath(out))  # "." has no parent to write beside
    for source in filter(None, sources):
        source = Path(source).resolve()
        if out.resolve() in (source, *source.parents):
            raise OutFolderError(f"--out {out} holds {source}, which is read to make it; choose another folder")
        if source.is_dir() and source in out.resolve().parents:
            part = out.resolve().relative_to(source).parts[0]
            if part in _components(source):  # --overwrite would replace a part of the pipeline read
                raise OutFolderError(f"--out {out} is inside {source / part}, which is read to make it; choose a "
                                     "folder outside it")
    # a training run's own folders (its checkpoints and finished stages) are the trainer's, whatever is read
    if is_workdir(out.resolve()):
        raise OutFolderError(f"--out {out} is a training run's workdir; choose another folder (a new subfolder of "
                             "it is fine)")
    for folder in (out.resolve(), *out.resolve().parents):
        if folder.name in TRAINER_FOLDERS and is_workdir(folder.parent):
            raise OutFolderError(f"--out {out} is inside {folder}, where the training run in {folder.parent} keeps "
                                 f"its {folder.name}; choose a folder outside it, e.g. {folder.parent / 'export'}")
    _check_replaceable(out, overwrite)


def _components(folder: Path) -> set[str]:
    """The component folders (unet, vae, text_encoder, ...) a diffusers pipeline folder's model_index.json lists."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return set()
    return {k for k in index if not k.startswith("_")} if isinstance(index, dict) else set()


def _check_replaceable(out: Path, overwrite: bool):
    """`out` can become a new folder: no file in its way, empty unless `overwrite`."""
    blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise OutFolderError(f"--out {out} cannot be made: {blocked} is a file; give a folder elsewhere")
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutFolderError(f"--out {out} exists and is not empty; choose another folder or add --overwrite "
                             "(the old content is replaced only once the new folder is complete)")
    if out.is_dir() and any(out.iterdir()) and out.resolve() in (Path.home().resolve(), *_above(Path.cwd())):
        raise OutFolderError(f"--out {out} is the folder you are in, one above it or your home: --overwrite would "
                             "replace all of it; give a new subfolder")


def _above(folder: Path) -> tuple[Path, ...]:
    """`folder` and every folder above it, resolved."""
    return (folder.resolve(), *folder.resolve().parents)


TRAINER_FOLDERS = ("checkpoints", "stages")  # what `python -m jaxdistill.train` keeps in its workdir


@contextlib.contextmanager
def whole_folder(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yields a hidden sibling folder of `out` to write into. When the block finishes, the sibling is renamed
    to `out` (checked again as `check_out` does; an old `out` is moved aside first and deleted only afterwards),
    so `out` appears as a whole or not at all; on an error the sibling is deleted and `out` left as it was, but
    where `out` became unfit while the block ran, the finished sibling is kept as OUT.new-XXXX (OutFolderError
    names it)."""
    out = Path(os.path.abspath(out))  # "." has no parent to write beside
    out.parent.mkdir(parents=True, exist_ok=True)
    left = sorted(out.parent.glob(f".{glob.escape(out.name)}.*.partial"))
    if left:  # a killed run cannot clean up after itself; one may still be running, so they are only named
        print(f"note: {', '.join(map(str, left))} left by an interrupted run writing {out} (or one still running); "
              "delete them once no run writes there", file=sys.stderr)
    for old in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.old")):  # killed between _move_into_place's renames
        print(f"note: {old} holds the {out.name} that an interrupted --overwrite was replacing; move it back or "
              "delete it", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
        _default_permissions(tmp)
        try:
            _move_into_place(tmp, out, overwrite)
        except OutFolderError as e:  # `out` changed while we wrote: the finished work is kept, beside it
            kept = out.parent / f"{out.name}.new-{tmp.name[len(out.name) + 2:-len('.partial')]}"
            os.rename(tmp, kept)
            raise OutFolderError(f"{e}. Nothing was lost: the new output is in {kept}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _default_permissions(folder: Path):
    """Files and folders as a plain write would make them: mkdtemp / mkstemp (atomic writes) give 0700 / 0600."""
    mask = umask()
    for path in (folder, *folder.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _move_into_place(tmp: Path, out: Path, overwrite: bool):
    """Renames the finished `tmp` to `out`; an old `out` is moved aside first and deleted only afterwards."""
    _check_replaceable(out, overwrite)  # again: something may have appeared while we wrote
    if out.is_dir() and not any(out.iterdir()):
        if out.resolve() == Path.cwd().resolve():  # filled, not replaced: the user's shell stays in a live folder
            for entry in tmp.iterdir():
                os.rename(entry, out / entry.name)
            tmp.rmdir()
            return
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / out.name, out)  # put the old one back
        raise
    finally:
        if out.exists():
            shutil.rmtree(old)


def _atomic_write(path: Path, write):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes files 0600; a written model is for others to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
