"""prepare: a generated folder of ~25 images (broken ones included) → a TFDS data set of latents,
embeddings and time ids through the real VAE and text encoders; resume; the trainer's reader."""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import TINY, cpu_env
from test_sources import RULES, _bad_files, _encode, _good_files, _noise, _write, write_image_folder

from jaxdistill import prepare as P
from jaxdistill import sources as S
from jaxdistill.data import PreparedLatents, check_fits
from jaxdistill.prepare import load_encoders, prepare
from jaxdistill.records import atomic_json, changes, describe
from jaxdistill.reference import write_random_text_encoders, write_random_vae
from jaxdistill.vae import encode

RES = 32  # pixels; the tiny VAE halves once: 16×16 latents
ENV = cpu_env()
EXPECTED_SKIPS = {reason for _, _, reason in _bad_files().values() if reason}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_random_text_encoders(root, seed=1)
    write_random_vae(root / "vae", seed=2)
    return str(root)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def _prepare(images, pipeline, out, **kw):
    source = S.open_source(f"folder:{images}", files_per_shard=8)
    options = dict(prep=S.Preprocessing(resolution=RES), rules=RULES, batch_size=4, seed=0, storage_dtype="float32",
                   progress=False) | kw
    return source, prepare(source, pipeline, out, **options)


@pytest.fixture(scope="module")
def prepared(images, pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    source, summary = _prepare(images, pipeline, out)
    return source, summary, out


def test_prepare_writes_every_good_example_and_counts_the_broken_ones(prepared, pipeline):
    source, summary, out = prepared
    good = len(_good_files()) + 1  # + the first "dup" file
    assert summary["done"] and summary["num_examples"] == good
    assert set(summary["skips"]["skipped"]) == EXPECTED_SKIPS
    assert sum(summary["skips"]["skipped"].values()) == len(_bad_files()) - 1
    data = tfds.builder_from_directory(str(out)).as_data_source(split="train")
    assert len(data) == good
    encoders = load_encoders(pipeline)
    expected = {}
    for shard in source.shards():
        for ex in S.read_examples(source, shard, seed=0, prep=S.Preprocessing(resolution=RES), rules=RULES):
            expected[ex.key] = ex
    records = {r["key"].decode(): r for r in (data[i] for i in range(len(data)))}
    assert set(records) == set(expected)
    keys = sorted(records)
    context, pooled = encoders.text([expected[k].caption for k in keys])
    pixels = np.stack([expected[k].pixels for k in keys])
    mean, logvar = encode(encoders.vae_spec, encoders.params["vae"], pixels)
    sf = encoders.vae_spec.scaling_factor
    got = {name: np.stack([records[k][name] for k in keys]) for name in records[keys[0]] if name not in ("key",
                                                                                                         "caption")}
    assert got["latents"].shape == (len(keys), RES // 2, RES // 2, 4) and got["latents"].dtype == np.float32
    assert got["time_ids"].dtype == np.int32
    np.testing.assert_array_equal(got["time_ids"], np.stack([expected[k].time_ids for k in keys]))
    np.testing.assert_allclose(got["encoder_hidden_states"], context, rtol=0, atol=1e-5 * np.abs(context).max())
    np.testing.assert_allclose(got["text_embeds"], pooled, rtol=0, atol=1e-5 * np.abs(pooled).max())
    # one draw of the latent distribution, scaled: the standardised residual is N(0, 1)
    residual = (got["latents"] / sf - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))
    assert 0.8 < residual.std() < 1.2 and abs(residual.mean()) < 0.1
    assert [records[k]["caption"].decode() for k in keys] == [expected[k].caption for k in keys]


def test_same_seed_same_data_and_an_interrupted_run_resumes(prepared, images, pipeline, tmp_path):
    source, summary, first = prepared
    out = tmp_path / "again"
    _prepare(images, pipeline, out)
    files = sorted(p.name for p in first.glob("*.array_record-*"))
    assert files and files == sorted(p.name for p in out.glob("*.array_record-*"))
    for name in files:  # same seed → the same bytes
        assert (first / name).read_bytes() == (out / name).read_bytes()
    # an interruption after shard 0: shard 1 and 2 never finished (no progress file, no metadata)
    shards = source.shards()
    for p in [P._progress_file(out, shards[1]), P._progress_file(out, shards[2]), out / "jaxdistill_data.json"]:
        p.unlink()
    (out / files[1]).unlink()
    done_before = (out / files[0]).stat().st_mtime_ns
    _, resumed = _prepare(images, pipeline, out)
    assert (out / files[0]).stat().st_mtime_ns == done_before, "a finished shard was redone"
    assert resumed["num_examples"] == summary["num_examples"] and resumed["skips"] == summary["skips"]
    assert (first / files[1]).read_bytes() == (out / files[1]).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        _prepare(images, pipeline, out, seed=1)


def test_a_resume_redoes_the_shards_whose_input_changed(pipeline, tmp_path, capsys):
    """10 images, 8 a shard, the first shard done; then "a00" is added: every shard's files shift while
    their names and count stay. Trusting the progress file alone would write b07 twice and a00 never."""
    for i in range(10):
        _write(tmp_path / "images", f"b{i:02d}.png", _encode(_noise(40, 40, i), "PNG"))
        _write(tmp_path / "images", f"b{i:02d}.txt", f"picture {i}".encode())
    out = tmp_path / "out"
    source, _ = _prepare(tmp_path / "images", pipeline, out)
    P._progress_file(out, source.shards()[1]).unlink()
    (out / P.INFO_NAME).unlink()
    _write(tmp_path / "images", "a00.png", _encode(_noise(40, 40, 10), "PNG"))
    _write(tmp_path / "images", "a00.txt", b"the new picture")
    capsys.readouterr()
    _, summary = _prepare(tmp_path / "images", pipeline, out, progress=True)
    data = tfds.builder_from_directory(str(out)).as_data_source(split="train")
    keys = sorted(data[i]["key"].decode() for i in range(len(data)))
    assert summary["done"] and keys == ["a00"] + [f"b{i:02d}" for i in range(10)]
    printed = capsys.readouterr()
    assert "1 redone because their input changed" in printed.out
    # the bar counts examples batch by batch: 4 after the first batch of the first 8-image shard
    assert "examples=4," in printed.err and "examples=11," in printed.err


def test_a_shard_is_done_only_with_a_progress_file_of_the_same_input(tmp_path):
    shard = S.Shard("files-000000", 0, 8)
    assert P.done_record(tmp_path, shard, "abc") is None  # never finished
    (tmp_path / "progress").mkdir()
    progress = P._progress_file(tmp_path, shard)
    progress.write_text(json.dumps({"examples": 8, "file": "x"}))  # written before progress files held fingerprints
    (tmp_path / "x").write_text("")
    assert P.done_record(tmp_path, shard, "abc") is None
    progress.write_text(json.dumps({"examples": 8, "fingerprint": "abd", "file": "x"}))
    assert P.done_record(tmp_path, shard, "abc") is None
    progress.write_text(json.dumps({"examples": 8, "fingerprint": "abc", "file": "x"}))
    assert P.done_record(tmp_path, shard, "abc") == {"examples": 8, "fingerprint": "abc", "file": "x"}
    (tmp_path / "x").unlink()  # its ArrayRecord file is gone: redone
    assert P.done_record(tmp_path, shard, "abc") is None
    # names with slashes and brackets (tars in folders, TFDS slices) are file names too, and never the settings
    names = {P._progress_file(tmp_path, S.Shard(n, 0, 1)).name for n in ("a/00001", "train[0:10]", "settings")}
    assert len(names) == 3 and "settings.json" not in names and not any("/" in n for n in names)


def test_a_source_that_gained_or_lost_shards_resumes(pipeline, tmp_path, capsys):
    """Images added to a folder (or a tar downloaded) make another shard: the done shards are kept, only
    the new one is encoded; the TFDS files are renumbered. A shard gone is dropped from the data set."""
    def add(name, i):
        _write(tmp_path / "images", f"{name}.png", _encode(_noise(40, 40, i), "PNG"))
        _write(tmp_path / "images", f"{name}.txt", f"picture {name}".encode())

    for i in range(10):
        add(f"b{i:02d}", i)
    out = tmp_path / "out"
    _prepare(tmp_path / "images", pipeline, out)
    assert len(list(out.glob("*.array_record-*"))) == 2
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    for i in range(7):
        add(f"c{i:02d}", 10 + i)  # after the others: shard 1 grows, shard 2 is new
    capsys.readouterr()
    _, summary = _prepare(tmp_path / "images", pipeline, out)
    printed = capsys.readouterr().out
    assert "3 shards, 3 for process 0/1, 1 already done, 1 redone because their input changed" in printed
    data = tfds.builder_from_directory(str(out)).as_data_source(split="train")
    keys = [data[i]["key"].decode() for i in range(len(data))]
    assert summary["done"] and keys == [f"b{i:02d}" for i in range(10)] + [f"c{i:02d}" for i in range(7)]
    assert sorted(p.name for p in out.glob("*.array_record-*")) == [P._shard_file(i, 3) for i in range(3)]
    now = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert len(now) == 3 and sum(now.get(name) == t for name, t in kept.items()) == 1  # shard 0 untouched
    for i in range(7):
        for ext in ("png", "txt"):
            (tmp_path / "images" / f"c{i:02d}.{ext}").unlink()
    capsys.readouterr()
    _, summary = _prepare(tmp_path / "images", pipeline, out)
    data = tfds.builder_from_directory(str(out)).as_data_source(split="train")
    assert summary["num_examples"] == len(data) == 10
    assert "1 shard file of shards no longer in the source (" in capsys.readouterr().out  # shard 2's
    assert sorted(p.name for p in out.glob("*.array_record-*")) == [P._shard_file(i, 2) for i in range(2)]


def test_other_settings_are_refused_before_the_models_load(prepared, images, pipeline, monkeypatch):
    _, _, out = prepared

    def load_encoders(*args):
        raise AssertionError("the models were loaded before the settings were checked")

    monkeypatch.setattr(P, "load_encoders", load_encoders)
    with pytest.raises(ValueError, match=r"\(rules\.min_size: 16 → 0\); use a new --out"):
        _prepare(images, pipeline, out, rules=S.DecodeRules(max_pixels=RULES.max_pixels))
    with pytest.raises(ValueError, match="compute_dtype: 'float32' → 'bfloat16'"):
        _prepare(images, pipeline, out, compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="batch_size: 4 → 8"):  # a batch's latent noise is drawn for the batch
        _prepare(images, pipeline, out, batch_size=8)


def test_the_pipeline_files_are_part_of_the_settings(pipeline, tmp_path):
    """A VAE replaced in place (the fp16-fix VAE has SDXL's sizes) is another pipeline; every host's own copy
    of the same pipeline is the same one."""
    copy = shutil.copytree(pipeline, tmp_path / "copy")
    assert P._files_digest(copy) == P._files_digest(pipeline)
    weights = next((copy / "vae").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert P._files_digest(copy) != P._files_digest(pipeline)


def test_process_0_writes_the_settings_and_buckets_compare_as_stored(tmp_path):
    (tmp_path / "progress").mkdir()
    settings = {"preprocessing": dataclasses.asdict(S.Preprocessing(buckets=((32, 32), (24, 40))))}
    with pytest.raises(ValueError, match="all hosts share"):  # process 1 never writes it
        P._check_settings(tmp_path, settings, process_index=1, process_count=2)
    P._check_settings(tmp_path, settings)
    P._check_settings(tmp_path, settings, process_index=1, process_count=2)  # tuples read back as lists


def test_atomic_json_leaves_another_writers_temporary_file_alone(tmp_path):
    other = tmp_path / ".settings.json.tmp"  # what a fixed temporary name would be
    other.write_text("another process, half-way")
    atomic_json(tmp_path / "settings.json", {"seed": 0})
    assert json.loads((tmp_path / "settings.json").read_text()) == {"seed": 0}
    assert other.read_text() == "another process, half-way"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".settings.json.tmp", "settings.json"]


def test_one_command_at_a_time_writes_a_folder(images, pipeline, tmp_path, monkeypatch, capsys):
    """A second prepare into the same --out is refused naming the first; the lock goes with its holder; a
    file system without locks is said and the command goes on."""
    import errno
    import fcntl

    from jaxdistill.records import LOCK_NAME, folder_lock

    with folder_lock(tmp_path, "a jaxdistill.prepare"):
        with pytest.raises(P.PrepareError, match=r"is in use by a jaxdistill.prepare \(process \d+ on "):
            _prepare(images, pipeline, tmp_path)
        assert "a jaxdistill.prepare (process" in (tmp_path / LOCK_NAME).read_text()
    with folder_lock(tmp_path, "again"):  # released: taken again at once
        pass

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with folder_lock(tmp_path, "unlocked"):
        ran.append(True)
    assert ran and f"cannot lock {tmp_path} (No locks available)" in capsys.readouterr().err


def test_sigterm_ends_the_command_with_a_line_of_what_is_kept():
    """prepare's (and train's, outside its loop) SIGTERM: the default's exit status, and a line instead of no word;
    the handler before is back after the block (prepare's main runs inside the test process too)."""
    import signal

    from jaxdistill import cli

    code = ("import time\nfrom jaxdistill import cli\nwith cli.stop_on_sigterm('the finished shards are kept'):\n"
            "    print('in', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "in\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM: the finished shards are kept" in err, err
    before = signal.getsignal(signal.SIGTERM)
    with cli.stop_on_sigterm("kept"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_record_changes_name_each_differing_leaf():
    before = {"seed": 0, "prep": {"resolution": 64, "buckets": [[64, 64]]}, "old": 1}
    now = {"seed": 1, "prep": {"resolution": 64, "buckets": ((64, 64),), "flip": True}}
    changed = changes(before, now)
    assert changed == {"seed": (0, 1), "prep.flip": (None, True), "old": (1, None)}  # lists equal tuples (JSON)
    assert changes(before, now, shared_only=True) == {"seed": (0, 1)}  # a field one record lacks: not a change
    assert describe(changed, ["prep.flip", "seed"]) == "prep.flip: None → True; seed: 0 → 1"
    assert changes(before, json.loads(json.dumps(before))) == {}


def test_prepare_command_ends_bad_input_with_a_usage_error(prepared, images, pipeline, tmp_path, monkeypatch,
                                                           capsys):
    _, _, done = prepared
    started = []
    monkeypatch.setattr(P, "initialize_distributed", lambda: started.append(True) or False)
    (tmp_path / "half" / "vae").mkdir(parents=True)
    (tmp_path / "half" / "vae" / "config.json").write_text("{}")

    def usage_error(*args):
        with pytest.raises(SystemExit) as exit_:
            P.main(["--source", images, "--pipeline", pipeline, "--out", str(tmp_path / "out"), "--resolution",
                    str(RES), *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "multiple of 8" in usage_error("--resolution", "36")
    assert "positive multiple of 8" in usage_error("--resolution", "0")
    assert "positive multiple of 8" in usage_error("--resolution", "-8")
    assert "--workers -2: must be 0" in usage_error("--workers", "-2")
    assert "--min-size -1: must be 0" in usage_error("--min-size", "-1")
    assert "(--min-sise: did you mean --min-size?)" in usage_error("--min-sise", "8")  # cli's parser, every command
    assert "--max-pixels 0: must be at least --min-size² (1)" in usage_error("--max-pixels", "0")
    assert "must be at least --min-size² (262144)" in usage_error("--max-pixels", "1000", "--min-size", "512")
    assert not started  # checked first
    assert "no such folder" in usage_error("--pipeline", str(tmp_path / "nowhere"))
    assert "no text_encoder/config.json" in usage_error("--pipeline", str(tmp_path / "half"))
    assert "no such data set" in usage_error("--source", "tfds:no_such_captions", "--data-dir", str(tmp_path))
    assert "storage_dtype: 'float32' → 'float16'" in usage_error("--out", str(done))
    assert "positive multiple" in usage_error("--batch-size", "0")
    assert "seed -1: expected 0 ≤ seed" in usage_error("--seed", "-1")  # not 'every record skipped', done
    (tmp_path / "empty").mkdir()
    assert "no images (jpg/jpeg/png/webp/bmp) found under" in usage_error("--source", str(tmp_path / "empty"))
    assert len(started) == 7  # the multi-host runtime is started as train starts it
    assert not (tmp_path / "out").exists()
    assert "--buckets: aspect-ratio buckets at resolution 32" in usage_error("--buckets")  # gave 64² buckets
    (tmp_path / "afile").write_text("")
    assert "afile is a file; give a folder" in usage_error("--out", str(tmp_path / "afile"))  # was a traceback
    # nothing kept (captions in another column than --caption-column): exit 1, not a data set of nothing
    uncaptioned = tmp_path / "uncaptioned"
    shutil.copytree(images, uncaptioned, ignore=shutil.ignore_patterns("*.txt", "metadata.*"))
    assert P.main(["--source", str(uncaptioned), "--pipeline", pipeline, "--out", str(tmp_path / "none"),
                   "--resolution", str(RES)]) == 1
    assert "no example was kept (the reasons are above); captions come from a metadata file's 'text' column" in (
        capsys.readouterr().err)


def test_reader_batches_are_deterministic_and_split_across_hosts(prepared):
    _, summary, out = prepared
    data = PreparedLatents(out, batch_size=4, seed=3)
    assert data.steps_per_epoch == summary["num_examples"] // 4
    batch = data.batch(0)
    assert batch["latents"].shape == (4, RES // 2, RES // 2, 4) and batch["encoder_hidden_states"].shape == (4, 77, 80)
    assert batch["text_embeds"].shape == (4, 40) and batch["time_ids"].shape == (4, 6)
    assert all(v.dtype == np.float32 for v in batch.values())
    again = PreparedLatents(out, batch_size=4, seed=3)
    for step in (5, 0, 1, 9, 2):  # any order: batch(step) is a function of (seed, step)
        for k, v in data.batch(step).items():
            np.testing.assert_array_equal(v, again.batch(step)[k])
    epoch = np.concatenate([data.indices(s) for s in range(data.steps_per_epoch)])
    assert len(set(epoch.tolist())) == len(epoch)  # no example twice in an epoch
    assert not np.array_equal(data.indices(0), PreparedLatents(out, batch_size=4, seed=4).indices(0))
    hosts = [PreparedLatents(out, batch_size=4, seed=3, process_index=i, process_count=2) for i in range(2)]
    for k in batch:
        np.testing.assert_array_equal(np.concatenate([h.batch(7)[k] for h in hosts]), data.batch(7)[k])


def test_buckets_give_batches_of_one_shape(images, pipeline, tmp_path, capsys):
    prep = S.Preprocessing(resolution=RES, buckets=((32, 32), (24, 40), (40, 24)))
    _, summary = _prepare(images, pipeline, tmp_path / "buckets", prep=prep, batch_size=2)
    shapes = {tuple(run[:2]) for shard in summary["shapes"] for run in shard}
    assert len(shapes) == 3  # wide, tall and square images
    data = PreparedLatents(tmp_path / "buckets", batch_size=2)
    seen = set()
    for step in range(data.steps_per_epoch):
        batch = data.batch(step)
        seen.add(batch["latents"].shape[1:3])
        assert np.all(batch["time_ids"][:, 4:] == np.array(batch["latents"].shape[1:3]) * 2)
    assert len(seen) >= 2
    # a batch holds one shape: a shape with fewer examples than a batch is never read, and the reader says so
    counts = sorted(sum(run[2] for shard in summary["shapes"] for run in shard if tuple(run[:2]) == shape)
                    for shape in shapes)
    capsys.readouterr()
    PreparedLatents(tmp_path / "buckets", batch_size=counts[-1])
    unread = sum(c for c in counts if c < counts[-1])
    assert unread and f"data: {unread} of {sum(counts)} examples are in latent shapes" in capsys.readouterr().out


def test_the_trainer_reads_a_prepared_set_and_stops_at_a_damaged_batch_losing_nothing(prepared, tmp_path):
    """A micro UNet with the tiny pipeline's conditioning widths trains on the prepared set; a mismatched
    UNet is refused before anything heavy runs. One array_record file of a copy of the set zeroed in its
    middle (a bad disk, a copy cut short): alone, the run stops at the first batch that touches it, naming
    the data set, after saving the step before; with the file mended the same run resumes there. Two
    processes, only process 1's copy damaged (a TPU VM reads from its own disk): both stop after the same
    step and both save it (before, process 0 would wait in the next step's collectives)."""
    from test_sharding import _both_stop, _train, _two_processes
    from test_train import metrics, small_config, write_config_file

    from jaxdistill.reference import write_random_unet
    from jaxdistill.train import run

    _, _, out = prepared
    with pytest.raises(ValueError, match="cross_attention_dim is 32") as info:
        check_fits(PreparedLatents(out, batch_size=4), TINY["micro"])
    assert f"prepared data set {out} (encoded with" in str(info.value)  # the data set's folder, not the pipeline's
    lengths = [int(n) for n in tfds.builder_from_directory(str(out)).info.splits["train"].shard_lengths]
    first = np.cumsum([0, *lengths])

    def reads(seed, rows):  # per file: which of global batches 0, 1 read `rows` of their examples from it
        batches = [PreparedLatents(out, batch_size=4, seed=seed).indices(s)[rows] for s in (0, 1)]
        return [[bool(np.any((b >= first[f]) & (b < first[f + 1]))) for b in batches] for f in range(len(lengths))]

    # a seed and a file that batch 0 does not read, batch 1 does: alone (all 4 rows) and on process 1 (rows 2, 3)
    seed, file = next((s, f) for s in range(200) for f, (alone, second) in enumerate(
        zip(reads(s, slice(None)), reads(s, slice(2, 4)), strict=True)) if alone == second == [False, True])
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    damaged = sorted(copy.glob("*.array_record-*"))[file]
    whole = damaged.read_bytes()
    zeroed = whole[:1000] + bytes(len(whole) // 2 - 1000) + whole[len(whole) // 2:]  # every record in it
    damaged.write_bytes(zeroed)

    spec = TINY["micro"].replace(cross_attention_dim=80, projection_class_embeddings_input_dim=40 + 6 * 8)
    unet = str(write_random_unet(tmp_path / "unet", spec, seed=0))
    c = small_config(unet, "", steps=3, seed=seed, **{"loss.output": 0.0, "loss.feature": 0.0})
    c.data.update(source="prepared", path=str(copy))
    with pytest.raises(ValueError) as info:
        run(c, tmp_path / "alone")
    message = str(info.value)
    assert f"data.path {copy}: cannot read examples" in message and "damaged" in message, message
    assert "the checkpoint of step 1 is saved" in message, message
    saved = tmp_path / "alone" / "checkpoints" / "main"
    assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == ["1"]
    damaged.write_bytes(whole)
    run(c, tmp_path / "alone")
    losses = [line for line in metrics(tmp_path / "alone") if "loss" in line]
    assert [line["step"] for line in losses] == [1, 2, 3] and all(np.isfinite(line["loss"]) for line in losses)

    damaged.write_bytes(zeroed)
    c.data.path = str(out)
    config = write_config_file(tmp_path / "two.py", c)
    logs = _both_stop(_two_processes(_train(config, tmp_path / "two"), [], [f"--config.data.path={copy}"]))
    for log in logs:
        assert "process 1 of 2 could not read its batch for step 2, so every process stops" in log, log[-3000:]
        assert f"process 1: data.path {copy}: cannot read examples" in log, log[-3000:]
        assert "the checkpoint of step 1 is saved" in log, log[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "main" / "1").is_dir()


def _train_micro(workdir, spec, *, steps: int, accumulation: int, **data):
    """Plain diffusion training of `spec` for a few steps, batch 4, on the data `data` describes; returns
    its config."""
    from jaxdistill.config import base_config
    from jaxdistill.train import MODELS, run

    MODELS["test-data"] = spec
    c = base_config()
    c.model, c.plan = "test-data", ""
    c.loss.output = c.loss.feature = 0.0
    c.data.update(data)
    c.batch_size, c.optimizer.accumulation, c.optimizer.lr = 4, accumulation, 1e-3
    c.precision.teacher = c.precision.student_compute = "float32"
    c.steps, c.log_every, c.checkpoint_every = steps, 1, steps
    try:
        run(c, workdir)
    finally:
        del MODELS["test-data"]
    return c


def test_prepare_command_alone_and_on_two_hosts_that_stop_together(images, pipeline, tmp_path):
    """The command, one process. Then two real processes (gloo), each encoding its shards into one folder:
    when process 1 cannot finish its shard (its progress file's place is taken: a full or read-only disk),
    process 0 finishes its own, then both stop with one error naming process 1, keeping what was done; run
    again, they finish and the data set equals the one-process one."""
    from test_sharding import _both_stop, _two_processes

    args = ["-m", "jaxdistill.prepare", "--source", images, "--pipeline", pipeline, "--resolution", str(RES),
            "--batch-size", "4", "--max-pixels", str(RULES.max_pixels), "--min-size", str(RULES.min_size),
            "--files-per-shard", "8"]
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, *args, "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "13 examples" in result.stdout and "too_many_pixels" in result.stdout
    info = json.loads((out / "jaxdistill_data.json").read_text())
    assert info["storage_dtype"] == "float16"
    assert tfds.builder_from_directory(str(out)).info.splits["train"].num_examples == 13
    bad = subprocess.run([sys.executable, "-m", "jaxdistill.prepare", "--source", str(tmp_path / "nowhere"),
                          "--pipeline", pipeline, "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "cannot open source" in bad.stderr

    two = tmp_path / "two"
    shards = S.open_source(f"folder:{images}", files_per_shard=8).shards()
    blocked = P._progress_file(two, S.shards_for_process(shards, 1, 2)[0])
    blocked.mkdir(parents=True)
    logs = _both_stop(_two_processes([*args, "--out", str(two)]), code=2)
    for log in logs:
        assert "process 1 of 2 could not prepare its shards, so every process stops" in log, log[-3000:]
        assert "process 1: IsADirectoryError" in log and f"the shards finished in {two} are kept" in log, log[-3000:]
    assert all(P._progress_file(two, s).is_file() for s in S.shards_for_process(shards, 0, 2))  # process 0's
    blocked.rmdir()
    procs = _two_processes([*args, "--out", str(two)])
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    ours, theirs = (tfds.builder_from_directory(str(d)).as_data_source(split="train") for d in (two, out))
    ours, theirs = ({r["key"]: r for r in (data[i] for i in range(len(data)))} for data in (ours, theirs))
    assert sorted(ours) == sorted(theirs) and len(ours) == 13
    for key, record in theirs.items():
        for name, value in record.items():
            np.testing.assert_array_equal(ours[key][name], value, err_msg=f"{key}: {name}")


def test_on_the_fly_encoding_inside_the_train_step(images, pipeline, tmp_path, monkeypatch):
    """data.source = "images": the stream replays exactly from any step, or goes on from a saved position
    without decoding what came before; the student trains on pixels and token ids encoded inside the step
    by the same VAE and text encoders, and its checkpoint holds the stream's position."""
    from jaxdistill.checkpoint import load_checkpoint
    from jaxdistill.data import StreamedImages, make_data
    from jaxdistill.text import load_tokenizers

    source = S.open_source(f"folder:{images}", files_per_shard=8)
    stream = lambda: StreamedImages(source, load_tokenizers(pipeline), prep=S.Preprocessing(resolution=RES),  # noqa: E731
                                    batch_size=4, seed=1, rules=RULES)
    first, fresh, sought = stream(), stream(), stream()
    batches = [first.batch(step) for step in range(5)]  # 20 examples: the 13 good ones, then a second epoch
    assert batches[0]["pixels"].shape == (4, RES, RES, 3) and batches[0]["input_ids_2"].shape == (4, 77)
    assert set(first.skips.counts) == EXPECTED_SKIPS  # every broken input counted, none raised
    decoded = _count_decodes(monkeypatch)
    for k, v in fresh.batch(4).items():  # without a saved position, a resumed run replays the stream to step 4
        np.testing.assert_array_equal(v, batches[4][k])
    replayed, decoded[0] = decoded[0], 0
    sought.seek(4, [first.state(4)])  # with one (a checkpoint's), it goes on from there
    for k, v in sought.batch(4).items():
        np.testing.assert_array_equal(v, batches[4][k])
    assert replayed >= 20 and decoded[0] < 4 + len(_bad_files()), (replayed, decoded)
    decoded[0] = 0  # the next batch was read ahead, in the background
    ours, theirs = sought.batch(5, ahead=False), fresh.batch(5)  # (the trainer's last step reads none ahead)
    assert decoded[0] == 0
    for k, v in ours.items():
        np.testing.assert_array_equal(v, theirs[k])
    after = sought.state(6)  # a checkpoint after the last step still knows where the stream stands
    assert after is not None
    six = sought.batch(6)  # nothing was read ahead of it: read here
    assert decoded[0] >= 4, decoded
    later = stream()
    later.seek(6, [after])
    for k, v in later.batch(6, ahead=False).items():
        np.testing.assert_array_equal(v, six[k])

    spec = TINY["micro"].replace(cross_attention_dim=80, projection_class_embeddings_input_dim=40 + 6 * 8)
    c = _train_micro(tmp_path / "run", spec, steps=2, accumulation=2, source="images", path=f"folder:{images}",
                     pipeline=pipeline, resolution=RES)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss"]) for line in lines)
    # its checkpoint holds where the stream stood: a stream sent there reads the batch a replay reads
    *_, meta = load_checkpoint(tmp_path / "run")
    assert meta["data_state"][0] is not None  # saved after the last step, which read nothing ahead
    again, resumed = make_data(c, spec), make_data(c, spec)
    resumed.seek(2, meta["data_state"])
    replayed_2 = again.batch(2)
    for k, v in resumed.batch(2).items():
        np.testing.assert_array_equal(v, replayed_2[k])


def _count_decodes(monkeypatch) -> list[int]:
    """[records decoded since] by this thread (not by a stream's reader thread reading the next batch ahead)."""
    count, process = [0], S.process_record

    def counted(*args, **kwargs):
        count[0] += threading.current_thread() is threading.main_thread()
        return process(*args, **kwargs)

    monkeypatch.setattr(S, "process_record", counted)
    return count


def _stream(source, tokenizers=None, **kw):
    from jaxdistill.data import StreamedImages

    options = dict(prep=S.Preprocessing(resolution=RES, random_flip=True), batch_size=4, seed=1, rules=RULES) | kw
    return StreamedImages(source, tokenizers, **options)


def _captioned(folder, names):
    for i, name in enumerate(names):
        _write(folder, f"{name}.png", _encode(_noise(40, 64, i), "PNG"))
        _write(folder, f"{name}.txt", f"picture {name}".encode())


def test_the_stream_reshuffles_and_redraws_crops_every_epoch(tmp_path):
    """A folder of up to files_per_shard images is one shard: its records are shuffled every epoch, and
    each example's crop and flip are drawn again — a pure function of (seed, epoch) all the same."""
    names = [f"{i:03d}" for i in range(12)]
    _captioned(tmp_path, names)
    stream = _stream(S.open_source(str(tmp_path)))
    epochs = [list(stream.epoch_examples(e)) for e in range(3)]
    orders = [[ex.key for ex in epoch] for epoch in epochs]
    assert all(sorted(order) == names for order in orders)
    assert orders[0] != names and len({tuple(order) for order in orders}) == 3
    first = {ex.key: ex.pixels for ex in epochs[0]}
    assert sum(not np.array_equal(first[ex.key], ex.pixels) for ex in epochs[1]) > 6  # new crops and flips
    again = _stream(S.open_source(str(tmp_path)))
    for a, b in zip(epochs[1], again.epoch_examples(1), strict=True):
        assert a.key == b.key and np.array_equal(a.pixels, b.pixels) and np.array_equal(a.time_ids, b.time_ids)


def test_every_host_reads_its_share_of_every_shard(tmp_path):
    """One shard (a small folder) is enough for two hosts, and three shards split evenly between them."""
    names = [f"{i:03d}" for i in range(9)]
    _captioned(tmp_path, names)
    for files_per_shard in (1000, 3):
        hosts = [_stream(S.open_source(f"folder:{tmp_path}", files_per_shard=files_per_shard), process_index=i,
                         process_count=2) for i in range(2)]
        for epoch in range(2):
            keys = [[ex.key for ex in host.epoch_examples(epoch)] for host in hosts]
            assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == names
            assert abs(len(keys[0]) - len(keys[1])) <= 1


def test_hosts_go_on_from_their_saved_positions(tmp_path, pipeline, capsys):
    """Two hosts over three shards, into later epochs: each goes on from its own saved position (here with
    three threads decoding, where the first run had one); positions saved by another number of hosts are not
    taken — the stream is replayed, and the log says so."""
    from jaxdistill.text import load_tokenizers

    _captioned(tmp_path, [f"{i:03d}" for i in range(9)])
    tokenizers = load_tokenizers(pipeline)
    hosts = lambda workers=1: [_stream(S.open_source(f"folder:{tmp_path}", files_per_shard=3), tokenizers,  # noqa: E731
                                       process_index=i, process_count=2, workers=workers) for i in range(2)]
    first = hosts()
    batches = [[host.batch(step) for step in range(8)] for host in first]  # 16 each of its 4 or 5 an epoch
    states = [host.state(7) for host in first]
    assert states[0] != states[1] and min(state["epoch"] for state in states) >= 2
    for sought, wanted in ((hosts(workers=3), states), (hosts(), states[:1])):
        for i, host in enumerate(sought):
            host.seek(7, wanted)
            for k, v in host.batch(7).items():
                np.testing.assert_array_equal(v, batches[i][7][k])
    assert "(it was saved by 1 process, this run has 2): replaying it up to step 7" in capsys.readouterr().out


def test_the_stream_reports_its_skipped_inputs_once(images, pipeline):
    """The first epoch's skips, once: not counted again in later epochs or by a resume's replay."""
    from jaxdistill.text import load_tokenizers

    tokenizers = load_tokenizers(pipeline)
    stream = lambda: _stream(S.open_source(f"folder:{images}", files_per_shard=8), tokenizers,  # noqa: E731
                             prep=S.Preprocessing(resolution=RES))
    first = stream()
    first.batch(0)
    assert first.skip_report() is None  # 4 of the 13 good examples read: the first epoch goes on
    first.batch(1)
    first.batch(2)
    midway = first.state(2)  # the position before batch 2, inside the first epoch
    first.batch(3)  # 16 examples: into the second epoch
    report = first.skip_report()
    assert report.startswith(f"kept 13 of {13 + len(_bad_files()) - 1} records")
    assert first.skip_report() is None
    for step in range(4, 10):  # two more epochs
        first.batch(step)
    assert first.skip_report() is None and first.skips.kept == 13
    resumed = stream()
    resumed.batch(9)  # replays the stream from the start
    assert resumed.skip_report() == report
    # a stream sent to a saved position carries the counts up to it: the same report, in or past the first epoch
    for step, state in ((2, midway), (9, first.state(9))):
        sought = stream()
        sought.seek(step, [state])
        sought.batch(step)
        if step == 2:
            # as of the batches handed out: batch 3, read ahead into the second epoch, does not count yet
            concurrent.futures.wait([sought._ahead[1]])
            assert sought.skip_report() is None
            sought.batch(3)
        assert sought.skip_report() == report
    short = stream()
    short.batch(0)
    assert "(of the part of the first epoch read)" in short.skip_report(final=True)
    assert short.skip_report(final=True) is None


def test_each_data_set_has_an_identity_a_resume_checks(prepared, tmp_path):
    from jaxdistill.data import SyntheticLatents, check_same_data

    _, summary, out = prepared
    data = PreparedLatents(out, batch_size=4)
    assert data.identity == PreparedLatents(out, batch_size=2, seed=3).identity
    assert data.identity["num_examples"] == summary["num_examples"]
    stored = json.loads(json.dumps(data.identity))  # as a checkpoint's meta holds it
    check_same_data(stored, data)
    check_same_data(None, data)  # a checkpoint from before identities: not checked
    with pytest.raises(ValueError, match=r"trained on other data .*num_examples: 14 → 13"):
        check_same_data(stored | {"num_examples": 14}, data)

    _captioned(tmp_path / "f", ["a", "b", "c"])
    before = _stream(S.open_source(str(tmp_path / "f"))).identity
    assert before == _stream(S.open_source(str(tmp_path / "f"))).identity
    _captioned(tmp_path / "f", ["d"])  # an image added: another stream
    grown = _stream(S.open_source(str(tmp_path / "f")))
    with pytest.raises(ValueError, match="shards"):
        check_same_data(json.loads(json.dumps(before)), grown)

    synthetic = SyntheticLatents(TINY["micro"], num_examples=16, batch_size=4)
    assert json.loads(json.dumps(synthetic.identity)) == synthetic.identity
    assert synthetic.identity != SyntheticLatents(TINY["micro"], num_examples=32, batch_size=4).identity


def test_a_missing_or_empty_data_path_is_a_usage_error(pipeline, tmp_path):
    """ValueError (the trainer's usage error), saying what to do, before anything is read."""
    from jaxdistill.config import base_config
    from jaxdistill.data import make_data

    c = base_config()
    c.data.update(source="prepared", path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"is not a prepared data set \(no such folder\); make one with"):
        make_data(c, TINY["micro"])
    (tmp_path / "empty").mkdir()
    c.data.update(source="images", path=str(tmp_path / "empty"), pipeline=pipeline, resolution=RES)
    with pytest.raises(ValueError, match=r"no images \(jpg/jpeg/png/webp/bmp\) found under"):
        make_data(c, TINY["micro"])
    c.data.update(path=f"tar:{tmp_path}/*.tar")
    with pytest.raises(ValueError, match="no tar files match"):
        make_data(c, TINY["micro"])


def test_the_reader_index_is_built_with_numpy():
    """Example index → latent shape groups from prepare's run-length shapes, in the order the reader has
    always used (shapes sorted, indices ascending), without a Python object per example."""
    import tracemalloc

    from jaxdistill.data import shape_groups

    shapes, groups = shape_groups([[[16, 16, 3], [8, 24, 2], [16, 16, 1]], [], [[24, 8, 2], [8, 24, 1]]])
    assert shapes == [(8, 24), (16, 16), (24, 8)]
    assert [g.tolist() for g in groups] == [[3, 4, 8], [0, 1, 2, 5], [6, 7]]
    rng = np.random.default_rng(0)
    runs = [[[8 * (1 + rng.integers(40)), 64, 16] for _ in range(125)] for _ in range(1000)]  # 2M examples
    tracemalloc.start()
    try:
        _, groups = shape_groups(runs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(len(g) for g in groups) == 2_000_000 and peak < 100e6  # a Python index took ~240 MB


def test_a_folder_of_an_older_prepare_is_refused_as_such(tmp_path):
    """Its shard files follow other rules: no settings resume it, and the message says so."""
    (tmp_path / "progress").mkdir()
    old = {"pipeline": "/p", "seed": 0, "num_shards": 3}  # format 1 wrote no "format"
    (tmp_path / "progress" / "settings.json").write_text(json.dumps(old))
    (tmp_path / "progress" / "shard-00000.json").write_text("{}")  # a shard it finished
    with pytest.raises(P.PrepareError, match=r"older version of prepare \(format None, now 3\); prepare into a new"):
        P._check_settings(tmp_path, {"format": P.FORMAT, "pipeline": "/p", "seed": 0})
    with pytest.raises(P.PrepareError, match=r"other settings \(seed: 0 → 1\); use a new --out, or rerun"):
        P._check_settings(tmp_path, old | {"seed": 1})
    # settings of a run that finished no shard (it failed at its start: a damaged pipeline) make way for a retry's
    (tmp_path / "progress" / "shard-00000.json").unlink()
    P._check_settings(tmp_path, {"format": P.FORMAT, "pipeline": "/mended", "seed": 0})
    assert json.loads((tmp_path / "progress" / "settings.json").read_text())["pipeline"] == "/mended"
