"""BlackBox: timm and torchvision models, features, normalisation, frozen state, local weights, safe loading."""
from __future__ import annotations

import os

import pytest
import timm
import torch

from saliency_lab.core.blackbox import WEIGHTS_ENV, BlackBox, blackbox_record, create_network, resolve_weights
from saliency_lab.core.checkpoints import UnsafeCheckpointError
from saliency_lab.lightning_modules.classifier import Classifier

TINY = dict(model="timm:resnet10t", num_classes=5, model_kwargs={"channels": [8, 16, 24, 32]})
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # the embedded classifier's normalisation


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BlackBox(**TINY)


@pytest.mark.parametrize("spec, size, channels", [
    ("timm:resnet10t", 64, [8, 16, 24, 32]),
    ("torchvision:googlenet", 64, [192, 480, 832, 1024]),
    ("torchvision:vgg19", 32, [128, 256, 512, 512]),
])
def test_features_are_multi_level_with_channels_and_strides(spec, size, channels):
    kwargs = {"model_kwargs": {"channels": [8, 16, 24, 32]}} if spec.startswith("timm") else {}
    box = BlackBox(spec, num_classes=7, **kwargs)
    x = torch.rand(2, 3, size, size)
    feats = box.features(x)
    assert len(feats) >= 4 and box.feature_channels == channels and box.feature_strides == [4, 8, 16, 32]
    for f, c, s in zip(feats, box.feature_channels, box.feature_strides):
        assert f.shape == (2, c, size // s, size // s)
    feats2, logits = box.features_and_logits(x)
    assert logits.shape == (2, 7)
    assert torch.allclose(logits, box.logits(x), atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(feats, feats2))
    assert torch.allclose(box.probs(x).sum(1), torch.ones(2))


def test_owns_normalisation(tiny):
    x = torch.rand(3, 3, 32, 32)
    expected = tiny.net((x - torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1))
                        / torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1))
    assert torch.allclose(tiny(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        tiny(torch.rand(3, 32, 32))


def test_is_frozen_and_stays_in_eval_mode(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())
    wrapper = torch.nn.Sequential(tiny)
    wrapper.train()
    assert not tiny.net.training


def test_gradients_flow_to_the_input_only(tiny):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    tiny(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_pretrained_weights_from_a_local_file(tmp_path):
    net = create_network(TINY["model"], TINY["num_classes"], TINY["model_kwargs"])
    x = torch.rand(2, 3, 32, 32)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    loaded = BlackBox(**TINY, weights=str(tmp_path / "w.pth"))
    assert torch.allclose(loaded.net(x), net.eval()(x), atol=1e-6)
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    assert torch.allclose(BlackBox(**TINY, weights=str(tmp_path / "w.safetensors")).net(x), net(x), atol=1e-6)
    wrong = create_network("timm:resnet10t", 3, TINY["model_kwargs"])
    torch.save({"state_dict": wrong.state_dict()}, tmp_path / "wrong.pth")
    with pytest.raises(Exception, match="size mismatch|do not fit"):
        BlackBox(**TINY, weights=str(tmp_path / "wrong.pth"))


def test_rebuilds_from_classifier_checkpoint_and_export(tmp_path):
    clf = Classifier(BlackBox(**TINY, **NORM)).eval()
    x = torch.rand(2, 3, 32, 32)
    ckpt = {"state_dict": clf.state_dict(), "epoch": 3,
            "blackbox": blackbox_record(TINY["model"], clf.net, 5, TINY["model_kwargs"], NORM["mean"], NORM["std"])}
    torch.save(ckpt, tmp_path / "clf.ckpt")
    box = BlackBox(f"ckpt:{tmp_path / 'clf.ckpt'}")
    assert box.num_classes == 5 and torch.allclose(box(x), clf(x), atol=1e-5)
    torch.save(box.export_record(), tmp_path / "box.pt")
    assert torch.allclose(BlackBox(str(tmp_path / "box.pt"))(x), clf(x), atol=1e-5)
    torch.save({"state_dict": clf.state_dict()}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a black-box checkpoint"):
        BlackBox(f"ckpt:{tmp_path / 'plain.ckpt'}")
    from saliency_lab.core.blackbox import export_blackbox

    export_blackbox(tmp_path / "clf.ckpt", tmp_path / "half.pt", half=True)  # the committed assets/ record
    assert all(v.dtype != torch.float32 for v in torch.load(tmp_path / "half.pt", weights_only=True)["state_dict"].values())
    assert torch.allclose(BlackBox(f"ckpt:{tmp_path / 'half.pt'}")(x), clf(x), atol=2e-2)
    # the committed embedded black box is tested by `train.py test` through Classifier(weights=record)
    again = Classifier(BlackBox(**TINY, **NORM), weights=str(tmp_path / "box.pt")).eval()
    assert torch.allclose(again(x), clf(x), atol=1e-5)
    with pytest.raises(ValueError, match="another classifier"):
        Classifier(BlackBox(**TINY, mean=NORM["mean"], std=(0.3, 0.3, 0.3)), weights=str(tmp_path / "box.pt"))


class _Payload:
    """Unpickling this object would run a shell command: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"blackbox": {"format": "saliency-lab/blackbox/v1", "payload": _Payload(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        BlackBox(f"ckpt:{tmp_path / 'evil.ckpt'}")
    assert not marker.exists()
    torch.save(_Payload(marker), tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError):
        BlackBox(**TINY, weights=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_clear_errors_for_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="timm:NAME"):
        BlackBox("keras:resnet")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        BlackBox(f"ckpt:{tmp_path / 'missing.ckpt'}")
    with pytest.raises(ValueError, match="feature levels"):
        BlackBox(**TINY, feature_levels=9)
    # a command-line null that jsonargparse hands over as text is read as the null it was (random weights)
    assert BlackBox(**TINY, weights="None").config()["init_args"]["weights"] is None


def _weights_folder(tmp_path):
    """A weights folder holding ``w.pth`` (TINY's network) and a working directory without it: (folder, cwd, net)."""
    folder, cwd = tmp_path / "weights", tmp_path / "work"
    folder.mkdir()
    cwd.mkdir()
    torch.manual_seed(1)
    net = create_network(TINY["model"], TINY["num_classes"], TINY["model_kwargs"]).eval()
    torch.save(net.state_dict(), folder / "w.pth")
    return folder, cwd, net


def test_relative_weights_are_found_under_the_weights_folder_variable(tmp_path, monkeypatch):
    """A relative ``weights`` path missing under the working directory is read from $SALIENCY_LAB_WEIGHTS; the
    config keeps the name as given (a checkpoint names the file, not this machine's folder); a file under the
    working directory wins over the folder's."""
    folder, cwd, net = _weights_folder(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    x = torch.rand(2, 3, 32, 32)
    box = BlackBox(**TINY, weights="w.pth")
    assert torch.allclose(box.net(x), net(x), atol=1e-6)
    assert box.config()["init_args"]["weights"] == "w.pth"
    assert resolve_weights("w.pth") == str(folder / "w.pth")
    torch.manual_seed(2)
    local = create_network(TINY["model"], TINY["num_classes"], TINY["model_kwargs"])
    torch.save(local.state_dict(), cwd / "w.pth")
    assert resolve_weights("w.pth") == "w.pth"  # the working directory's file comes first
    assert not torch.allclose(BlackBox(**TINY, weights="w.pth").net(x), net(x))


def test_content_hash_is_of_the_weights_not_of_where_they_were_found(tmp_path, monkeypatch):
    """The same file through the variable, by its absolute path or copied elsewhere hashes the same (evaluation rows
    are keyed by it); other weights under the same name hash differently."""
    folder, cwd, _ = _weights_folder(tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    through_variable = BlackBox(**TINY, weights="w.pth").content_hash()
    assert through_variable == BlackBox(**TINY, weights=str(folder / "w.pth")).content_hash()
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / "w.pth").write_bytes((folder / "w.pth").read_bytes())
    monkeypatch.setenv(WEIGHTS_ENV, str(elsewhere))
    assert BlackBox(**TINY, weights="w.pth").content_hash() == through_variable
    torch.save(create_network(TINY["model"], TINY["num_classes"], TINY["model_kwargs"]).state_dict(), elsewhere / "w.pth")
    assert BlackBox(**TINY, weights="w.pth").content_hash() != through_variable


@pytest.mark.parametrize("variable", [None, "empty folder"])
def test_missing_weights_name_the_file_the_variable_and_the_overrides(tmp_path, monkeypatch, variable):
    monkeypatch.chdir(tmp_path)
    if variable is None:
        monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    else:
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as error:
        BlackBox(**TINY, weights="resnet50-0676ba61.pth")
    message = str(error.value)
    assert "resnet50-0676ba61.pth" in message and WEIGHTS_ENV in message
    assert "--model.init_args.blackbox.init_args.weights=PATH" in message and "--blackbox.init_args.weights=PATH" in message
    assert ("is not set" in message) == (variable is None)
    if variable is not None:
        assert str(tmp_path / "empty") in message
    with pytest.raises(FileNotFoundError, match="absolute path"):
        BlackBox(**TINY, weights=str(tmp_path / "nowhere" / "w.pth"))
