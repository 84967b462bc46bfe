"""The ImageNet loader's decoder and resize options: every choice gives the same images as Pillow within
``imagenet.PIXEL_TOLERANCE``, the options are validated, and bad files are skipped or named with every choice.
Also a smoke run of ``benchmarks/imagenet_loading.py``."""
from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import imagenet_loading
from saliency_lab.datamodules import BadImageError, BadImageWarning, ImageNetDataModule, ImageNetFolder
from saliency_lab.datamodules.common import load_rgb, load_rgb_uint8
from saliency_lab.datamodules.imagenet import PIXEL_TOLERANCE
from saliency_lab.datamodules.scene_export import export_imagenet

SIZE = 40  # output side; the exported JPEGs are 72 x 54, so the resizes do real work
CHOICES = [("pil", "tensor"), ("torchvision", "tensor"), ("torchvision", "pil")]


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_jpeg")
    splits = {split: imagenet_loading.ResizedScenes(split, 12, 72, 54) for split in ("train", "val")}
    return export_imagenet(root, splits, fmt="jpeg")


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    """A smooth random RGB image (a coarse noise field upsampled), W x H = size."""
    coarse = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("decoder,resize", CHOICES)
def test_every_choice_gives_pillows_images_within_the_tolerance(jpeg_root, split, decoder, resize):
    reference = ImageNetFolder(jpeg_root, split, SIZE, decoder="pil", resize="pil")
    other = ImageNetFolder(jpeg_root, split, SIZE, decoder=decoder, resize=resize)
    assert [p for p, _ in reference.samples] == [p for p, _ in other.samples]
    diffs = []
    for i in range(len(reference)):
        torch.manual_seed(i)  # the same crop and flip for both
        a = reference[i]
        torch.manual_seed(i)
        b = other[i]
        assert b["image"].shape == (3, SIZE, SIZE) and b["image"].dtype == torch.float32
        assert 0 <= b["image"].min() and b["image"].max() <= 1
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["mask"], b["mask"])
        assert torch.allclose(a["boxes"], b["boxes"])
        diffs.append((a["image"] - b["image"]).abs())
    diffs = torch.stack(diffs)
    assert diffs.max() <= PIXEL_TOLERANCE["max_abs"] and diffs.mean() <= PIXEL_TOLERANCE["mean_abs"]


def test_the_two_decoders_give_the_same_pixels(tmp_path):
    """Both are libjpeg-turbo: exactly the same for every JPEG torchvision takes; the rest goes through Pillow."""
    photo = _photo(1)
    files = {"baseline.JPEG": _jpeg(photo, quality=90), "progressive.JPEG": _jpeg(photo, progressive=True),
             "subsampling_444.JPEG": _jpeg(photo, subsampling=0), "gray.JPEG": _jpeg(photo.convert("L")),
             "cmyk.JPEG": _jpeg(photo.convert("CMYK"))}
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    files["png_named.JPEG"] = buffer.getvalue()  # ImageNet has such a file: not a JPEG, Pillow decodes it
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        pil, fast = load_rgb_uint8(tmp_path / name, "pil"), load_rgb_uint8(tmp_path / name, "torchvision")
        assert fast.shape == (3, 72, 96) and fast.dtype == torch.uint8, name
        assert torch.equal(pil, fast), name
        assert torch.equal(pil.permute(1, 2, 0), torch.from_numpy(np.array(load_rgb(tmp_path / name)))), name


@pytest.mark.parametrize("option,value", [("decoder", "turbo"), ("resize", "cv2"), ("decoder", "PIL")])
def test_unknown_choices_fail_at_construction_naming_the_choices(jpeg_root, option, value):
    allowed = "['pil', 'torchvision']" if option == "decoder" else "['tensor', 'pil']"
    message = re.escape(f"{option} must be one of {allowed}, got {value!r}")
    with pytest.raises(ValueError, match=message):
        ImageNetFolder(jpeg_root, "val", SIZE, **{option: value})
    with pytest.raises(ValueError, match=message):
        ImageNetDataModule(str(jpeg_root), SIZE, **{option: value})  # the module, not only its later setup


def test_datamodule_passes_the_choices_to_its_datasets(jpeg_root):
    data = ImageNetDataModule(str(jpeg_root), SIZE, batch_size=4, num_workers=0, decoder="torchvision", resize="pil")
    data.setup("fit")
    assert {(d.decoder, d.resize) for d in data.datasets.values()} == {("torchvision", "pil")}
    assert next(iter(data.train_dataloader()))["image"].shape == (4, 3, SIZE, SIZE)
    assert ImageNetDataModule(str(jpeg_root)).hparams.decoder == "torchvision"  # the defaults: module docstring
    assert ImageNetDataModule(str(jpeg_root)).hparams.resize == "tensor"


@pytest.fixture
def folder_with_bad_files(tmp_path):
    folder = tmp_path / "train" / "n1"
    folder.mkdir(parents=True)
    _photo(2).save(folder / "a_good.png")
    (folder / "b_good.JPEG").write_bytes(_jpeg(_photo(3)))
    jpeg = _jpeg(_photo(4))
    (folder / "c_truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "d_text.JPEG").write_text("this is not an image\n")
    return tmp_path


@pytest.mark.parametrize("decoder,resize", CHOICES)
def test_bad_files_are_skipped_or_named_with_every_choice(folder_with_bad_files, decoder, resize):
    root = folder_with_bad_files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageNetFolder(root, "train", SIZE, decoder=decoder, resize=resize)
    ours = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(ours) == 1 and "skipped 2 " in ours[0]
    assert "c_truncated.JPEG" in ours[0] and "d_text.JPEG" in ours[0]
    assert [data[i]["image"].shape for i in range(len(data))] == [(3, SIZE, SIZE)] * 2
    unchecked = ImageNetFolder(root, "train", SIZE, verify="off", decoder=decoder, resize=resize)
    for i, name in ((2, "c_truncated.JPEG"), (3, "d_text.JPEG")):  # Pillow's reason, whichever decoder
        with pytest.raises(BadImageError, match=re.escape(name) + r": cannot decode image \((OSError|Unidentified)"):
            unchecked[i]


def test_torchvision_decoder_refuses_decompression_bombs_before_decoding(tmp_path):
    data = bytearray(_jpeg(Image.new("RGB", (16, 16), (128, 128, 128))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (10000).to_bytes(2, "big") * 2  # the header claims 10000 x 10000
    (tmp_path / "bomb.JPEG").write_bytes(bytes(data))
    with pytest.raises(BadImageError, match=r"bomb\.JPEG: cannot decode image \(DecompressionBombError"):
        load_rgb_uint8(tmp_path / "bomb.JPEG", "torchvision")
    with pytest.raises(BadImageError, match="more than the limit of 100"):
        load_rgb_uint8(tmp_path / "bomb.JPEG", "torchvision", max_pixels=100)


def test_loading_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "loading.json"
    imagenet_loading.main(["--images", "4", "--width", "48", "--height", "36", "--image-size", "24",
                           "--workers", "0", "--repeats", "1", "--batch-size", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["images_per_second"]["val"]) == {"pil/pil", "pil/tensor", "torchvision/pil", "torchvision/tensor"}
    assert all(d["max_abs"] <= PIXEL_TOLERANCE["max_abs"] for name, d in result["pixels_vs_pil_pil"].items()
               if d["max_abs"] is not None)
    printed = capsys.readouterr().out
    assert "logical cores" in printed and "| train | pil/pil |" in printed
