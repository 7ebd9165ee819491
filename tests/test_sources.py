"""Image–caption sources: folder / metadata / tar / TFDS reading, the bad-input rules, SDXL preprocessing."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxdistill import sources
from jaxdistill.sources import (
    DecodeRules,
    Preprocessing,
    Record,
    Skips,
    clean_caption,
    decode_image,
    nearest_bucket,
    open_source,
    preprocess,
    process_record,
    read_examples,
    resize_to_cover,
    sdxl_buckets,
    shards_for_process,
    to_rgb,
)

RES = 32
RULES = DecodeRules(max_pixels=50_000, min_size=16)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _write(root, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _good_files() -> dict[str, tuple[bytes, bytes]]:
    """relative path → (image bytes, caption bytes) for inputs that must come out as examples."""
    p_trans = Image.new("P", (40, 40), 0)
    p_trans.putpalette([10, 20, 30] * 256)
    transparent = np.zeros((40, 40, 4), np.uint8)
    images = {
        "rgb_wide.png": _encode(_noise(40, 64, 1), "PNG"),
        "sub/rgb_tall.jpg": _encode(_noise(80, 40, 2), "JPEG"),
        "sub.v1/photo.webp": _encode(_noise(48, 48, 3), "WEBP"),
        "UPPER.JPG": _encode(_noise(36, 50, 4), "JPEG"),
        "bitmap.bmp": _encode(_noise(33, 33, 5), "BMP"),
        "gray.png": _encode(_noise(40, 40, 6).convert("L"), "PNG"),
        "gray_alpha.png": _encode(_noise(40, 40, 7).convert("LA"), "PNG"),
        "rgba.png": _encode(Image.fromarray(transparent, "RGBA"), "PNG"),
        "pal.png": _encode(_noise(40, 40, 8).convert("P"), "PNG"),
        "pal_trans.png": _encode(p_trans, "PNG", transparency=0),
        "cmyk.jpg": _encode(_noise(40, 40, 9).convert("CMYK"), "JPEG"),
        "sixteen.png": _encode(Image.fromarray(np.full((40, 48), 25700, np.uint16)), "PNG"),
    }
    captions = {rel: f"a picture called {rel}".encode() for rel in images}
    captions["sub.v1/photo.webp"] = "\ufeffcafé ☕ with a BOM\n".encode()
    return {rel: (images[rel], captions[rel]) for rel in images}


def _bad_files() -> dict[str, tuple[bytes, bytes | None, str]]:
    """relative path → (image bytes, caption bytes or None for no .txt, expected skip reason)."""
    png = bytearray(_encode(_noise(40, 64, 10), "PNG"))
    png[len(png) // 2:len(png) // 2 + 40] = bytes(40)
    jpeg = _encode(_noise(64, 64, 11), "JPEG")
    ok = _encode(_noise(40, 40, 12), "PNG")
    return {
        "garbage.jpg": (bytes(range(256)) * 4, b"x", "not_an_image"),
        "corrupt.png": (bytes(png), b"x", "corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], b"x", "truncated"),
        "zero.png": (b"", b"x", "empty_file"),
        "bomb.png": (_encode(Image.new("RGB", (300, 300)), "PNG"), b"x", "too_many_pixels"),
        "tiny.png": (_encode(_noise(8, 8), "PNG"), b"x", "too_small"),
        "banner.png": (_encode(_noise(20, 400), "PNG"), b"x", "extreme_aspect"),
        "nocap.png": (ok, None, "caption_missing"),
        "emptycap.png": (ok, b"  \n\t", "caption_empty"),
        "latin.png": (ok, "café".encode("latin-1"), "caption_not_utf8"),
        "dup.jpg": (jpeg, b"the first file (in path order) with key dup", None),  # kept
        "dup.png": (ok, b"the first file (in path order) with key dup", "duplicate_key"),
    }


def write_image_folder(root) -> str:
    """The good and the broken images, each with its caption file (when it has one)."""
    for rel, (img, cap) in _good_files().items():
        _write(root, rel, img)
        _write(root, os.path.splitext(rel)[0] + ".txt", cap)
    for rel, (img, cap, _) in _bad_files().items():
        _write(root, rel, img)
        if cap is not None:
            _write(root, os.path.splitext(rel)[0] + ".txt", cap)
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"))


def _run(source, prep=None, rules=RULES, seed=0, workers=1):
    prep, skips, examples = prep or Preprocessing(resolution=RES), Skips(), {}
    for shard in source.shards():
        for ex in read_examples(source, shard, seed=seed, prep=prep, rules=rules, skips=skips, workers=workers):
            assert ex.key not in examples
            examples[ex.key] = ex
    return examples, skips


def test_threads_decode_the_same_examples_and_count_the_same_skips(folder):
    """Decoding in threads changes nothing: the same examples (pixels, crops, captions) in the same order, the
    same skip counts and example keys (merged in the records' order, whichever thread finished first)."""
    source = open_source(f"folder:{folder}", files_per_shard=5)
    (one, skips_one), (many, skips_many) = (_run(source, workers=n) for n in (1, 3))
    assert list(one) == list(many) and skips_one.to_dict() == skips_many.to_dict() and skips_one.skipped > 3
    for key, ex in one.items():
        assert np.array_equal(ex.pixels, many[key].pixels) and np.array_equal(ex.time_ids, many[key].time_ids)
        assert ex.caption == many[key].caption


def test_folder_keeps_good_inputs_and_counts_bad_ones(folder):
    examples, skips = _run(open_source(f"folder:{folder}", files_per_shard=5))
    good = {os.path.splitext(rel)[0]: rel for rel in _good_files()} | {"dup": "dup.jpg"}
    assert set(examples) == set(good)
    expected = {reason: 1 for *_, reason in _bad_files().values() if reason}
    assert dict(skips.counts) == expected
    assert skips.examples["truncated"] == ["truncated"] and skips.examples["duplicate_key"] == ["dup.png"]
    assert skips.kept == len(good)
    for key, ex in examples.items():
        assert ex.pixels.shape == (RES, RES, 3) and ex.pixels.dtype == np.float32
        assert ex.pixels.min() >= -1.0 and ex.pixels.max() <= 1.0
        with Image.open(os.path.join(folder, good[key])) as img:
            width, height = img.size
        oh, ow, top, left, th, tw = ex.time_ids.tolist()
        rh, rw = resize_to_cover(height, width, RES, RES)
        assert (oh, ow, th, tw) == (height, width, RES, RES) and min(rh, rw) == RES
        assert 0 <= top <= rh - RES and 0 <= left <= rw - RES
    assert examples["sub.v1/photo"].caption == "café ☕ with a BOM"
    assert examples["UPPER"].caption == "a picture called UPPER.JPG"
    # Alpha composited on white, a transparent palette entry too; 16-bit 25700 → 8-bit 100, not clipped to 255.
    np.testing.assert_array_equal(examples["rgba"].pixels, 1.0)
    np.testing.assert_array_equal(examples["pal_trans"].pixels, 1.0)
    np.testing.assert_allclose(examples["sixteen"].pixels, 100 / 127.5 - 1, atol=1e-6)
    gray = examples["gray"].pixels
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_to_rgb_scales_16_bit_and_composites_alpha_on_white():
    values = np.array([[0, 257, 1000, 25700, 32896, 65535]], np.uint16)
    expected = [0, 1, 4, 100, 128, 255]  # round(v / 257)
    for arr in (values, values.astype(">u2"), values.astype(np.int32)):  # I;16, I;16B, I
        img = Image.fromarray(arr)
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == expected, img.mode
    assert np.asarray(Image.fromarray(values).convert("L"))[0, 2] == 255  # what Pillow's own convert does
    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 255, 128]]], np.uint8), "RGBA")
    out = np.asarray(to_rgb(rgba)).astype(int)[0]
    assert out[0].tolist() == [255, 0, 0] and out[1].tolist() == [255, 255, 255]
    assert np.abs(out[2] - [127, 127, 255]).max() <= 1
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], np.uint8), "LA")
    assert np.asarray(to_rgb(la))[0].tolist() == [[255] * 3, [50] * 3]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    assert decode_image(_encode(_noise(20, 30).convert("CMYK"), "JPEG")).mode == "RGB"


def test_exif_orientation_is_applied_before_sizes_are_read():
    img = _noise(20, 40)  # 40 wide, 20 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_pillow_bomb_limit_counts_as_too_many_pixels(monkeypatch):
    data = _encode(_noise(100, 100), "PNG")  # 10,000 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2 × this
    with pytest.raises(sources.Skip) as e:
        decode_image(data)
    assert e.value.reason == "too_many_pixels"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8000)  # Pillow only warns; our limit (64 Mpx) keeps it
    with pytest.warns(Image.DecompressionBombWarning):
        assert decode_image(data).size == (100, 100)
        with pytest.raises(sources.Skip) as e:
            decode_image(data, DecodeRules(max_pixels=9999))
    assert e.value.reason == "too_many_pixels"


def test_captions():
    rng = np.random.default_rng(0)
    assert clean_caption(b"\xef\xbb\xbf  a cat \n") == "a cat"
    assert clean_caption("a dog") == "a dog"
    picks = {clean_caption(["one", "two", "three"], rng) for _ in range(30)}
    assert picks == {"one", "two", "three"}
    assert clean_caption(np.array([b"only"], dtype=object), rng) == "only"
    bad = {None: "caption_missing", b"\xff\xfe": "caption_not_utf8", "caf\udce9": "caption_not_utf8",
           " ": "caption_empty", 3: "caption_not_text"}
    for raw, reason in bad.items():
        with pytest.raises(sources.Skip) as e:
            clean_caption(raw)
        assert e.value.reason == reason


def test_centre_crop_flip_and_time_ids_follow_diffusers():
    """diffusers' current preprocess_train: resize, flip (when drawn), then crop the flipped image and
    record that crop's ordinary offset. (An older script cropped first and stored `width - x1`: offsets
    no crop can have, e.g. 1024 for an uncropped 1024² photo.)"""
    img = _noise(40, 64)  # h=40, w=64 → resized to 32 × int(32·64/40)=51, centre left = round(19/2) = 10
    assert resize_to_cover(40, 64, 32, 32) == (32, 51) and resize_to_cover(100, 30, 32, 32) == (106, 32)
    prep = Preprocessing(resolution=32, center_crop=True, random_flip=True)
    resized = np.asarray(img.resize((51, 32), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
    flipped = set()
    for seed in range(20):
        flip = np.random.default_rng(seed).random() < 0.5  # the flip is the first draw
        pixels, ids = preprocess(img, prep, np.random.default_rng(seed))
        assert ids.tolist() == [40, 64, 0, 10, 32, 32]  # the centre offset, flipped or not
        # flipped first, then cropped: an odd margin (19) puts the crop one column off the unflipped crop's mirror
        np.testing.assert_allclose(pixels, (resized[:, ::-1] if flip else resized)[:, 10:42], atol=1e-6)
        flipped.add(flip)
    assert flipped == {True, False}
    _, ids = preprocess(img, Preprocessing(resolution=32, center_crop=True), np.random.default_rng(0))
    assert ids.tolist() == [40, 64, 0, 10, 32, 32] and ids.dtype == np.int32
    # random crops, flipped or not: offsets within [0, resized − target]; an image of the target size is never
    # cropped, so its offset is (0, 0)
    lefts = {int(preprocess(img, Preprocessing(resolution=32, random_flip=True), np.random.default_rng(s))[1][3])
             for s in range(200)}
    assert lefts <= set(range(20)) and len(lefts) > 10
    square = Preprocessing(resolution=32, random_flip=True)
    assert {tuple(preprocess(_noise(32, 32), square, np.random.default_rng(s))[1][2:4]) for s in range(20)} == {(0, 0)}


def test_same_seed_same_crops_different_seed_different_crops(folder):
    prep = Preprocessing(resolution=RES, random_flip=True)
    source = open_source(folder)
    a, _ = _run(source, prep, seed=7)
    b, _ = _run(source, prep, seed=7)
    c, _ = _run(source, prep, seed=8)
    for key in a:
        np.testing.assert_array_equal(a[key].time_ids, b[key].time_ids)
        np.testing.assert_array_equal(a[key].pixels, b[key].pixels)
    assert any(not np.array_equal(a[k].time_ids, c[k].time_ids) for k in a)
    # Randomness depends on (seed, key) only, not on sharding.
    d, _ = _run(open_source(folder, files_per_shard=2), prep, seed=7)
    assert all(np.array_equal(a[k].pixels, d[k].pixels) for k in a)


def test_buckets():
    buckets = sdxl_buckets(1024)
    assert len(buckets) == 40 and buckets == sources.SDXL_BUCKETS_1024
    assert all(h % 64 == 0 and w % 64 == 0 and abs(h * w - 1024**2) / 1024**2 < 0.1 for h, w in buckets)
    assert nearest_bucket(500, 2000, buckets) == (512, 2048)  # wide
    assert nearest_bucket(1800, 600, buckets) == (1728, 576)  # tall
    assert nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    small = sdxl_buckets(256)
    assert all(b[0] == b[1] == r for r in (256, 512, 768) for b in sdxl_buckets(r) if b[0] == b[1])
    for r in (96, 1000, 128):  # the square bucket would not be r²: 96 gave 128²
        with pytest.raises(ValueError, match="a multiple of 64 of at least 256"):
            sdxl_buckets(r)
    assert (128, 512) in small and (256, 256) in small and all(min(b) >= 64 for b in small)
    prep = Preprocessing(resolution=256, buckets=small)
    pixels, ids = preprocess(_noise(30, 120), prep, np.random.default_rng(0))  # aspect 1:4 → (128, 512)
    assert pixels.shape == (128, 512, 3) and ids.tolist() == [30, 120, 0, 0, 128, 512]
    bh, bw = nearest_bucket(120, 40, small)
    assert bh > bw
    pixels, ids = preprocess(_noise(120, 40), prep, np.random.default_rng(0))
    assert pixels.shape == (bh, bw, 3) and ids.tolist()[4:] == [bh, bw]
    assert 0 <= ids[2] <= resize_to_cover(120, 40, bh, bw)[0] - bh


def test_metadata_jsonl_and_csv(tmp_path):
    ok = _encode(_noise(40, 40), "PNG")
    for rel in ("a.png", "sub/b.png", "c.png", "d.png"):
        _write(tmp_path / "jsonl", rel, ok)
    _write(tmp_path / "jsonl", "c.txt", b"from the txt")
    lines = [{"file_name": "a.png", "text": "A"}, {"file_name": "sub/b.png", "text": "B", "score": 5},
             {"file_name": "missing.png", "text": "M"}, {"file_name": "d.png", "text": ["d1", "d2"]},
             # files outside the source folder are not its data (they were read, keyed "../outside")
             {"file_name": "../outside.png", "text": "O"}, {"file_name": str(tmp_path / "outside.png"), "text": "O"}]
    _write(tmp_path, "outside.png", ok)
    _write(tmp_path / "jsonl", "metadata.jsonl",
           b"\n".join([json.dumps(x).encode() for x in lines] + [b"{not json", b""]))
    examples, skips = _run(open_source(str(tmp_path / "jsonl")))
    assert {k: e.caption for k, e in examples.items() if k != "d"} == {"a": "A", "sub/b": "B", "c": "from the txt"}
    assert examples["d"].caption in ("d1", "d2") and examples["sub/b"].extra == {"score": 5}
    assert dict(skips.counts) == {"missing_image": 1, "bad_metadata": 3}
    assert skips.examples["bad_metadata"] == ["metadata.jsonl:5", "metadata.jsonl:6", "metadata.jsonl:7"]

    for rel in ("x.png", "y.png", "z.png", "deep/w.png"):
        _write(tmp_path / "csv", rel, ok)
    _write(tmp_path / "csv", "metadata.csv",
           "\ufefffile_name,caption,other\nx.png,\"an x, quoted\",1\ny.png,,2\n".encode() + b"z.png,caf\xe9,3\n")
    _write(tmp_path / "csv", "deep/metadata.csv", b"file_name,caption\nw.png,a w\n")  # relative to its folder
    examples, skips = _run(open_source(f"folder:{tmp_path / 'csv'}", caption_column="caption"))
    assert {k: e.caption for k, e in examples.items()} == {"x": "an x, quoted", "deep/w": "a w"}
    assert examples["x"].extra == {"other": "1"}
    assert dict(skips.counts) == {"caption_empty": 1, "caption_not_utf8": 1}


def test_metadata_jsonl_lines_end_at_newline_only(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+0085, U+2028, form feeds, ... raw inside captions:
    str.splitlines() would cut those rows in two."""
    ok = _encode(_noise(40, 40), "PNG")
    captions = {"a": "café \x85 scraped", "b": "line one\u2028line two\u2029", "c": "form\x0cfeed", "d": "plain"}
    rows = [json.dumps({"file_name": f"{k}.png", "text": v}, ensure_ascii=False) for k, v in captions.items()]
    for k in captions:
        _write(tmp_path, f"{k}.png", ok)
    _write(tmp_path, "metadata.jsonl", "\r\n".join(rows).encode())  # CRLF line ends are fine too
    examples, skips = _run(open_source(str(tmp_path)))
    assert {k: e.caption for k, e in examples.items()} == {k: v.strip() for k, v in captions.items()}
    assert skips.skipped == 0 and skips.kept == 4


def test_metadata_files_that_cannot_be_parsed_are_one_bad_metadata(tmp_path):
    ok = _encode(_noise(40, 40), "PNG")
    long_caption = "a very long caption " * 10_000  # 200 kB: over csv's default cell limit (128 KiB)
    _write(tmp_path, "a.png", ok)
    _write(tmp_path, "b.png", ok)
    _write(tmp_path, "metadata.csv", f"file_name,text\na.png,{long_caption}\nb.png,short\n".encode())
    # a metadata file that cannot be read (a dangling link): its images take their .txt captions
    _write(tmp_path, "sub/c.png", ok)
    _write(tmp_path, "sub/c.txt", b"from the txt")
    os.symlink(tmp_path / "nowhere.jsonl", tmp_path / "sub" / "metadata.jsonl")
    examples, skips = _run(open_source(str(tmp_path)))
    assert {k: e.caption for k, e in examples.items()} == {"a": long_caption.strip(), "b": "short",
                                                          "sub/c": "from the txt"}
    assert dict(skips.counts) == {"bad_metadata": 1} and skips.examples["bad_metadata"] == ["sub/metadata.jsonl"]


def test_symlinked_folders_are_followed_once(tmp_path):
    ok = _encode(_noise(40, 40), "PNG")
    for rel in ("elsewhere/x.png", "elsewhere/deep/y.png", "root/local/z.png"):
        _write(tmp_path, rel, ok)
        _write(tmp_path, rel.replace(".png", ".txt"), b"caption")
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "linked")
    os.symlink(tmp_path / "root", tmp_path / "root" / "local" / "loop")  # a cycle: read once, not forever
    examples, skips = _run(open_source(str(tmp_path / "root")))
    assert sorted(examples) == ["linked/deep/y", "linked/x", "local/z"] and skips.skipped == 0


def test_an_empty_or_missing_folder_says_so(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _write(tmp_path / "empty", "notes.txt", b"no images here")
    with pytest.raises(ValueError, match=r"no images \(jpg/jpeg/png/webp/bmp\) found under .*empty"):
        open_source(f"folder:{tmp_path / 'empty'}").shards()
    with pytest.raises(ValueError, match="is not a folder"):
        open_source(f"folder:{tmp_path / 'nope'}")


def test_array_images_of_every_documented_dtype_are_kept():
    """Record.image may be a uint8/uint16/float array [H, W(, C)] (TFDS Tensor features): 16-bit and float
    are scaled like 16-bit / float images, a trailing channel axis of 1 is grey."""
    grey = np.full((40, 40), 25700, np.uint16)  # → 100
    cases = {"uint16 rgb": np.stack([grey] * 3, -1), "float rgb [0, 1]": np.full((40, 40, 3), 100 / 255, np.float32),
             "float rgb [0, 255]": np.full((40, 40, 3), 100.0), "uint8 [h, w, 1]": np.full((40, 40, 1), 100, np.uint8),
             "uint16 [h, w, 1]": grey[..., None], "float [h, w, 1]": np.full((40, 40, 1), 100 / 255, np.float32),
             "uint16 rgba": np.stack([grey] * 3 + [np.full_like(grey, 65535)], -1)}
    for name, array in cases.items():
        rgb = decode_image(array)
        assert rgb.mode == "RGB" and np.asarray(rgb).tolist() == np.full((40, 40, 3), 100).tolist(), name


def test_a_16_bit_grey_png_keeps_its_transparent_value():
    grey = Image.fromarray(np.array([[1000, 60000, 1000]], np.uint16))
    out = np.asarray(decode_image(_encode(grey, "PNG", transparency=1000)))  # tRNS: 1000 is transparent
    assert out[0].tolist() == [[255] * 3, [233] * 3, [255] * 3]  # on white; 60000 → round(60000 / 257) = 233


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_sample_whose_files_are_not_adjacent_is_named_as_such(tmp_path):
    """webdataset reads a sample's files together; a tar of all images, then all captions, splits each
    sample in two: the second part is split_sample, not duplicate_key (a repeated file type still is)."""
    img = _encode(_noise(40, 40, 0), "PNG")
    _tar(tmp_path / "t" / "00000.tar", [("a.png", img), ("b.png", img), ("a.txt", b"cap a"), ("b.txt", b"cap b"),
                                        ("c.png", img), ("c.txt", b"cap c"), ("d.png", img), ("c.png", img)])
    records = _records(open_source(str(tmp_path / "t")))
    assert [(r.key, r.error) for r in records] == [
        ("00000/a", None), ("00000/b", None), ("00000/a", "split_sample"), ("00000/b", "split_sample"),
        ("00000/c", None), ("00000/d", None), ("00000/c", "duplicate_key")]


def test_a_tar_cut_at_a_member_boundary_is_a_bad_tar(tmp_path):
    """tarfile's stream mode takes a missing or cut header for the end of the archive: without the
    end-of-archive check, the samples after the cut would vanish uncounted."""
    members = [(f"{i:03d}.{ext}", data) for i in range(4)
               for ext, data in (("jpg", _encode(_noise(40, 40, i), "JPEG")), ("txt", b"caption"))]
    _tar(tmp_path / "full.tar", members)
    with tarfile.open(tmp_path / "full.tar") as tar:
        third = tar.getmembers()[4].offset  # the header of sample 002's first file
    data = (tmp_path / "full.tar").read_bytes()
    examples, skips = _run(open_source(str(tmp_path / "full.tar")))
    assert len(examples) == 4 and skips.skipped == 0  # whole: no false alarm
    for cut in (third, third + 100):  # at the boundary, inside the header
        (tmp_path / "cut" / "x.tar").parent.mkdir(exist_ok=True)
        (tmp_path / "cut" / "x.tar").write_bytes(data[:cut])
        examples, skips = _run(open_source(str(tmp_path / "cut" / "x.tar")))
        assert sorted(examples) == ["x/000", "x/001"] and dict(skips.counts) == {"bad_tar": 1}, cut


def test_tar_keys_are_unique_across_tars(tmp_path):
    """Two tars of the same name in different folders, both with a sample "000": two keys (and two
    different random crops), each naming its tar."""
    for part, caption in (("a", b"x"), ("b", b"y")):
        _tar(tmp_path / part / "00000.tar", [("000.jpg", _encode(_noise(40, 60), "JPEG")), ("000.txt", caption)])
    prep = Preprocessing(resolution=RES, random_flip=True)
    keys = [r.key for r in _records(open_source(f"tar:{tmp_path}/*/*.tar"))]
    assert keys == ["a/00000/000", "b/00000/000"]
    examples, skips = _run(open_source(f"tar:{tmp_path}/*/*.tar"), prep)
    assert {k: e.caption for k, e in examples.items()} == {"a/00000/000": "x", "b/00000/000": "y"}
    assert skips.skipped == 0


def test_tar_names_stay_when_tars_are_added_and_odd_file_names_become_text(tmp_path):
    """Shard names are relative to the folder the pattern names, not to the tars found: a tar added in a new
    subfolder renames none. A file name that is not UTF-8 (os and tarfile hand such bytes over as surrogates)
    becomes \\xNN escapes in keys, which prepare writes and the skip report prints."""
    sample = [("000.jpg", _encode(_noise(40, 60), "JPEG")), ("000.txt", b"x")]
    _tar(tmp_path / "part1" / "00000.tar", [*sample, ("caf\udce9.jpg", sample[0][1]), ("caf\udce9.txt", b"y")])
    pattern = f"tar:{tmp_path}/part*/*.tar"
    assert [s.name for s in open_source(pattern).shards()] == ["part1/00000"]
    _tar(tmp_path / "part2" / "00000.tar", sample)
    assert [s.name for s in open_source(pattern).shards()] == ["part1/00000", "part2/00000"]
    keys = [r.key for r in _records(open_source(pattern))]
    assert keys == ["part1/00000/000", "part1/00000/caf\\xe9", "part2/00000/000"]
    assert all(k.encode("utf-8") for k in keys)
    folder = tmp_path / "folder"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 file name on a UTF-8 system
    (folder / f"{name}.jpg").write_bytes(sample[0][1])
    (folder / f"{name}.txt").write_bytes(b"z")
    examples, skips = _run(open_source(f"folder:{folder}"))
    assert list(examples) == ["caf\\xe9"] and examples["caf\\xe9"].caption == "z" and skips.skipped == 0


def test_shuffled_records_permute_a_shard_and_split_it_between_hosts(tmp_path):
    ok = _encode(_noise(40, 40), "PNG")
    members = []
    for i in range(12):
        _write(tmp_path / "folder", f"{i:03d}.png", ok)
        members += [(f"{i:03d}.png", ok), (f"{i:03d}.txt", b"x")]
    _tar(tmp_path / "t.tar", members)
    for source, prefix in ((open_source(str(tmp_path / "folder")), ""), (open_source(str(tmp_path / "t.tar")), "t/")):
        (shard,) = source.shards()
        order = [r.key for r in sources.shuffled_records(source, shard, np.random.default_rng(0))]
        assert sorted(order) == [f"{prefix}{i:03d}" for i in range(12)] and order != sorted(order)
        assert order == [r.key for r in sources.shuffled_records(source, shard, np.random.default_rng(0))]
        assert order != [r.key for r in sources.shuffled_records(source, shard, np.random.default_rng(1))]
        small = [r.key for r in sources.shuffled_records(source, shard, np.random.default_rng(0), buffer_size=4)]
        assert sorted(small) == sorted(order)  # a buffer smaller than the tar: still every record once
        hosts = [[r.key for r in sources.shuffled_records(source, shard, np.random.default_rng(0), start=i, step=3)]
                 for i in range(3)]
        assert [k for keys in zip(*hosts, strict=True) for k in keys] == order  # every third record of that order
        # a resumed stream passes over the first records of its share (a folder's are not read at all)
        resumed = [r.key for r in sources.shuffled_records(source, shard, np.random.default_rng(0), start=1, step=3,
                                                           skip=2)]
        assert resumed == hosts[1][2:]


def test_preprocessing_sizes_must_be_positive():
    for bad in ({"resolution": 0}, {"resolution": -8}, {"buckets": ((0, 64),)}, {"buckets": ()}):
        with pytest.raises(ValueError, match="must be positive"):
            Preprocessing(**bad)


def _records(source):
    return [r for shard in source.shards() for r in source.read(shard)]


def test_tar_shards_give_the_same_records_as_the_folder(tmp_path):
    samples = {f"{d}/{i:06d}": (_encode(_noise(40, 50, i), "JPEG"), f"caption {i}".encode())
               for i, d in enumerate(["dir.v1"] * 3 + ["plain"] * 3)}
    for key, (img, cap) in samples.items():
        _write(tmp_path / "folder", key + ".jpg", img)
        _write(tmp_path / "folder", key + ".txt", cap)
    os.makedirs(tmp_path / "tars")
    keys = sorted(samples)
    for t, chunk in enumerate((keys[:4], keys[4:])):
        with tarfile.open(tmp_path / "tars" / f"{t:05d}.tar", "w") as tar:
            for key in chunk:
                img, cap = samples[key]
                meta = json.dumps({"key": key, "url": f"http://x/{key}"}).encode()
                for ext, data in (("jpg", img), ("txt", cap), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    folder_records = _records(open_source(str(tmp_path / "folder")))
    tar_source = open_source(str(tmp_path / "tars"))
    assert isinstance(tar_source, sources.TarSource) and [s.name for s in tar_source.shards()] == ["00000", "00001"]
    tar_records = _records(tar_source)
    tar_keys = [f"0000{t}/{k}" for t, chunk in enumerate((keys[:4], keys[4:])) for k in chunk]  # the tar's name first
    expected = [(k, r.image, r.caption) for k, r in zip(tar_keys, folder_records, strict=True)]
    assert [(r.key, r.image, r.caption) for r in tar_records] == expected
    assert tar_records[0].extra == {"key": keys[0], "url": f"http://x/{keys[0]}"}
    prep = Preprocessing(resolution=RES, center_crop=True)  # no randomness: keys differ, so would its draws
    for a, b in zip(_run(tar_source, prep)[0].values(), _run(open_source(str(tmp_path / "folder")), prep)[0].values(),
                    strict=True):
        assert a.key.split("/", 1)[1] == b.key and np.array_equal(a.pixels, b.pixels)
        assert np.array_equal(a.time_ids, b.time_ids)

    # An interrupted download: the samples before the damage are kept, the tar is counted once.
    data = (tmp_path / "tars" / "00000.tar").read_bytes()
    (tmp_path / "tars" / "00000.tar").write_bytes(data[: len(data) // 2])
    examples, skips = _run(open_source(f"tar:{tmp_path / 'tars' / '*.tar'}"))
    assert skips.counts["bad_tar"] == 1 and skips.examples["bad_tar"] == ["00000"]
    assert set(tar_keys[4:]) <= set(examples) and tar_keys[0] in examples and len(examples) < len(keys)


def test_tfds_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # store_as_tfds_dataset needs TensorFlow (its adhoc builder checks for tf.data); a builder writing
    # array_record files needs none. Unregistered, so `tfds.builder` below reads the files back by name.
    with tfds.core.registered.skip_registration():
        class TinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = {"photo": tfds.features.Image(shape=(None, None, 3)),
                            "meta": {"caption": tfds.features.Text()}}
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                             disable_shuffling=True)  # stored in key order: slices are known

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(5):
                    yield i, {"photo": _encode(_noise(40, 40 + i, i), "PNG"), "meta": {"caption": f"number {i}"}}
                yield 5, {"photo": b"not an image", "meta": {"caption": "broken"}}
                yield 6, {"photo": _encode(_noise(40, 40), "PNG"), "meta": {"caption": " "}}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = open_source("tfds:tiny_captions:1.0.0:train[1:]", data_dir=str(tmp_path), image_key="photo",
                         text_key="meta.caption", examples_per_shard=4)
    assert [s.name for s in source.shards()] == ["train[1:5]", "train[5:7]"]
    examples, skips = _run(source)
    assert len(examples) == 4 and dict(skips.counts) == {"not_an_image": 1, "caption_empty": 1}
    assert {k: e.caption for k, e in examples.items()} == {f"train/{i}": f"number {i}" for i in range(1, 5)}
    assert skips.examples == {"not_an_image": ["train/5"], "caption_empty": ["train/6"]}
    for ex in examples.values():
        assert ex.pixels.shape == (RES, RES, 3) and ex.time_ids[0] == 40
    whole = open_source("tfds:tiny_captions", data_dir=str(tmp_path), image_key="photo", text_key="meta.caption")
    assert [s.name for s in whole.shards()] == ["train[0:7]"]
    with pytest.raises(ValueError, match="no feature"):
        open_source("tfds:tiny_captions", data_dir=str(tmp_path), text_key="meta.nope", image_key="photo")

    # fingerprints: one per slice, the same when opened again, another for another feature
    prints = [source.fingerprint(s) for s in source.shards()]
    again = open_source("tfds:tiny_captions:1.0.0:train[1:]", data_dir=str(tmp_path), image_key="photo",
                        text_key="meta.caption", examples_per_shard=4)
    assert len(set(prints)) == 2 and prints == [again.fingerprint(s) for s in again.shards()]
    other = open_source("tfds:tiny_captions:1.0.0:train[1:]", data_dir=str(tmp_path), image_key="photo",
                        text_key="photo", examples_per_shard=4)
    assert not set(prints) & {other.fingerprint(s) for s in other.shards()}
    # what cannot be read is an error that says so (not TFDS's list of every data set it knows)
    with pytest.raises(ValueError, match="no such data set"):
        open_source("tfds:no_such_captions", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not built in"):
        open_source("tfds:mnist", data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="bad split 'test'"):
        open_source("tfds:tiny_captions:test", data_dir=str(tmp_path), image_key="photo", text_key="meta.caption")


def test_fingerprints_change_when_a_shards_input_does(tmp_path):
    """What a resumed `prepare` relies on to redo a finished shard whose input changed."""
    def caption(key, text, mtime_ns=None):
        _write(tmp_path / "f", f"{key}.txt", text.encode())
        if mtime_ns:
            os.utime(tmp_path / "f" / f"{key}.txt", ns=(mtime_ns, mtime_ns))

    for i in range(10):
        _write(tmp_path / "f", f"b{i:02d}.png", _encode(_noise(8, 8, i), "PNG"))
        caption(f"b{i:02d}", f"caption {i}")

    def prints():
        source = open_source(f"folder:{tmp_path / 'f'}", files_per_shard=4)
        return [source.fingerprint(s) for s in source.shards()]

    first = prints()
    assert len(set(first)) == 3 and prints() == first  # stable while the folder is
    caption("b05", "caption 5", mtime_ns=10**18)  # the same bytes, written again: shard 1 only
    second = prints()
    assert [a == b for a, b in zip(first, second, strict=True)] == [True, False, True]
    caption("b09", "caption nine")  # another caption (another size, whatever the mtime's resolution)
    assert [a == b for a, b in zip(second, prints(), strict=True)] == [True, True, False]
    # one image added in front shifts every shard: same names and count, other files in each
    _write(tmp_path / "f", "a00.png", _encode(_noise(8, 8), "PNG"))
    assert not set(prints()) & set(second)

    tar = tmp_path / "t" / "00000.tar"
    _write(tar.parent, tar.name, bytes(100))  # an interrupted download: a bad_tar
    source = open_source(str(tar.parent))
    before = source.fingerprint(source.shards()[0])
    assert open_source(str(tar.parent)).fingerprint(source.shards()[0]) == before
    with tarfile.open(tar, "w") as t:  # downloaded again, now whole
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    assert source.fingerprint(source.shards()[0]) != before


def test_shards_split_disjointly_across_processes(folder):
    source = open_source(folder, files_per_shard=3)
    shards = source.shards()
    assert len(shards) > 4 and len({s.name for s in shards}) == len(shards)
    mine = [shards_for_process(shards, i, 2) for i in range(2)]
    names = [{s.name for s in m} for m in mine]
    assert not names[0] & names[1] and names[0] | names[1] == {s.name for s in shards}
    keys = [[r.key for s in m for r in source.read(s)] for m in mine]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(r.key for r in _records(source))
    assert [s.name for s in open_source(folder, files_per_shard=3).shards()] == [s.name for s in shards]
    with pytest.raises(ValueError):
        shards_for_process(shards, 2, 2)


def test_skips_merge_and_never_raise():
    a, b = Skips(), Skips()
    prep = Preprocessing(resolution=RES)
    assert process_record(Record("k1", b"", "cap", {}), seed=0, prep=prep, skips=a) is None
    assert process_record(Record("k2", None, "cap", {}, "read_error"), seed=0, prep=prep, skips=b) is None
    assert process_record(Record("k3", object(), "cap", {}), seed=0, prep=prep, skips=b) is None  # not bytes
    assert process_record(Record("k4", np.zeros((40, 40, 3), np.uint8), "cap", {}), seed=0, prep=prep, skips=b)
    total = Skips.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b)
    assert total.kept == 1 and total.skipped == 3 and total.counts["empty_file"] == 1
    assert "error:TypeError" in total.counts
    assert "kept 1 of 4" in total.summary() and "read_error" in total.summary()


def test_open_source_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError):
        open_source(str(tmp_path / "nope"))
    # a folder (or tar) whose name holds glob characters is taken as named, not as a pattern
    images = tmp_path / "imgs[2023]"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    (images / "a.txt").write_text("a cat")
    assert isinstance(open_source(str(images)), sources.FolderSource)
    _tar(tmp_path / "imgs[2023]" / "s[1].tar", [("b.png", (images / "a.png").read_bytes()), ("b.txt", b"a dog")])
    for spec in (str(images), str(images / "s[1].tar")):
        source = open_source(spec)
        assert isinstance(source, sources.TarSource) and [s.name for s in source.shards()] == ["s[1]"], spec
    with pytest.raises(ValueError, match="no tar files match"):  # ValueError: a usage error for train and prepare
        open_source(f"tar:{tmp_path}/*.tar")
