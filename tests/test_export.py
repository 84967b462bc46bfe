"""export.py: the predictor as one TorchScript / ONNX file, parity with eager PyTorch, onnxruntime."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from saliency_lab import explainers
from saliency_lab.cli import export
from saliency_lab.datamodules import ClutteredFashionMNIST, collate_samples
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.lightning_modules.exported_predictor import (ONNX_OPSET, load_graph, load_torchscript, onnx_description,
                                                  onnx_session, run_exported)

SIZE = 32
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def images():
    ds = ClutteredFashionMNIST("test", SIZE, num_scenes=8)
    return collate_samples([ds[i] for i in range(8)])["image"]


@pytest.fixture(scope="module")
def eager(tiny_predictor_path, tiny_blackbox_path):
    """The project's eager path: the checkpoint loaded as an explainer (what evaluate.py runs)."""
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    explainer = explainers.build(explainers.recorded_name(tiny_predictor_path), blackbox, checkpoint=tiny_predictor_path)
    return blackbox, explainer


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_file_matches_eager_pytorch(fmt, tiny_predictor_path, eager, images, tmp_path, capsys):
    out = tmp_path / f"predictor.{fmt}"
    written = export.main(["--ckpt_path", str(tiny_predictor_path), "--format", fmt, "--out", str(out),
                           f"--image_size={SIZE}"])
    assert written["max_abs_difference"] <= TOLERANCE and "parity" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name], "the export is not one self-contained file"
    blackbox, explainer = eager
    with torch.no_grad():
        predicted = blackbox.logits(images).argmax(1)
    expected = explainer(images, predicted)
    masks = run_exported(out, fmt, (images,))
    assert masks.shape == (8, 1, SIZE, SIZE) and masks.dtype == torch.float32
    assert (masks - expected).abs().max().item() <= TOLERANCE
    assert expected.std() > 1e-3, "a constant mask would make the parity check vacuous"
    # dynamic batch: one image alone gives its own row of the batch
    torch.testing.assert_close(run_exported(out, fmt, (images[3:4],)), masks[3:4], atol=TOLERANCE, rtol=0)
    description = load_torchscript(out)[1] if fmt == "torchscript" else onnx_description(out)
    assert description["explainer"] == "predictor_ct" and description["image_size"] == SIZE
    assert description["class_input"] is False and description["num_classes"] == 10


def test_onnx_file_runs_in_onnxruntime_at_the_stated_opset(tiny_predictor_path, eager, images, tmp_path):
    out = tmp_path / "predictor_classes.onnx"
    export.main(["--ckpt_path", str(tiny_predictor_path), "--format=onnx", "--out", str(out), f"--image_size={SIZE}",
                 "--class_input"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == ONNX_OPSET
    names = [i.name for i in model.graph.input]
    assert names == ["images", "classes"] and [o.name for o in model.graph.output] == ["masks"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), "the batch axis is not dynamic"
    assert json.loads({p.key: p.value for p in model.metadata_props}["saliency_lab"])["opset"] == ONNX_OPSET

    session = onnx_session(out, threads=1)
    classes = torch.arange(8) % 10  # any classes, not only the predicted ones
    masks = session.run(["masks"], {"images": images.numpy(), "classes": classes.numpy()})[0]
    _, explainer = eager
    expected = explainer(images, classes)
    assert abs(masks - expected.numpy()).max() <= TOLERANCE


def test_torchscript_with_class_input_and_clear_errors(tiny_predictor_path, eager, images, tmp_path):
    graph, _ = load_graph(tiny_predictor_path, class_input=True)
    out = tmp_path / "p.pt"
    export.main(["--ckpt_path", str(tiny_predictor_path), "--format=torchscript", "--out", str(out),
                 f"--image_size={SIZE}", "--class_input", "--check_images=0"])
    classes = torch.tensor([9, 0, 1, 2, 3, 4, 5, 6])
    _, explainer = eager
    torch.testing.assert_close(run_exported(out, "torchscript", (images, classes)), explainer(images, classes),
                               atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="pass --image_size"):
        export.main(["--ckpt_path", str(tiny_predictor_path), "--format=onnx", "--out", str(tmp_path / "x.onnx")])
    with pytest.raises(SystemExit):
        export.main(["--ckpt_path", str(tiny_predictor_path), "--format=tflite", "--out", str(tmp_path / "x")])


def test_out_that_is_the_checkpoint_itself_is_refused(tiny_predictor_path, tiny_blackbox_path, tmp_path):
    """--out naming the checkpoint (by its path, through a symbolic link, a hard link or '..') or the black box
    it exports is refused before anything is written: the checkpoint's bytes stay as they were."""
    ckpt, blackbox = tmp_path / "p.ckpt", tmp_path / "bb.pt"
    ckpt.write_bytes(tiny_predictor_path.read_bytes())
    blackbox.write_bytes(tiny_blackbox_path.read_bytes())
    original, original_bb = ckpt.read_bytes(), blackbox.read_bytes()
    (tmp_path / "link.ckpt").symlink_to(ckpt)
    (tmp_path / "hard.ckpt").hardlink_to(ckpt)
    (tmp_path / "sub").mkdir()
    for out in (ckpt, tmp_path / "link.ckpt", tmp_path / "hard.ckpt", tmp_path / "sub" / ".." / "p.ckpt"):
        with pytest.raises(ValueError, match=r"--out .* is the file --ckpt_path .* the export would overwrite it"):
            export.main(["--ckpt_path", str(ckpt), "--format=torchscript", "--out", str(out), f"--image_size={SIZE}"])
    with pytest.raises(ValueError, match=r"--out .* is the file the black box .* would overwrite it"):
        export.main(["--ckpt_path", str(ckpt), "--format=onnx", "--out", str(blackbox), f"--image_size={SIZE}",
                     "--blackbox", f"ckpt:{blackbox}"])
    assert ckpt.read_bytes() == original and blackbox.read_bytes() == original_bb


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_graph_answers_out_of_range_or_non_finite_images_with_nan_masks(fmt, tiny_predictor_path, images,
                                                                                 tmp_path):
    """Pixels in 0..255, a normalised tensor or a NaN give an all-NaN mask for that image only, not a
    plausible-looking map; the valid images of the batch keep their masks."""
    out = tmp_path / f"predictor.{fmt}"
    export.main(["--ckpt_path", str(tiny_predictor_path), "--format", fmt, "--out", str(out), f"--image_size={SIZE}",
                 "--check_images=0"])
    batch = images[:4].clone()
    valid = run_exported(out, fmt, (batch,))
    assert torch.isfinite(valid).all()
    batch[0] = batch[0] * 255  # 0..255 pixels
    batch[1] = batch[1] - 0.5  # a normalised tensor
    batch[2, 0, 3, 3] = float("nan")
    masks = run_exported(out, fmt, (batch,))
    assert torch.isnan(masks[:3]).all()
    torch.testing.assert_close(masks[3], valid[3], atol=TOLERANCE, rtol=0)
