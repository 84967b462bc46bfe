"""Hostile inputs: every file, checkpoint or tensor an attacker or a careless user can hand us gets a
clear error naming it, or a named skip; no pickled code runs; nothing hangs. One test (or parameter) per row of
the README's "Reliability: hostile inputs" table."""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import math
import os
import pickle
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saliency_lab import explainers
from saliency_lab.datamodules import (BadAnnotationWarning, BadImageError, BadImageWarning, ClutteredFashionMNIST,
                         COCODetection, ImageNetFolder, fashion_mnist)
from saliency_lab.datamodules.scene_export import export_coco
from saliency_lab.core.blackbox import BlackBox, blackbox_record, create_network
from saliency_lab.core.checkpoints import (DamagedCheckpointError, RemoteCheckpointError, UnsafeCheckpointError,
                                          safe_load)
from saliency_lab.metrics import causal_curves, explained_class, faithfulness_mf, pointing_game, pr_auc
from saliency_lab.metrics.causal import CausalProtocol

EXPERIMENT = "configs/train/embedded_classifier.yaml"
SMALL = ["--data.init_args.image_size=32", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
         "--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
         "--model.init_args.blackbox.init_args.model_kwargs={channels: [8, 16, 24, 32]}"]
TINY = dict(model="timm:resnet10t", num_classes=10, model_kwargs={"channels": [8, 16, 24, 32]})


# ---------------------------------------------------------------------------------------------------------
# Malicious checkpoints, served on 127.0.0.1


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Server:
    """A folder served over HTTP on 127.0.0.1 (a thread), recording the paths requested."""

    def __init__(self, folder: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """(server, marker): evil.ckpt (a Lightning-looking checkpoint) and evil_record.pt (a black-box record),
    both carrying the payload, served over HTTP; torch.hub's download cache kept inside tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    folder, marker = tmp_path / "served", tmp_path / "pwned"
    folder.mkdir()
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "epoch": 0, "global_step": 0,
                "payload": _Payload(marker)}, folder / "evil.ckpt")
    torch.save({"blackbox": {"format": "saliency-lab/blackbox/v1", "payload": _Payload(marker)}},
               folder / "evil_record.pt")
    torch.load(folder / "evil.ckpt", weights_only=False)  # the payload is live: plain unpickling runs it ...
    assert marker.exists()
    marker.unlink()  # ... so every test below shows that we never unpickle it
    server = _Server(folder)
    yield server, marker
    server.close()


def _path_options(url: str, tiny_blackbox_path: Path, tmp_path: Path):
    from saliency_lab.cli import explain
    from saliency_lab.cli import export
    from saliency_lab.lightning_modules.classifier import Classifier
    from saliency_lab.lightning_modules.mask_predictor import MaskPredictor
    from saliency_lab.networks.feature_filter import FeatureFilter

    local = BlackBox(f"ckpt:{tiny_blackbox_path}")
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "a.png")
    return {
        "BlackBox('ckpt:URL')": lambda: BlackBox(f"ckpt:{url}/evil_record.pt"),
        "BlackBox(weights=URL)": lambda: BlackBox(**TINY, weights=f"{url}/evil.ckpt"),
        "Classifier(weights=URL)": lambda: Classifier(BlackBox(**TINY), weights=f"{url}/evil.ckpt"),
        "trained explainer checkpoint (evaluate.py --ckpt_path)": lambda: explainers.build(
            "predictor_ct", local, checkpoint=f"{url}/evil.ckpt"),
        "its recorded name (evaluate.py --ckpt_path PATH)": lambda: explainers.recorded_name(f"{url}/evil.ckpt"),
        "MaskPredictor(filter_checkpoint=URL)": lambda: MaskPredictor(blackbox=local,
                                                                      filter_checkpoint=f"{url}/evil.ckpt"),
        "FeatureFilter.from_checkpoint(URL)": lambda: FeatureFilter.from_checkpoint(f"{url}/evil.ckpt"),
        "explain.py --ckpt_path URL": lambda: explain.main(["--images", str(images), "--out", str(tmp_path / "maps"),
                                                       "--ckpt_path", f"{url}/evil.ckpt"]),
        "explain.py --blackbox ckpt:URL": lambda: explain.main(["--images", str(images), "--out", str(tmp_path / "maps"),
                                                                "--method", "gradient", "--blackbox",
                                                                f"ckpt:{url}/evil_record.pt"]),
        "export.py --ckpt_path URL": lambda: export.main(["--ckpt_path", f"{url}/evil.ckpt", "--format", "onnx", "--out",
                                                     str(tmp_path / "p.onnx")]),
    }


PATH_OPTIONS = ["BlackBox('ckpt:URL')", "BlackBox(weights=URL)", "Classifier(weights=URL)",
                "trained explainer checkpoint (evaluate.py --ckpt_path)", "its recorded name (evaluate.py --ckpt_path PATH)",
                "MaskPredictor(filter_checkpoint=URL)", "FeatureFilter.from_checkpoint(URL)", "explain.py --ckpt_path URL",
                "explain.py --blackbox ckpt:URL", "export.py --ckpt_path URL"]


@pytest.mark.parametrize("option", PATH_OPTIONS)
def test_url_checkpoint_is_refused_by_every_loader(evil, tiny_blackbox_path, tmp_path, option):
    server, marker = evil
    with pytest.raises(RemoteCheckpointError, match=r"refusing to load http://127\.0\.0\.1:\d+/evil.*URL.*local"):
        _path_options(server.url, tiny_blackbox_path, tmp_path)[option]()
    assert not marker.exists() and server.requests == []  # nothing ran, nothing was even downloaded


def _evaluate_args(blackbox: str, out: Path, *extra: str) -> list[str]:
    return ["--blackbox.class_path=saliency_lab.core.blackbox.BlackBox", f"--blackbox.init_args.model={blackbox}",
            "--data.class_path=saliency_lab.datamodules.ClutteredFashionMNISTDataModule", "--data.init_args.image_size=32",
            "--data.init_args.num_test=8", "--num_images=2", "--batch_size=2", "--explainers=gradient",
            "--settings.mf_steps=4", "--wandb=false", f"--out={out}", *extra]


def test_evaluate_refuses_url_blackbox_and_ckpt(evil, tiny_blackbox_path, tmp_path):
    from saliency_lab.cli import evaluate

    server, marker = evil
    url = f"{server.url}/evil.ckpt"
    for entry in (url, f"predictor_ct_posthoc={url}"):  # refused by the option checks, before anything is read
        with pytest.raises(ValueError, match=rf"--ckpt_path \['{re_escape(entry)}'\]: {re_escape(url)} is a http:// URL"):
            evaluate.main(_evaluate_args(f"ckpt:{tiny_blackbox_path}", tmp_path / "a", f"--ckpt_path=[{entry}]"))
    record = f"{server.url}/evil_record.pt"
    with pytest.raises(ValueError, match=rf"--blackbox.init_args.model 'ckpt:{re_escape(record)}': {re_escape(record)} "
                                         "is a http:// URL"):
        evaluate.main(_evaluate_args(f"ckpt:{record}", tmp_path / "b"))
    with pytest.raises(ValueError, match=rf"--blackbox.init_args.weights '{re_escape(url)}': {re_escape(url)} is a "
                                         "http:// URL"):  # a weights file of a timm black box
        evaluate.main(_evaluate_args(TINY["model"], tmp_path / "c", "--blackbox.init_args.num_classes=10",
                                     f"--blackbox.init_args.weights={url}"))
    assert not marker.exists() and server.requests == []
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before the output folder


def test_train_and_evaluate_name_a_refused_blackbox_without_union_noise(evil, tiny_blackbox_path, tmp_path):
    """A black box built by jsonargparse (a LightningModule's, evaluate.py's) fails with its own message naming
    the file, not wrapped in "Does not validate against any of the Union subtypes"."""
    from saliency_lab.cli import evaluate

    server, marker = evil
    url = f"{server.url}/evil_record.pt"
    for option in (f"--model.init_args.blackbox.init_args.model=ckpt:{url}", f"--model.init_args.weights={url}"):
        with pytest.raises(RemoteCheckpointError) as error:
            _train(["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path / 'run'}", option])
        assert str(error.value).startswith(f"refusing to load {url}: it is a http:// URL"), str(error.value)
    insane = tmp_path / "insane.pt"
    torch.save(_record(std=[0.25, 0.0, 0.25]), insane)
    with pytest.raises(ValueError) as error:
        evaluate.main(_evaluate_args(f"ckpt:{insane}", tmp_path / "out"))
    assert str(error.value).startswith(f"{insane}: std must be positive"), str(error.value)
    assert not marker.exists() and server.requests == []


def _train(args: list[str]) -> None:
    from saliency_lab.cli import train

    train.main(args)


def _refused(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        _train(args)
    assert stop.value.code != 0
    return capsys.readouterr().err


def test_train_ckpt_path_url_is_refused_with_a_clear_message(evil, tmp_path, capsys):
    server, marker = evil
    url = f"{server.url}/evil.ckpt"
    err = _refused(capsys, ["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}", f"--ckpt_path={url}"])
    assert f"--ckpt_path {url}: refused, it is a http:// URL, not a local file" in err
    assert "--allow_remote_ckpt true" in err and "weights_only=True" in err
    assert "Does not validate against any of the" not in err  # no jsonargparse union noise
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"ckpt_path: {url}\n")  # a config file holding nothing but the checkpoint
    err = _refused(capsys, ["test", "--config", EXPERIMENT, "--config", str(overlay), *SMALL, f"--run_dir={tmp_path}"])
    assert f"--ckpt_path {url}: refused" in err
    err = _refused(capsys, ["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}",
                            "--ckpt_path=s3://bucket/model.ckpt"])
    assert "--ckpt_path s3://bucket/model.ckpt: refused, it is a s3:// URL" in err
    assert not marker.exists() and server.requests == []
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was built


def test_train_local_malicious_ckpt_path_is_refused_naming_the_file(evil, tmp_path, capsys):
    server, marker = evil
    local = tmp_path / "downloaded.ckpt"
    shutil.copy(tmp_path / "served" / "evil.ckpt", local)
    err = _refused(capsys, ["test", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}", f"--ckpt_path={local}"])
    assert f"--ckpt_path {local}: refusing to load it, it is not loadable with weights_only=True" in err
    err = _refused(capsys, ["fit", "--config", EXPERIMENT, *SMALL, f"--ckpt_path={tmp_path / 'none.ckpt'}"])
    assert "none.ckpt: no such checkpoint file" in err
    err = _refused(capsys, ["fit", "--config", EXPERIMENT, *SMALL, "--weights_only=false"])
    assert "unrecognized arguments: --weights_only" in err  # weights_only is not an option: always True
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["half", "last byte", "empty", "garbage", "legacy half"])
def test_truncated_checkpoint_is_called_damaged_not_unsafe(tiny_predictor_path, tmp_path, damage):
    """A checkpoint cut short (an interrupted copy or download) or that is no checkpoint at all is named as
    damaged or truncated; the weights_only refusal of a pickled payload keeps its own message."""
    raw = tiny_predictor_path.read_bytes()
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(64)}, legacy, _use_new_zipfile_serialization=False)
    content = {"half": raw[:len(raw) // 2], "last byte": raw[:-1], "empty": b"", "garbage": b"not a checkpoint " * 9,
               "legacy half": legacy.getvalue()[:len(legacy.getvalue()) // 2]}[damage]
    path = tmp_path / "cut.ckpt"
    path.write_bytes(content)
    with pytest.raises(DamagedCheckpointError, match=rf"cannot read {re_escape(str(path))}: the checkpoint file is "
                                                     "damaged or truncated") as caught:
        safe_load(path)
    assert "weights_only" not in str(caught.value)
    with pytest.raises(DamagedCheckpointError, match="damaged or truncated"):
        explainers.recorded_name(path)  # evaluate.py --ckpt_path PATH reads the recorded name first


def test_unsafe_checkpoint_message_stays_distinct_from_damaged(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, tmp_path / "evil.ckpt")
    refused = r"refusing to load .*evil\.ckpt: it is not loadable with weights_only=True \(UnpicklingError: "
    with pytest.raises(UnsafeCheckpointError, match=refused + ".*unsupported GLOBAL posix.system") as caught:
        safe_load(tmp_path / "evil.ckpt")
    assert "damaged" not in str(caught.value) and not isinstance(caught.value, DamagedCheckpointError)
    assert not marker.exists()


def test_train_truncated_ckpt_path_is_called_damaged(tiny_predictor_path, tmp_path, capsys):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(tiny_predictor_path.read_bytes()[:4096])
    err = _refused(capsys, ["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}", f"--ckpt_path={cut}"])
    assert f"--ckpt_path {cut}: cannot read {cut}: the checkpoint file is damaged or truncated" in err
    assert "weights_only" not in err and not (tmp_path / "checkpoints").exists()


def test_train_ckpt_path_of_another_model_class_names_both_classes(tmp_path, capsys, monkeypatch, repo_root):
    """The committed mask-predictor checkpoint given to the classifier config: refused naming both classes,
    instead of Lightning silently building the checkpoint's model."""
    monkeypatch.chdir(repo_root)
    predictor = "assets/embedded_predictor_game.ckpt"
    err = _refused(capsys, ["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}", f"--ckpt_path={predictor}"])
    assert (f"--ckpt_path {predictor}: it is a checkpoint of "
            "saliency_lab.lightning_modules.mask_predictor.MaskPredictor, but the config builds "
            "saliency_lab.lightning_modules.classifier.") in err, err[-2000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_opted_in_url_checkpoint_still_loads_weights_only(evil, tmp_path):
    """With --allow_remote_ckpt the checkpoint is downloaded, and Lightning loads it with weights_only=True:
    the payload is refused (a real checkpoint loads, see the next test)."""
    server, marker = evil
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _train(["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path / 'run'}", "--trainer.max_steps=1",
                f"--ckpt_path={server.url}/evil.ckpt", "--allow_remote_ckpt=true"])
    assert "/evil.ckpt" in server.requests and not marker.exists()  # downloaded, and still not run


@pytest.mark.slow
def test_opted_in_url_checkpoint_of_our_own_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    run = tmp_path / "run"
    _train(["fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={run}", "--trainer.max_epochs=1"])
    server = _Server(run / "checkpoints")
    try:
        _train(["test", "--config", EXPERIMENT, *SMALL, f"--run_dir={run}", "--allow_remote_ckpt=true",
                f"--ckpt_path={server.url}/last.ckpt"])
    finally:
        server.close()
    assert "/last.ckpt" in server.requests and "test/acc" in (run / "test_metrics.json").read_text()


# ---------------------------------------------------------------------------------------------------------
# Black-box records


def _record(**changes) -> dict:
    torch.manual_seed(0)
    net = create_network(TINY["model"], 10, TINY["model_kwargs"])
    record = blackbox_record(TINY["model"], net, 10, TINY["model_kwargs"], (0.5,) * 3, (0.25,) * 3)
    record.update(changes)
    return record


@pytest.mark.parametrize("changes, message", [
    ({"std": [0.25, 0.0, 0.25]}, "std must be positive"),
    ({"std": [0.25, math.nan, 0.25]}, "std must be 3 finite numbers"),
    ({"mean": [0.5, math.inf, 0.5]}, "mean must be 3 finite numbers"),
    ({"std": [0.25]}, "std must be 3 finite numbers"),
    ({"num_classes": 0}, r"num_classes 0, expected an int in \[2, 100000\]"),
    ({"num_classes": 10**9}, "num_classes 1000000000"),
    ({"model": "pickle:os.system"}, "expected 'timm:NAME'"),
])
def test_insane_blackbox_record_is_refused_on_load(tmp_path, changes, message):
    path = tmp_path / "record.pt"
    torch.save(_record(**changes), path)
    with pytest.raises(ValueError, match=f"{re_escape(path)}: .*{message}"):
        BlackBox(f"ckpt:{path}")


def re_escape(path) -> str:
    import re

    return re.escape(str(path))


def test_nan_weights_and_zero_std_are_refused(tmp_path):
    record = _record()
    key = next(k for k, v in record["state_dict"].items() if v.is_floating_point())
    record["state_dict"][key] = record["state_dict"][key].clone().fill_(math.nan)
    torch.save(record, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=f"nan.pt: weights '{key}' contain NaN"):
        BlackBox(f"ckpt:{tmp_path / 'nan.pt'}")
    torch.save(record["state_dict"], tmp_path / "nan_weights.pth")
    with pytest.raises(ValueError, match="nan_weights.pth: weights .* contain NaN"):
        BlackBox(**TINY, weights=str(tmp_path / "nan_weights.pth"))
    with pytest.raises(ValueError, match="std must be positive"):
        BlackBox(**TINY, std=(0.0, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------------------
# Image files: decompression bombs


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header (SOF0) is patched to claim width x height."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture
def bomb_folder(tmp_path):
    folder = tmp_path / "train" / "n1"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a_good.png")
    (folder / "b_bomb.JPEG").write_bytes(_jpeg_claiming(30000, 30000))  # PIL itself refuses beyond 2 x limit
    (folder / "c_bomb.JPEG").write_bytes(_jpeg_claiming(10000, 10000))  # PIL would only warn, then decode
    return tmp_path


@pytest.mark.parametrize("verify", ["quick", "full"])
def test_decompression_bombs_are_skipped_with_one_warning_naming_them(bomb_folder, verify):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageNetFolder(bomb_folder, "train", 16, verify=verify)
    ours = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(ours) == 1 and "skipped 2 " in ours[0]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]  # PIL's names no file
    assert "b_bomb.JPEG (DecompressionBombError" in ours[0] and "c_bomb.JPEG (DecompressionBombError" in ours[0]
    assert "10000 x 10000 = 100,000,000 pixels" in ours[0]
    assert len(data) == 1 and data[0]["image"].shape == (3, 16, 16)


def test_decompression_bomb_raises_naming_the_file_on_request(bomb_folder):
    with pytest.raises(BadImageError, match=r"b_bomb\.JPEG: not a readable image \(DecompressionBombError"):
        ImageNetFolder(bomb_folder, "train", 16, on_error="raise")
    unchecked = ImageNetFolder(bomb_folder, "train", 16, verify="off")
    for i in (1, 2):  # loading (not only the scan) refuses before decoding, naming the file
        with pytest.raises(BadImageError, match=r"_bomb\.JPEG: cannot decode image \(DecompressionBombError"):
            unchecked[i]


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST files


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion_dir(folder: Path, labels: np.ndarray | None = None, items=(28, 28), splits=("train", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in splits:
        img_stem, lbl_stem = fashion_mnist.FILES[split]
        n = 40 if labels is None else len(labels)
        _write_idx(folder / f"{img_stem}.gz", rng.integers(0, 256, (n, *items)))
        _write_idx(folder / f"{lbl_stem}.gz", np.arange(n) % 10 if labels is None else labels)
    return folder


def test_single_class_labels_fail_at_load_instead_of_hanging(tmp_path):
    folder = _fashion_dir(tmp_path / "fm", labels=np.full(40, 3))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: every label is \[3\]; .*at least two classes"):
        ClutteredFashionMNIST("test", image_size=32, data_dir=folder)


def test_distractor_draw_is_bounded_for_a_rare_class(tmp_path):
    labels = np.zeros(400, np.int64)
    labels[123] = 7  # the only item of another class: rejection sampling alone would take ~400 draws
    folder = _fashion_dir(tmp_path / "fm", labels=labels)
    data = ClutteredFashionMNIST("test", image_size=32, data_dir=folder)
    rng = np.random.default_rng(0)
    assert all(data._other_class_item(rng, 0) == 123 for _ in range(50))
    assert data[0]["image"].shape == (3, 32, 32)


def test_out_of_range_labels_and_wrong_item_shapes_are_refused(tmp_path):
    labels = np.arange(40) % 10
    labels[5] = 12
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: 1 label\(s\) outside \[0, 10\), e\.g\. 12 at item 5"):
        ClutteredFashionMNIST("test", image_size=32, data_dir=_fashion_dir(tmp_path / "a", labels=labels))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz holds items of shape \(32, 32\), expected \(28, 28\)"):
        ClutteredFashionMNIST("test", image_size=32, data_dir=_fashion_dir(tmp_path / "b", items=(32, 32)))


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:len(raw) // 2], "cannot be read: it is truncated or not a gzip file"),  # cut .gz stream
    (lambda raw: b"garbage, not gzip at all" * 4, "cannot be read: it is truncated or not a gzip file"),
    (lambda raw: gzip.compress(b"\x00\x00\x08\x03" + b"\xff" * 12 + b"\x00" * 10), "is truncated: the header declares"),
    (lambda raw: gzip.compress(b"\x00\x00\x0d\x01abcd"), "is not an unsigned-byte IDX file"),
    (lambda raw: gzip.compress(b"\x00\x00\x08\x05\x00"), "is truncated or not an IDX file"),
])
def test_damaged_idx_file_is_named(tmp_path, damage, message):
    folder = _fashion_dir(tmp_path / "fm")
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=f"{re_escape(path)} {message}"):
        ClutteredFashionMNIST("test", image_size=32, data_dir=folder)


def test_explicit_data_dir_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", _fashion_dir(tmp_path / "installed"))  # a complete copy
    incomplete = _fashion_dir(tmp_path / "mine", splits=("train",))
    with pytest.raises(FileNotFoundError, match=f"data_dir {re_escape(incomplete)} lacks the Fashion-MNIST "
                                                r"file\(s\) t10k-images-idx3-ubyte\[\.gz\], t10k-labels-idx1-ubyte"):
        ClutteredFashionMNIST("test", image_size=32, data_dir=incomplete)
    assert len(ClutteredFashionMNIST("test", image_size=32, num_scenes=4)) == 4  # no data_dir: the installed copy


# ---------------------------------------------------------------------------------------------------------
# COCO annotations

SIZE = 32


@pytest.fixture(scope="module")
def coco_export(tmp_path_factory):
    scenes = ClutteredFashionMNIST("val", SIZE, num_scenes=8)
    annotation_file = export_coco(scenes, tmp_path_factory.mktemp("coco"), n=8)
    return annotation_file.parent.parent / "images", annotation_file


def _set(path: list, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return edit


COCO_CASES = {
    "bbox missing": (_set(["annotations", 2, "bbox"], KeyError), r"annotation \d+ \(image \d+\): bbox None is not"),
    "bbox not numeric": (_set(["annotations", 2, "bbox"], ["a", 1, 2, 3]), "is not a finite number"),
    "bbox NaN": (_set(["annotations", 2, "bbox"], [1, 1, math.nan, 3]), "is not a finite number"),
    "bbox of 3 numbers": (_set(["annotations", 2, "bbox"], [1, 1, 3]), r"is not \[x, y, width, height\]"),
    "bbox without area": (_set(["annotations", 2, "bbox"], [1, 1, 0, 3]), "has no area"),
    "bad polygon": (_set(["annotations", 2, "segmentation"], [[1, 2]]), "polygon 0 is not a list of >= 3"),
    "polygon with NaN": (_set(["annotations", 2, "segmentation"], [[1, 2, 3, math.nan, 5, 6]]), "finite number"),
    "RLE of another size": (_set(["annotations", 2, "segmentation"], {"size": [5, 5], "counts": [25]}),
                            "RLE size"),
    "iscrowd 7": (_set(["annotations", 2, "iscrowd"], 7), "iscrowd 7 is not 0 or 1"),
    "width 0": (_set(["images", 2, "width"], 0), r"image \d+ \('\d+\.png'\): width 0 is not an integer"),
    "width and height 100000": (lambda d: (_set(["images", 2, "width"], 100000)(d),
                                           _set(["images", 2, "height"], 100000)(d)), "width 100000"),
    "5000 x 20000 image": (lambda d: (_set(["images", 2, "width"], 5000)(d), _set(["images", 2, "height"], 20000)(d)),
                           "exceeds the limit of"),
    "absolute file_name": (_set(["images", 2, "file_name"], "/etc/hostname"), "is an absolute path"),
    "file_name with ..": (_set(["images", 2, "file_name"], "../outside.png"), "climbs out of image_dir"),
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_invalid_coco_fields_skip_the_sample_with_one_named_warning(coco_export, tmp_path, case):
    image_dir, annotation_file = coco_export
    edit, message = COCO_CASES[case]
    data = json.loads(annotation_file.read_text())
    edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))  # json writes NaN as NaN, which json.load reads back
    shutil.copy(image_dir / "00000000.png", tmp_path / "outside.png")  # what '../outside.png' would reach
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = COCODetection(image_dir, path, SIZE)
    ours = [str(w.message) for w in caught if issubclass(w.category, BadAnnotationWarning)]
    assert len(ours) == 1 and ours[0].startswith(f"{path}: skipped 1 sample(s) with invalid annotations")
    assert __import__("re").search(message, ours[0]), ours[0]
    assert len(coco) == 7 and all(coco[i]["image"].shape == (3, SIZE, SIZE) for i in range(len(coco)))
    assert all("outside" not in coco.path(img) and "hostname" not in coco.path(img) for img, _ in coco.sample_ids)
    with pytest.raises(ValueError, match=f"{re_escape(path)}: invalid COCO annotation: .*{message}"):
        COCODetection(image_dir, path, SIZE, on_error="raise")


def test_structurally_broken_coco_file_is_named(coco_export, tmp_path):
    image_dir, annotation_file = coco_export

    def duplicate_id(data):
        data["annotations"][1]["id"] = data["annotations"][0]["id"]

    for edit, message in ((_set(["annotations", 1, "id"], KeyError), r"annotations\[1\] has no 'id'"),
                          (duplicate_id, r"annotations id \d+ appears twice"),
                          (_set(["categories", 0, "name"], KeyError), r"categories\[0\] has no 'name'")):
        data = json.loads(annotation_file.read_text())
        edit(data)
        path = tmp_path / "instances.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=f"{re_escape(path)}: {message}"):
            COCODetection(image_dir, path, SIZE)


# ---------------------------------------------------------------------------------------------------------
# Tensors handed to metrics and explainers


@pytest.fixture(scope="module")
def box(tiny_blackbox_path):
    return BlackBox(f"ckpt:{tiny_blackbox_path}")


def _images(n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _protocol():
    return CausalProtocol(units=4, steps=4, blur_kernel=3, blur_sigma=1.0)


@pytest.mark.parametrize("case", ["nan", "x255", "float16", "float64", "uint8"])
def test_metrics_refuse_bad_images(box, case):
    images = _images()
    bad = {"nan": images.clone().index_put_((torch.tensor([1]),), torch.tensor(math.nan)), "x255": images * 255,
           "float16": images.half(), "float64": images.double(), "uint8": (images * 255).to(torch.uint8)}[case]
    message = {"nan": r"images contain NaN or Inf \(batch positions \[1\]\)",
               "x255": r"images must lie in \[0, 1\].*0\.\.255 values: divide by 255",
               "float16": "images are torch.float16, expected torch.float32.*image_dtype='float16'",
               "float64": "images are torch.float64, expected torch.float32.*image_dtype='float64'",
               "uint8": r"images are torch.uint8, expected torch.float32.*scale them to \[0, 1\]"}[case]
    saliency, targets = torch.rand(2, 1, 16, 16), torch.tensor([0, 1])
    for call in (lambda: causal_curves(box, bad, saliency, targets, _protocol()),
                 lambda: faithfulness_mf(box, bad, saliency, targets, steps=4),
                 lambda: explained_class(box, bad)):
        with pytest.raises(ValueError, match=message):
            call()


def test_metrics_refuse_out_of_range_targets_and_bad_saliency(box):
    images, saliency = _images(), torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\) for this black box, got \[0, 12\]"):
        causal_curves(box, images, saliency, torch.tensor([0, 12]), _protocol())
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        faithfulness_mf(box, images, saliency, torch.tensor([-1, 0]), steps=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        explained_class(box, images, torch.tensor([0, 10]), rule="label")
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))  # declares no num_classes
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        causal_curves(plain, images, saliency, torch.tensor([0, 9]), _protocol())
    with pytest.raises(ValueError, match="saliency contains NaN"):
        causal_curves(box, images, torch.full((2, 1, 16, 16), math.nan), torch.tensor([0, 1]), _protocol())
    gt = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="saliency contains NaN"):
        pr_auc(torch.full((2, 1, 16, 16), math.nan), gt)
    with pytest.raises(ValueError, match=r"saliency must be \(B, 1, h, w\)"):
        pointing_game(torch.rand(2, 3, 16, 16), gt, 1.0)


@pytest.mark.parametrize("name", ["igos_pp", "gradient", "rise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_explainers_refuse_lower_or_higher_precision_unless_asked(box, name, dtype):
    explainer = explainers.build(name, box)
    with pytest.raises(ValueError, match=f"images are {dtype}, expected torch.float32.*image_dtype="):
        explainer(_images().to(dtype), torch.tensor([0, 1]))  # immediate: no minute of float16 CPU blur first
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 10\)"):
        explainer(_images(), torch.tensor([0, 10]))


def test_higher_precision_is_an_explicit_option(tiny_blackbox_path):
    double = BlackBox(f"ckpt:{tiny_blackbox_path}").double()
    images, targets = _images().double(), torch.tensor([0, 1])
    saliency = explainers.build("gradient", double, image_dtype="float64")(images, targets)
    assert saliency.dtype == torch.float64 and saliency.shape == (2, 1, 16, 16)
    result = causal_curves(double, images, saliency, targets, _protocol(), image_dtype=torch.float64)
    assert torch.isfinite(result.deletion).all()
    with pytest.raises(ValueError, match="image_dtype must be one of"):
        explainers.build("gradient", double, image_dtype="int8")


# ---------------------------------------------------------------------------------------------------------
# Weights & Biases


@pytest.fixture
def fresh_wandb():
    """wandb keeps its first mode in a process-wide singleton: start each test from a new one, and leave a new
    one behind (read again from the environment, W&B disabled in tests)."""
    import wandb

    def reset() -> None:
        if wandb.run is not None:  # another test's run (e.g. a disabled one) survives teardown, and Lightning's
            wandb.run.finish()     # WandbLogger would reuse it instead of starting one in the mode under test
        wandb.teardown()

    reset()
    yield
    reset()


@pytest.mark.parametrize("key", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_wandb_disabled_stays_disabled_with_or_without_a_key(tmp_path, monkeypatch, fresh_wandb, key):
    from saliency_lab.cli.utils import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(save_dir=str(tmp_path))
    run = logger.experiment
    try:
        assert run.disabled and os.environ["WANDB_MODE"] == "disabled"
    finally:
        run.finish()
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("key", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_wandb_offline_stays_offline_with_or_without_a_key(tmp_path, monkeypatch, fresh_wandb, key):
    from saliency_lab.cli.utils import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(save_dir=str(tmp_path), offline=False)  # even an explicit offline=False
    assert logger._offline
    run = logger.experiment
    try:
        assert run.offline
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_evaluate_with_wandb_disabled_writes_no_wandb_files(tiny_blackbox_path, tmp_path, monkeypatch, fresh_wandb):
    from saliency_lab.cli import evaluate

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    evaluate.main([*_evaluate_args(f"ckpt:{tiny_blackbox_path}", tmp_path), "--wandb=true"])
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "wandb").exists()
    assert os.environ["WANDB_MODE"] == "disabled"


def test_checkpoint_settings_an_older_class_version_recorded_are_left_out_by_name(repo_root):
    """The committed predictor checkpoint predates the objectives: its loss weights are no longer MaskPredictor
    arguments, so `test --ckpt_path` leaves them out (the config's objectives stand) instead of failing."""
    from saliency_lab.cli.utils import split_init_args
    from saliency_lab.core.checkpoints import safe_load
    from saliency_lab.core.resources import current_class_path

    hparams = safe_load(repo_root / "assets" / "embedded_predictor_game.ckpt")["hyper_parameters"]
    path = current_class_path(hparams.pop("_class_path"))
    kept, dropped = split_init_args(path, {k: v for k, v in hparams.items() if k != "_instantiator"})
    assert {"blur_prob", "ce_weight", "deletion_weight", "game_protocols"} <= set(dropped)
    assert {"mode", "eta", "h", "widths", "blackbox"} <= set(kept) and not set(kept) & set(dropped)
    assert split_init_args("saliency_lab.core.blackbox.BlackBox", {"model": "embedded", "nonsense": 1}) == (
        {"model": "embedded"}, ["nonsense"])
