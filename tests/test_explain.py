"""explain.py on a folder of mixed real files: modes, bad files, names, the resize rule, reruns, DDP."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from saliency_lab.cli import explain
from saliency_lab import explainers
from saliency_lab.callbacks.explanation_writer import read_index
from saliency_lab.datamodules.common import BadImageWarning, load_rgb
from saliency_lab.datamodules.image_files import ImageFiles, collect_images, output_stem, resize_to_input, safe_part
from saliency_lab.core.blackbox import BlackBox
from tests.conftest import subprocess_env

SIZE = 32
WEIRD = "we ird #1 (ü) ;$x.JPG"
GOOD = {"rgb.png", "photo.jpg", "grey.png", "rgba.png", "palette.gif", "deep16.png", "rotated.jpg",
        f"nested/deeper/{WEIRD}", "nested/inner.png"}
BAD = {"truncated.jpg", "not_an_image.png", "bomb.png"}


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A 60-byte PNG whose header claims side x side pixels (10^10): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)

    def pixels(h, w, c=3):
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(pixels(40, 56)).save(root / "rgb.png")
    Image.fromarray(pixels(75, 50)).save(root / "photo.jpg", quality=90)
    Image.fromarray(pixels(33, 47, 1)).save(root / "grey.png")
    Image.fromarray(pixels(30, 30, 4), "RGBA").save(root / "rgba.png")
    Image.fromarray(pixels(36, 28)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    Image.fromarray((rng.integers(0, 65536, (20, 24))).astype(np.uint16)).save(root / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees for display -> shown as 30 wide, 60 high
    Image.fromarray(pixels(30, 60)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(pixels(64, 48)).save(root / "nested" / "deeper" / WEIRD)
    Image.fromarray(pixels(16, 16)).save(root / "nested" / "inner.png")
    Image.fromarray(pixels(50, 50)).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "full.jpg").unlink()
    (root / "not_an_image.png").write_text("just text with an image suffix")
    _png_bomb(root / "bomb.png")
    (root / "notes.txt").write_text("not an image suffix: ignored")
    Image.fromarray(pixels(8, 8)).save(root / ".hidden.png")  # hidden: ignored
    return root


def _run(folder, out, blackbox, *extra):
    return explain.main(["--images", str(folder), "--out", str(out), "--blackbox", f"ckpt:{blackbox}",
                         f"--image_size={SIZE}", "--batch_size=4", "--progress=false", *extra])


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def test_explains_a_mixed_folder_and_names_the_bad_files_once(folder, tiny_blackbox_path, tmp_path):
    before = _tree(folder)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _run(folder, out, tiny_blackbox_path, "--method=gradient")
    bad_warnings = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(bad_warnings) == 1, [str(w.message) for w in bad_warnings]
    message = str(bad_warnings[0].message)
    for name in BAD:
        assert str(folder / name) in message
    assert "DecompressionBombError" in message and "3 unreadable" in message
    assert summary["explained"] == len(GOOD) and sorted(summary["skipped"]) == sorted(str(folder / b) for b in BAD)
    assert _tree(folder) == before, "something was written into the input folder"

    index = read_index(out)
    assert set(index) == GOOD
    written = _tree(out)
    expected = {rel for entry in index.values() for rel in entry["outputs"].values()}
    assert written == expected | {"index.jsonl", "run.json", "skipped.json", ".lock"}
    for rel, entry in index.items():
        original = np.array(load_rgb(folder / rel, orient=True))
        height, width = original.shape[:2]
        assert (entry["height"], entry["width"]) == (height, width)
        saved = np.load(out / entry["outputs"]["npy"])
        assert saved.dtype == np.float32 and saved.shape == (height, width)
        assert (saved.min(), saved.max()) == pytest.approx((entry["map_min"], entry["map_max"]))
        png = Image.open(out / entry["outputs"]["map"])
        assert png.mode == "I;16" and png.size == (width, height)
        levels = np.asarray(png).astype(np.float64) / 65535
        span = entry["map_max"] - entry["map_min"]
        np.testing.assert_allclose(entry["map_min"] + levels * span, saved, atol=span / 65535 + 1e-9)
        overlay = Image.open(out / entry["outputs"]["overlay"])
        assert overlay.mode == "RGB" and overlay.size == (width, height)
        assert 0 <= entry["class"] < 10 and 0 < entry["probability"] <= 1 and entry["class_name"] is None
        assert entry["method"] == "gradient" and entry["cost"]["forwards"] >= 1 and entry["cost"]["backwards"] >= 1
    assert index["rotated.jpg"]["width"] == 30 and index["rotated.jpg"]["height"] == 60  # EXIF orientation applied
    weird = index[f"nested/deeper/{WEIRD}"]["outputs"]["map"]
    assert weird.startswith("nested/deeper/") and " " not in weird and "#" not in weird and "$" not in weird


def test_maps_follow_the_resize_rule(folder, tiny_blackbox_path, tmp_path):
    """The map of a file = the explainer on the S x S resized image, resized back bilinearly to H x W."""
    out = tmp_path / "out"
    _run(folder, out, tiny_blackbox_path, "--method=gradient")
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    explainer = explainers.build("gradient", blackbox)
    for rel in ("photo.jpg", "grey.png", "deep16.png"):
        image = resize_to_input(load_rgb(folder / rel, orient=True), SIZE)[None]
        target = blackbox.logits(image).argmax(1)
        saliency = explainer(image, target)
        original = load_rgb(folder / rel)
        expected = F.interpolate(saliency, size=(original.height, original.width), mode="bilinear",
                                 align_corners=False)[0, 0]
        entry = read_index(out)[rel]
        assert entry["class"] == int(target)
        np.testing.assert_allclose(np.load(out / entry["outputs"]["npy"]), expected.numpy(), rtol=1e-4, atol=1e-7)


def test_image_modes_become_rgb_by_the_documented_rule(folder):
    files = collect_images([folder])
    data = ImageFiles(files, SIZE)
    by_name = {f.relative: data[i] for i, f in enumerate(files)}
    grey = by_name["grey.png"]["original"]
    assert grey.shape == (33, 47, 3) and torch.equal(grey[..., 0], grey[..., 1])  # replicated
    rgba = by_name["rgba.png"]["original"]
    stored = np.asarray(Image.open(folder / "rgba.png"))
    assert torch.equal(rgba, torch.from_numpy(stored[..., :3].copy()))  # alpha dropped, colours kept
    deep = by_name["deep16.png"]["original"]
    high_bits = (np.asarray(Image.open(folder / "deep16.png")).astype(np.uint16) >> 8).astype(np.uint8)
    assert torch.equal(deep[..., 0], torch.from_numpy(high_bits))
    for sample in by_name.values():
        if "image" in sample:
            assert sample["image"].shape == (3, SIZE, SIZE) and 0 <= sample["image"].min() <= sample["image"].max() <= 1
    assert {rel for rel, s in by_name.items() if "problem" in s} == BAD
    assert "notes.txt" not in by_name and ".hidden.png" not in by_name


def test_rerun_skips_done_files_and_explains_new_ones(folder, tiny_blackbox_path, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("rgb.png", "photo.jpg"):
        (images / name).write_bytes((folder / name).read_bytes())
    out = tmp_path / "out"
    _run(images, out, tiny_blackbox_path, "--method=rise", "--method_hparams={n_masks: 16}")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    (images / "later.png").write_bytes((folder / "nested" / "inner.png").read_bytes())
    summary = _run(images, out, tiny_blackbox_path, "--method=rise", "--method_hparams={n_masks: 16}")
    assert summary["explained"] == 3
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "done files were explained again"
    assert len((out / "index.jsonl").read_text().splitlines()) == 3
    # a stochastic map depends on the file, not on the batch it was explained in: batch 1 gives the same maps
    alone = tmp_path / "alone"
    _run(images, alone, tiny_blackbox_path, "--method=rise", "--method_hparams={n_masks: 16}", "--batch_size=1")
    for rel, entry in read_index(out).items():
        np.testing.assert_allclose(np.load(alone / entry["outputs"]["npy"]), np.load(out / entry["outputs"]["npy"]),
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="other settings"):
        _run(images, out, tiny_blackbox_path, "--method=gradient")


def test_nothing_is_written_outside_out(folder, tiny_blackbox_path, tmp_path):
    assert all(".." not in output_stem(rel).split("/") for rel in ("../x.png", "a/../../b.png", "..", "./.x"))
    assert safe_part("a b.jpg") != safe_part("a_b.jpg") and "/" not in safe_part("a\\b/c")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out).mkdir()
    elsewhere.mkdir()
    (out / "nested").symlink_to(elsewhere, target_is_directory=True)  # planted: would lead outside
    with pytest.warns(BadImageWarning, match="resolves outside"):
        summary = _run(folder, out, tiny_blackbox_path, "--method=gradient")
    assert not any(elsewhere.iterdir())
    assert summary["explained"] == len(GOOD) - 2  # the two files under nested/


@pytest.mark.parametrize("method", ["../x", "/abs/dir", ".hidden", "a b"])
def test_a_method_name_that_is_not_a_file_name_is_refused_first(folder, tiny_predictor_path, tmp_path, method):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--method .* cannot name a file"):
        explain.main(["--images", str(folder), "--out", str(out), f"--method={method}"])
    if "/" not in method:  # NAME=PATH with a separator in NAME reads as a path
        with pytest.raises(ValueError, match=r"--ckpt_path NAME .* cannot name a file"):
            explain.main(["--images", str(folder), "--out", str(out), "--ckpt_path", f"{method}={tiny_predictor_path}"])
    assert not out.exists()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_explainers_refuse_a_lightning_precision_they_cannot_honour(folder, tiny_blackbox_path, tmp_path, precision):
    """RISE's and IASSA's float32 masks meet bf16 scores under a Trainer autocast (a dtype error after the black box
    was built): refused first, pointing to the black box's own precision option; a predictor runs under it."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"--precision={precision} is not supported.*blackbox.init_args.precision"):
        explain.main(["--images", str(folder), "--out", str(out), "--method=rise", f"--precision={precision}",
                      f"--blackbox=ckpt:{tiny_blackbox_path}"])
    assert not out.exists()


def test_a_predictor_runs_under_bf16_mixed(folder, tiny_predictor_path, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        summary = explain.main(["--images", str(folder / "rgb.png"), "--out", str(tmp_path / "out"), "--ckpt_path",
                                str(tiny_predictor_path), "--image_size=32", "--progress=false",
                                "--precision=bf16-mixed"])
    assert summary["explained"] == 1


def test_predictor_checkpoint_and_clear_errors(folder, tiny_predictor_path, tiny_blackbox_path, tmp_path):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        summary = explain.main(["--images", str(folder / "rgb.png"), str(folder / "nested"), "--out", str(out),
                                "--ckpt_path", str(tiny_predictor_path), "--image_size=32", "--progress=false"])
    assert summary["explained"] == 3
    index = read_index(out)
    assert set(index) == {"rgb.png", "nested/inner.png", f"nested/deeper/{WEIRD}"}  # relative to the common root
    assert {e["method"] for e in index.values()} == {"predictor_ct"}
    assert all(e["cost"]["forwards"] == 1 and e["cost"]["backwards"] == 0 for e in index.values())
    with pytest.raises(ValueError, match="exactly one of --method"):
        explain.main(["--images", str(folder), "--out", str(tmp_path / "x"), "--method=gradient",
                      "--ckpt_path", str(tiny_predictor_path)])
    with pytest.raises(ValueError, match="--method_hparams configures --method"):
        explain.main(["--images", str(folder), "--out", str(tmp_path / "w"), "--ckpt_path", str(tiny_predictor_path),
                      "--method_hparams={n_masks: 16}"])
    with pytest.raises(ValueError, match="pass --image_size"):  # a bare record does not say its input size
        explain.main(["--images", str(folder), "--out", str(tmp_path / "y"), "--method=gradient",
                      "--blackbox", f"ckpt:{tiny_blackbox_path}"])
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        explain.main(["--images", str(folder / "missing"), "--out", str(tmp_path / "z"), "--method=gradient"])


@pytest.mark.slow
def test_two_processes_write_what_one_does(folder, tiny_blackbox_path, tmp_path, repo_root):
    args = ["--method=rise", "--method_hparams={n_masks: 16}", "--batch_size=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        _run(folder, one, tiny_blackbox_path, *args)
    cmd = [sys.executable, "explain.py", "--images", str(folder), "--out", str(two), *args,
           f"--blackbox=ckpt:{tiny_blackbox_path}", f"--image_size={SIZE}", "--devices=2", "--strategy=ddp",
           "--progress=false"]
    result = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("BadImageWarning") == 1, result.stderr[-3000:]  # one warning for both processes
    first, second = read_index(one), read_index(two)
    assert set(first) == set(second) == GOOD
    assert len((two / "index.jsonl").read_text().splitlines()) == len(GOOD)
    assert json.loads((two / "skipped.json").read_text()) == json.loads((one / "skipped.json").read_text())
    for rel, entry in first.items():
        assert second[rel]["class"] == entry["class"]
        np.testing.assert_allclose(np.load(two / entry["outputs"]["npy"]), np.load(one / entry["outputs"]["npy"]),
                                   rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Hostile folders, stops, run records, locks, large and 32-bit images


def _small_pngs(folder: Path, count: int, side: int = 20) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = [folder / f"img{i:03d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return paths


def test_fifo_socket_and_device_files_are_skipped_and_named_never_opened(tiny_blackbox_path, tmp_path, repo_root):
    import os
    import socket

    from saliency_lab.datamodules.image_files import find_images

    images = tmp_path / "in"
    _small_pngs(images, 1)
    os.mkfifo(images / "a.png")  # opening it would block forever: no writer ever comes
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(images / "b.png"))
    (images / "c.png").symlink_to("/dev/null")
    try:
        files, skipped = find_images([images], follow_symlinks=True)
        assert [f.relative for f in files] == ["img000.png"]
        problems = dict(skipped)
        assert "named pipe (FIFO)" in problems[str(images / "a.png")]
        assert "socket" in problems[str(images / "b.png")]
        assert "device file" in problems[str(images / "c.png")]
        out = tmp_path / "out"
        cmd = [sys.executable, "explain.py", "--images", str(images), "--out", str(out), "--method=gradient",
               f"--blackbox=ckpt:{tiny_blackbox_path}", f"--image_size={SIZE}", "--progress=false"]
        result = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BadImageWarning" in result.stderr and "named pipe (FIFO)" in result.stderr
    named = {entry["path"]: entry["problem"] for entry in json.loads((out / "skipped.json").read_text())}
    assert "named pipe (FIFO)" in named[str(images / "a.png")] and "socket" in named[str(images / "b.png")]
    assert set(read_index(out)) == {"img000.png"}


def test_a_symlink_out_of_the_inputs_is_skipped_unless_followed(tiny_blackbox_path, tmp_path):
    images, outside = tmp_path / "in", tmp_path / "elsewhere"
    _small_pngs(images, 1)
    secret = _small_pngs(outside, 1)[0]
    (images / "link_out.png").symlink_to(secret)
    (images / "link_in.png").symlink_to(images / "img000.png")  # stays inside the inputs: followed
    with pytest.warns(BadImageWarning, match="outside the input folders"):
        summary = _run(images, tmp_path / "out", tiny_blackbox_path, "--method=gradient")
    assert set(read_index(tmp_path / "out")) == {"img000.png", "link_in.png"}
    assert summary["skipped"] == [str(images / "link_out.png")]
    named = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert "--follow_symlinks true" in named[0]["problem"] and str(secret.resolve()) in named[0]["problem"]
    followed = _run(images, tmp_path / "followed", tiny_blackbox_path, "--method=gradient", "--follow_symlinks=true")
    assert followed["explained"] == 3 and followed["skipped"] == []
    assert "--follow_symlinks" in explain.build_parser().format_help()


def test_output_folders_under_the_inputs_are_never_explained(tiny_blackbox_path, tmp_path):
    images = tmp_path / "in"
    _small_pngs(images, 2)
    first = _run(images, images / "maps", tiny_blackbox_path, "--method=gradient")
    assert first["explained"] == 2
    assert json.loads((images / "maps" / "run.json").read_text())["saliency_lab_output"] == "explain"
    with pytest.warns(BadImageWarning, match="output folder"):
        second = _run(images, images / "maps2", tiny_blackbox_path, "--method=gradient")
    assert set(read_index(images / "maps2")) == {"img000.png", "img001.png"}  # not maps/img000.map.png, ...
    assert second["files"] == 2 and second["skipped"] == [str(images / "maps")]
    again = _run(images, images / "maps", tiny_blackbox_path, "--method=gradient")  # maps2 is skipped too
    assert again["files"] == 2 and again["explained"] == 2
    from saliency_lab.datamodules.image_files import find_images

    with pytest.raises(FileNotFoundError, match=r"maps \(a saliency-lab output folder"):
        find_images([images / "maps"])  # an output folder named as the input is not explained either


def test_sigterm_stops_after_the_current_batch_and_a_rerun_resumes(tiny_blackbox_path, tmp_path, repo_root):
    import os
    import signal
    import time

    images, out = tmp_path / "in", tmp_path / "out"
    _small_pngs(images, 10)
    args = ["--method=rise", "--method_hparams={n_masks: 300}", "--batch_size=1"]
    cmd = [sys.executable, "explain.py", "--images", str(images), "--out", str(out), *args,
           f"--blackbox=ckpt:{tiny_blackbox_path}", f"--image_size={SIZE}", "--progress=false"]
    process = subprocess.Popen(cmd, cwd=repo_root, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "index.jsonl").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be stopped: " + process.stderr.read()[-2000:]
        sent = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert stopped_after < 10, stopped_after
    assert "the same command resumes" in stderr
    lines = (out / "index.jsonl").read_text().splitlines()
    assert 1 <= len(lines) < 10 and len(read_index(out)) == len(lines)  # every line complete, outputs there
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    summary = _run(images, out, tiny_blackbox_path, *args)
    assert summary["explained"] == 10 and len((out / "index.jsonl").read_text().splitlines()) == 10
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "files explained before the stop were redone"


def test_run_record_refuses_other_settings_and_resumes_with_the_same(tiny_blackbox_path, tiny_predictor_path,
                                                                      tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    _small_pngs(images, 2)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {k}" for k in range(10)))
    _run(images, out, tiny_blackbox_path, "--method=gradient", f"--class_names={names}")
    record = json.loads((out / "run.json").read_text())
    assert record["blackbox_sha256"] == BlackBox(f"ckpt:{tiny_blackbox_path}").content_hash()
    assert record["precision"] == "32-true" and record["target"] == "predicted" and record["image_size"] == SIZE
    assert record["map_size"]["max_map_side"] == 4096 and record["class_names_sha256"]
    with pytest.raises(ValueError, match=r"other settings \(blackbox_options.precision: 'auto' -> 'bf16'\)"):
        _run(images, out, tiny_blackbox_path, "--method=gradient", f"--class_names={names}",
             "--blackbox.init_args.precision=bf16")
    names.write_text("\n".join(f"kind {k}" for k in range(10)))
    with pytest.raises(ValueError, match=r"other settings \(class_names_sha256: "):
        _run(images, out, tiny_blackbox_path, "--method=gradient", f"--class_names={names}")
    with pytest.raises(ValueError, match=r"max_map_side: 4096 -> 100"):
        _run(images, out, tiny_blackbox_path, "--method=gradient", "--max_map_side=100")
    names.write_text("\n".join(f"class {k}" for k in range(10)))
    summary = _run(images, out, tiny_blackbox_path, "--method=gradient", f"--class_names={names}")
    assert summary["explained"] == 2 and len((out / "index.jsonl").read_text().splitlines()) == 2
    # a predictor checkpoint is recorded by content: a copy elsewhere resumes, other weights are refused
    predicted = tmp_path / "predicted"
    explain.main(["--images", str(images), "--out", str(predicted), "--ckpt_path", str(tiny_predictor_path),
                  f"--image_size={SIZE}", "--progress=false"])
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(tiny_predictor_path.read_bytes())
    resumed = explain.main(["--images", str(images), "--out", str(predicted), "--ckpt_path", str(copy),
                            f"--image_size={SIZE}", "--progress=false"])
    assert resumed["explained"] == 2
    with pytest.raises(ValueError, match=r"other settings \(precision: '32-true' -> 'bf16-mixed'\)"):
        explain.main(["--images", str(images), "--out", str(predicted), "--ckpt_path", str(copy),
                      f"--image_size={SIZE}", "--progress=false", "--precision=bf16-mixed"])
    checkpoint = torch.load(copy, weights_only=False)
    first = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][first] = checkpoint["state_dict"][first] + 1
    torch.save(checkpoint, copy)
    with pytest.raises(ValueError, match="ckpt_sha256"):
        explain.main(["--images", str(images), "--out", str(predicted), "--ckpt_path", str(copy),
                      f"--image_size={SIZE}", "--progress=false"])


def test_a_folder_locked_by_another_run_is_refused(tiny_blackbox_path, tmp_path):
    from saliency_lab.core.files import FolderBusyError, FolderLock

    images, out = tmp_path / "in", tmp_path / "out"
    _small_pngs(images, 1)
    with FolderLock(out, "test holder"):
        with pytest.raises(FolderBusyError, match=rf"{out} is in use by another explain run \(pid"):
            _run(images, out, tiny_blackbox_path, "--method=gradient")
        assert not (out / "run.json").exists() and not (out / "index.jsonl").exists()
    assert _run(images, out, tiny_blackbox_path, "--method=gradient")["explained"] == 1  # released: runs


def test_maps_of_large_images_are_saved_at_a_bounded_size(tiny_blackbox_path, tmp_path):
    from saliency_lab.datamodules.image_files import load_image, map_size

    assert map_size(6000, 200) == (4096, 137) and map_size(300, 200) == (300, 200)
    assert map_size(10, 5000, max_side=100) == (1, 100)
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    Image.new("RGB", (6000, 200), (200, 30, 90)).save(images / "wide.png")
    _run(images, out, tiny_blackbox_path, "--method=gradient")
    entry = read_index(out)["wide.png"]
    assert (entry["width"], entry["height"]) == (6000, 200)
    assert (entry["map_width"], entry["map_height"]) == (4096, 137)
    assert np.load(out / entry["outputs"]["npy"]).shape == (137, 4096)
    for kind in ("map", "overlay"):
        assert max(Image.open(out / entry["outputs"][kind]).size) <= 4096
    # a large JPEG is decoded at a reduced scale, never below its saved map size
    Image.new("RGB", (10000, 120), (10, 200, 30)).save(tmp_path / "long.jpg")
    image, size = load_image(tmp_path / "long.jpg")
    assert size == (10000, 120) and image.size == (5000, 60)


@pytest.mark.parametrize("mode", ["F", "I"])
def test_32_bit_images_are_scaled_by_their_range(tmp_path, mode):
    from saliency_lab.datamodules.image_files import ImageFile

    values = np.linspace(-5.0, 20.0, 12 * 16).reshape(12, 16)
    array = values.astype(np.float32) if mode == "F" else (values * 1e6).astype(np.int32)
    path = tmp_path / f"deep_{mode}.tif"
    Image.fromarray(array, mode).save(path)
    assert Image.open(path).mode == mode
    sample = ImageFiles([ImageFile(str(path), path.name)], SIZE)[0]
    assert "problem" not in sample, sample
    grey = sample["original"][..., 0].numpy().astype(np.float64)
    assert torch.equal(sample["original"][..., 0], sample["original"][..., 2])
    assert grey.min() == 0 and grey.max() == 255  # min -> 0, max -> 255 (not clipped at 255)
    expected = np.round((array - array.min()) / (float(array.max()) - float(array.min())) * 255)
    np.testing.assert_array_equal(grey, expected)


def test_a_float_image_with_nan_is_a_bad_file_named_with_the_reason(tmp_path):
    from saliency_lab.datamodules.image_files import ImageFile

    array = np.ones((8, 8), np.float32)
    array[3, 3] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(array, "F").save(path)
    sample = ImageFiles([ImageFile(str(path), path.name)], SIZE)[0]
    assert "non-finite pixel values" in sample["problem"] and str(path) in sample["problem"]
