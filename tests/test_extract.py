"""`unidiffuser extract` and the raw-data readers, on tiny pictures and the tiny random pipeline.

The data: an image folder and webdataset tar shards, each with deliberately bad items (a text
file named .jpg, an empty caption, a picture without caption, a caption without picture, a
truncated shard, a shard that is no tar at all) whose skip counts are asserted exactly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from unidiffuser.cli import COMMAND_MODULES
from unidiffuser.components.images import load_image, resize_and_crop, to_tensor
from unidiffuser.extract import ExtractConfig, extract
from unidiffuser.extract import main as extract_main
from unidiffuser.pipeline import UniDiffuser
from unidiffuser.tiny import TINY_IMAGE_SIZE, tiny_network_config, tiny_pipeline
from unidiffuser.training import FeatureShards, TrainConfig, train
from unidiffuser.training.data import read_shard_metadata
from unidiffuser.training.sources import Examples, expand_braces, open_data

RES = TINY_IMAGE_SIZE  # 64 pixels: the tiny network's 8x8 latents


def picture(seed: int, size: tuple[int, int] = (80, 64), mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# Fixtures: a model directory, an image folder, tar shards


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir) -> UniDiffuser:
    return UniDiffuser.from_pretrained(model_dir)


FOLDER_GOOD = ["a/1.jpg", "a/2.png", "b/c/3.webp", "b/8.JPG", "b/9.bmp"]
FOLDER_SKIPS = {"unreadable_image": 1, "empty_caption": 1, "no_caption": 1, "no_image": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    formats = {"jpg": "JPEG", "JPG": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}
    for i, rel in enumerate(FOLDER_GOOD):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "L" if rel.endswith("png") else "RGB"  # greyscale is converted like the pipeline does
        path.write_bytes(encoded(picture(i, mode=mode), formats[rel.rsplit(".", 1)[1]]))
        path.with_suffix(".txt").write_text(f"  caption of {rel}\n")
    (root / "a/4.jpg").write_text("this is text, not a picture")  # unreadable_image
    (root / "a/4.txt").write_text("a caption")
    (root / "a/5.png").write_bytes(encoded(picture(5), "PNG"))  # empty_caption
    (root / "a/5.txt").write_text(" \n\t")
    (root / "b/6.jpg").write_bytes(encoded(picture(6), "JPEG"))  # no_caption
    (root / "b/7.txt").write_text("a caption without picture")  # no_image
    (root / ".hidden").mkdir()
    (root / ".hidden/x.jpg").write_bytes(encoded(picture(7), "JPEG"))  # ignored: hidden
    (root / "notes.md").write_text("ignored: neither a picture nor a caption")
    return root


def tar_members(shard: int, n: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        members.append((f"{key}.jpg", encoded(picture(100 * shard + i), "JPEG")))
        if i % 2:
            members.append((f"{key}.txt", f"shard {shard} item {i}".encode()))
        else:  # the caption only in the .json img2dataset writes
            members.append(
                (f"{key}.json", json.dumps({"caption": f"shard {shard} item {i}", "url": "x"}).encode())
            )
    return members


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tars")
    write_tar(root / "00000.tar", tar_members(0, 5))  # 5 good
    bad = [  # 3 good, then one of each problem
        *tar_members(1, 3),
        ("000010100.jpg", b"not a jpeg"), ("000010100.txt", b"unreadable image"),
        ("000010101.png", encoded(picture(9), "PNG")), ("000010101.txt", b"   "),
        ("000010102.webp", encoded(picture(10), "WEBP")), ("000010102.json", b'{"url": "no caption"}'),
        ("000010103.txt", b"a caption without picture"),
        ("000010104.jpg", encoded(picture(11), "JPEG")), ("000010104.json", b"{not json"),
    ]  # fmt: skip
    write_tar(root / "00001.tar", bad)
    write_tar(root / "00002.tar", tar_members(2, 4))
    data = (root / "00002.tar").read_bytes()
    # cut inside the third example's picture: the first two are kept, the shard counts as corrupt
    cut = data.index(b"000020002.jpg") + 512 + 100
    (root / "00002.tar").write_bytes(data[:cut])
    (root / "00003.tar").write_bytes(b"\x00garbage" * 100)  # no tar at all
    write_tar(root / "00004.tar", tar_members(4, 2))
    return root


TAR_GOOD = 5 + 3 + 2 + 2
TAR_SKIPS = {
    "unreadable_image": 1, "empty_caption": 1, "no_caption": 1, "no_image": 1, "bad_caption": 1,
    "corrupt_shard": 2,
}  # fmt: skip


def read_shards(out: Path) -> dict[str, dict]:
    """Every shard under out: name -> {"meta", tensors...}."""
    shards = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            shards[path.name] = {k: f.get_tensor(k) for k in f.keys()}
        shards[path.name]["meta"] = read_shard_metadata(path)
    return shards


def config(model_dir: Path, data, out: Path, **kw) -> ExtractConfig:
    base = dict(model=str(model_dir), data=str(data), out=str(out), resolution=RES, batch_size=2, workers=0)
    return ExtractConfig(**{**base, **kw})


class CountingEncoder:
    """Wraps a component: counts the items it encodes, and can fail after some calls."""

    def __init__(self, module, fail_after: int | None = None):
        self.module, self.items, self.calls, self.fail_after = module, 0, 0, fail_after

    def __call__(self, texts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.items += len(texts)
        return self.module(texts)


# ---------------------------------------------------------------------------------------------
# Naming the data


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("data/{00000..00003}.tar", [f"data/0000{i}.tar" for i in range(4)]),
        ("{8..11}", ["8", "9", "10", "11"]),
        ("{008..010}", ["008", "009", "010"]),
        ("{3..1}", ["3", "2", "1"]),
        ("{0..10..5}", ["0", "5", "10"]),
        ("{a,b}{1..2}", ["a1", "a2", "b1", "b2"]),
        ("x{a,{b,c}d}y", ["xay", "xbdy", "xcdy"]),
        ("{a,}z", ["az", "z"]),
        ("plain.tar", ["plain.tar"]),
        ("{abc}.tar", ["{abc}.tar"]),
    ],
)
def test_brace_expansion(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize(
    "pattern, message", [("a{1..3", "never closed"), ("a}b", "closes no"), ("{1..5..0}", "step of 0")]
)
def test_brace_expansion_errors(pattern, message):
    with pytest.raises(ValueError, match=message):
        expand_braces(pattern)


def test_open_data_names(tars, folder, tmp_path):
    in_folder = open_data(str(tars))  # a folder of tars
    assert [p.name for p in in_folder.paths] == [f"0000{i}.tar" for i in range(5)]
    assert len(open_data(f"{tars}/0000[0-1].tar").paths) == 2
    listed = open_data(f"{tars}/{{00000..00006}}.tar")  # two listed shards do not exist
    assert listed.missing == [f"{tars}/00005.tar", f"{tars}/00006.tar"]
    examples = Examples(listed)
    assert len(list(examples)) == TAR_GOOD and examples.skipped["missing_shard"] == 2
    assert type(open_data(folder)).__name__ == "ImageCaptionFolder"
    with pytest.raises(ValueError, match="no such file or directory"):
        open_data(str(tmp_path / "nothing{0..1}.tar"))
    with pytest.raises(ValueError, match="matches no file"):
        open_data(str(tmp_path / "*.tar"))
    with pytest.raises(ValueError, match=r"not a \.tar shard"):
        open_data(str(folder / "a/1.txt"))
    with pytest.raises(ValueError, match="not a mix"):
        open_data([str(folder), str(tars / "00000.tar")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no pictures"):
        open_data(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# Reading


def test_image_folder_reads_pairs_in_order_and_counts_the_bad(folder, caplog):
    examples = Examples(str(folder))
    with caplog.at_level(logging.INFO, logger="unidiffuser.training.sources"):
        got = list(examples)
    assert [e.key for e in got] == sorted(FOLDER_GOOD)
    assert dict(examples.skipped) == FOLDER_SKIPS
    assert all(e.image.mode == "RGB" and e.image.size == (80, 64) for e in got)
    assert got[0].caption == "caption of a/1.jpg"  # stripped
    assert "skipped 4" in caplog.text and "1 unreadable_image" in caplog.text
    assert [e.key for e in Examples(str(folder))] == [e.key for e in got]  # deterministic


def test_tar_shards_read_pairs_in_order_and_count_the_bad(tars):
    examples = Examples(f"{tars}/{{00000..00004}}.tar")
    got = list(examples)
    assert dict(examples.skipped) == TAR_SKIPS
    assert len(got) == TAR_GOOD
    assert got[0].key == "00000.tar/000000000" and got[0].caption == "shard 0 item 0"  # from .json
    assert got[1].caption == "shard 0 item 1"  # from .txt
    kept = [e.key for e in got if e.key.startswith("00002.tar")]
    assert kept == ["00002.tar/000020000", "00002.tar/000020001"]  # read before the damage
    decoded = load_image(Image.open(io.BytesIO(encoded(picture(0), "JPEG"))))
    np.testing.assert_array_equal(np.asarray(got[0].image), np.asarray(decoded))


def test_processes_take_whole_parts_round_robin(tars, folder):
    for data, part_size in ((str(tars), 1000), (str(folder), 3)):
        every = [e.key for e in Examples(data, part_size=part_size)]
        shares = [[e.key for e in Examples(data, rank=r, world_size=2, part_size=part_size)] for r in (0, 1)]
        assert sorted(shares[0] + shares[1]) == sorted(every) and not set(shares[0]) & set(shares[1])
    tar_shares = [{e.key.split("/")[0] for e in Examples(str(tars), rank=r, world_size=2)} for r in (0, 1)]
    assert tar_shares == [{"00000.tar", "00002.tar", "00004.tar"}, {"00001.tar"}]  # 00003 yields nothing


# ---------------------------------------------------------------------------------------------
# Extracting


def test_extract_folder_matches_the_encoders_and_trains(model_dir, pipe, folder, tmp_path):
    out = tmp_path / "features"
    cfg = config(model_dir, folder, out, shard_size=3, workers=2)  # pictures decoded on 2 threads
    result = extract(cfg, pipeline=pipe, progress=False)
    assert result.examples == len(FOLDER_GOOD) and dict(result.skipped) == FOLDER_SKIPS
    shards = read_shards(out)
    # 9 entries in parts of 3: a/1 a/2 a/4 | a/5 b/6 b/7 | b/8 b/9 b/c/3
    assert list(shards) == ["part000000-0000.safetensors", "part000002-0000.safetensors"]
    assert not list(out.glob("part000001*"))  # every item of part 1 was bad: no shard
    first = shards["part000000-0000.safetensors"]
    meta = first["meta"]
    assert meta["keys"] == ["a/1.jpg", "a/2.png"]
    assert meta["captions"] == ["caption of a/1.jpg", "caption of a/2.png"]
    assert meta["moments"] == {"img": pytest.approx(0.18215)} and meta["constants"] == {"data_type": 1}
    assert first["img"].shape == (2, 8, RES // 8, RES // 8) and first["img"].dtype == torch.float16
    assert first["clip_img"].shape == (2, 16) and first["text"].shape == (2, 77, 8)

    # the stored features are the encoders' outputs on the pipeline's crop (moments, not samples)
    crop = resize_and_crop(load_image(folder / "a/1.jpg"), (RES, RES))
    with torch.no_grad():
        moments = pipe.autoencoder.moments(to_tensor([crop], (RES, RES)))
        clip = pipe.image_encoder([crop])
        text = pipe.caption_decoder.encode(pipe.text_encoder(["caption of a/1.jpg"]))
    torch.testing.assert_close(first["img"][:1].float(), moments, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(first["clip_img"][:1].float(), clip, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(first["text"][:1].float(), text, rtol=2e-3, atol=2e-3)

    model = tiny_network_config()
    source = FeatureShards(out, model)
    assert (
        source.size == len(FOLDER_GOOD)
        and source.bad_shards == []
        and source.moments == {"img": pytest.approx(0.18215)}
    )
    run = train(
        TrainConfig(model=model.to_dict(), data=str(out), output_dir=str(tmp_path / "run"), steps=2,
                    batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    )  # fmt: skip
    assert run.step == 2 and (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()


def test_extract_resumes_after_a_crash_and_skips_finished_work(model_dir, pipe, tars, tmp_path):
    data = f"{tars}/{{00000..00004}}.tar"
    reference = tmp_path / "reference"
    extract(config(model_dir, data, reference, shard_size=2, workers=2), pipeline=pipe, progress=False)
    expected = read_shards(reference)
    assert sum(s["meta"]["count"] for s in expected.values()) == TAR_GOOD
    # 00000.tar: 5 examples -> 3 shards of at most 2; 00001.tar: 3 -> 2; 00002.tar: 2 -> 1; 00004.tar: 2 -> 1
    assert len(expected) == 7 and "part000000-0002.safetensors" in expected

    # crash during the 4th encoder call: after 00000.tar and the first shard of 00001.tar
    text_encoder = pipe.text_encoder
    out = tmp_path / "features"
    try:
        pipe.text_encoder = CountingEncoder(text_encoder, fail_after=4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract(config(model_dir, data, out, shard_size=2), pipeline=pipe, progress=False)
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(expected)[:4]
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing partial left
        manifest = json.loads((out / "manifest.rank0.json").read_text())
        assert manifest["parts"]["0"]["done"] and not manifest["parts"]["1"]["done"]
        assert manifest["parts"]["1"]["through"] == 2

        pipe.text_encoder = counting = CountingEncoder(text_encoder)
        mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
        result = extract(config(model_dir, data, out, shard_size=2), pipeline=pipe, progress=False)
        assert counting.items == TAR_GOOD - 5 - 2  # only what was not written before
        assert result.parts_done_before == 1 and result.examples == TAR_GOOD - 7
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors") if p.name in mtimes} == mtimes
        # the skip counts of the interrupted part were carried over
        manifest = json.loads((out / "manifest.rank0.json").read_text())
        skipped = sum((Counter(e["skipped"]) for e in manifest["parts"].values()), Counter())
        assert dict(skipped) == TAR_SKIPS

        counting.items = 0
        again = extract(config(model_dir, data, out, shard_size=2), pipeline=pipe, progress=False)
        assert counting.items == 0 and again.parts_done_before == again.parts == 5 and not again.shards
    finally:
        pipe.text_encoder = text_encoder
    got = read_shards(out)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name]["meta"] == expected[name]["meta"]
        for k in ("img", "clip_img", "text"):
            torch.testing.assert_close(got[name][k], expected[name][k], rtol=0, atol=0)

    with pytest.raises(ValueError, match=r"other settings.*resolution 64 now 128"):
        extract(config(model_dir, data, out, shard_size=2, resolution=128), pipeline=pipe, progress=False)


def test_another_number_of_processes_resumes_the_rest(model_dir, pipe, tars, tmp_path):
    out = tmp_path / "features"
    first = extract(config(model_dir, tars, out), pipeline=pipe, rank=1, world_size=2, progress=False)
    assert first.parts == 2 and {p.name for p in first.shards} == {"part000001-0000.safetensors"}
    rest = extract(config(model_dir, tars, out), pipeline=pipe, rank=0, world_size=1, progress=False)
    assert rest.parts_done_before == 2 and rest.examples == TAR_GOOD - 3  # parts 1 and 3 were done
    assert len(FeatureShards(out, tiny_network_config())) == TAR_GOOD


def test_full_text_features_and_non_finite_rows(model_dir, pipe, folder, tmp_path):
    image_encoder = pipe.image_encoder

    def poisoned(images):  # the second picture of every batch gets a NaN embedding
        out = image_encoder(images).clone()
        out[1:2] = float("nan")
        return out

    pipe.image_encoder = poisoned
    try:
        cfg = config(
            model_dir, folder, tmp_path / "full", text_features="full", save_dtype="fp32", batch_size=8
        )
        result = extract(cfg, pipeline=pipe, progress=False)
    finally:
        pipe.image_encoder = image_encoder
    assert result.skipped["non_finite"] == 1 and result.examples == len(FOLDER_GOOD) - 1
    (shard,) = read_shards(tmp_path / "full").values()
    assert shard["text"].shape == (4, 77, 16) and shard["text"].dtype == torch.float32
    assert shard["meta"]["text_features"] == "full" and "a/2.png" not in shard["meta"]["keys"]


# ---------------------------------------------------------------------------------------------
# Command line


def test_command_line_extracts_and_the_shards_train(model_dir, folder, tmp_path, capsys):
    assert "unidiffuser.extract" in COMMAND_MODULES  # `unidiffuser extract`
    out = tmp_path / "features"
    args = ["--model", str(model_dir), "--data", str(folder), "--out", str(out), "--resolution", str(RES),
            "--batch-size", "3", "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert extract_main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["examples"] == len(FOLDER_GOOD) and summary["skipped"] == FOLDER_SKIPS
    assert "skipped 4" in captured.err
    assert extract_main(args) == 0 and "nothing to do" in capsys.readouterr().err
    run = train(
        TrainConfig(model=tiny_network_config().to_dict(), data=str(out), output_dir=str(tmp_path / "run"),
                    steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1)
    )  # fmt: skip
    assert run.step == 1 and run.skipped["shards"] == 0


def test_command_line_errors(model_dir, folder, tmp_path, capsys):
    base = ["--model", str(model_dir), "--out", str(tmp_path / "o")]
    assert extract_main([*base, "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "unidiffuser extract: error: data = " in err and "no such file or directory" in err
    missing_model = [
        "--model",
        str(tmp_path / "nomodel"),
        "--data",
        str(folder),
        "--out",
        str(tmp_path / "o"),
    ]
    assert extract_main(missing_model) == 2
    assert "no such directory" in capsys.readouterr().err
    for flag, value, message in (
        ("--resolution", "100", "100 is not a positive multiple of 16"),
        ("--batch-size", "0", "expected an integer >= 1"),
        ("--text-features", "half", "invalid choice"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            extract_main([*base, "--data", str(folder), flag, value])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match="resolution=40: expected a positive multiple of 16"):
        ExtractConfig(model="m", data="d", out="o", resolution=40)
    assert not (tmp_path / "o").exists()  # nothing written on an error
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a picture")
    (junk / "a.txt").write_text("a caption")
    assert extract_main([*base, "--data", str(junk), "--resolution", "32"]) == 1
    err = capsys.readouterr().err
    assert "unidiffuser extract: error: every item was skipped (" in err and "unreadable_image" in err


def test_two_processes_under_torchrun(model_dir, tars, tmp_path):
    out = tmp_path / "features"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unidiffuser.extract", "--model", str(model_dir), "--data", f"{tars}/*.tar",
           "--out", str(out), "--resolution", str(RES), "--workers", "0"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    manifests = sorted(p.name for p in out.glob("manifest.rank*.json"))
    assert manifests == ["manifest.rank0.json", "manifest.rank1.json"]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted((s["rank"], s["world_size"], s["parts"]) for s in summaries) == [(0, 2, 3), (1, 2, 2)]
    assert sum(s["examples"] for s in summaries) == TAR_GOOD
    assert len(FeatureShards(out, tiny_network_config())) == TAR_GOOD
