"""evaluate.py's option values are checked before any work: each bad value gets a
ValueError naming the option and what it accepts, before the output folder, run.json, the black box or the
data are touched."""
from __future__ import annotations

import math
import re

import pytest

from saliency_lab.cli import evaluate
from saliency_lab.cli.checks import EVALUATE_RULES, Rule, int_in, number_in, problems, validate_args
from tests.test_evaluate import EVALUATE_CONFIGS

# A black box that cannot be built (the checks do not build it): were any work started before the checks, this
# would fail first.
MISSING_BLACKBOX = "timm:no_such_model"


def _args(out, *extra: str) -> list[str]:
    return ["--blackbox.class_path=saliency_lab.core.blackbox.BlackBox", f"--blackbox.init_args.model={MISSING_BLACKBOX}",
            "--data.class_path=saliency_lab.datamodules.ClutteredFashionMNISTDataModule", "--data.init_args.image_size=32",
            "--explainers=gradient,rise", "--wandb=false", f"--out={out}", *extra]


# (extra arguments, the start of the expected message line)
BAD_VALUES = {
    "explainers empty": (["--explainers="], "--explainers '': must be registry names (comma-separated, or a list of "
                                            "names and {name, alias, checkpoint, ...} dicts), each key once (known: "),
    "explainer checkpoint URL": (["--explainers=[{name: predictor_ct, checkpoint: 'http://example.org/ct.ckpt'}]"],
                                 "--explainers [{'name': 'predictor_ct', 'checkpoint': 'http://example.org/ct.ckpt'}]: "
                                 "http://example.org/ct.ckpt is a http:// URL"),
    "explainers blanks": (["--explainers= , "], "--explainers ' , ': must be registry names"),
    "explainers unknown": (["--explainers=gradient,no_such"],
                           "--explainers 'gradient,no_such': unknown method(s) ['no_such']; must be registry names"),
    "explainers twice": (["--explainers=gradient,rise,gradient"],
                         "--explainers 'gradient,rise,gradient': gradient listed twice (give each an 'alias'); must be"),
    "explainers key twice": (["--explainers=[rise, {name: rise, n_masks: 8}]"],
                             "--explainers ['rise', {'name': 'rise', 'n_masks': 8}]: rise listed twice"),
    "explainer dict without name": (["--explainers=[{n_masks: 8}]"],
                                    "--explainers [{'n_masks': 8}]: an explainer dict needs a 'name'"),
    "blackbox missing": (["--blackbox.init_args.model=ckpt:/nonexistent/blackbox.pt"],
                         "--blackbox.init_args.model 'ckpt:/nonexistent/blackbox.pt': no such file "
                         "/nonexistent/blackbox.pt; must be 'timm:NAME', 'torchvision:NAME' or 'ckpt:PATH'"),
    "blackbox URL": (["--blackbox.init_args.model=ckpt:s3://bucket/bb.pt"],
                     "--blackbox.init_args.model 'ckpt:s3://bucket/bb.pt': s3://bucket/bb.pt is a s3:// URL"),
    "blackbox weights URL": (["--blackbox.init_args.weights=https://example.org/resnet.pth"],
                             "--blackbox.init_args.weights 'https://example.org/resnet.pth': https://example.org/"
                             "resnet.pth is a https:// URL (checkpoints are read from local files only: nothing is "
                             "downloaded); must be a local weights file, or unset"),
    "ckpt missing": (["--ckpt_path=[/nonexistent/predictor.ckpt]"],
                     "--ckpt_path ['/nonexistent/predictor.ckpt']: no such file /nonexistent/predictor.ckpt; must be local "
                     "trained-explainer checkpoint files"),
    "ckpt URL": (["--ckpt_path=[predictor_ct_posthoc=https://example.org/ct.ckpt]"],
                 "--ckpt_path ['predictor_ct_posthoc=https://example.org/ct.ckpt']: https://example.org/ct.ckpt is a "
                 "https:// URL (checkpoints are read from local files only: nothing is downloaded); must be"),
    "num_images 0": (["--num_images=0"], "--num_images 0: must be an int >= 1 (the first N images of the split), "
                                         "or unset for all"),
    "num_images -1": (["--num_images=-1"], "--num_images -1: must be an int >= 1"),
    "split foo": (["--split=foo"], "--split 'foo': must be 'test' or 'val'"),
    "mf_steps 0": (["--settings.mf_steps=0"], "--settings.mf_steps 0: must be an int >= 1"),
    "mf_eps -1": (["--settings.mf_eps=-1"], "--settings.mf_eps -1.0: must be a number >= 0"),
    "top_fraction 0": (["--settings.top_fraction=0"], "--settings.top_fraction 0.0: must be a number in (0, 1]"),
    "top_fraction 1.5": (["--settings.top_fraction=1.5"], "--settings.top_fraction 1.5: must be a number in (0, 1]"),
    "pointing_tolerance -1": (["--settings.pointing_tolerance=-1"],
                              "--settings.pointing_tolerance -1.0: must be a distance in pixels >= 0"),
    "iou_threshold 5": (["--settings.iou_threshold=5"], "--settings.iou_threshold 5.0: must be a number in [0, 1]"),
    "overlay_images -3": (["--overlay_images=-3"], "--overlay_images -3: must be an int >= 0"),
    "method_hparams of a method not evaluated": (
        ["--explainers=gradient", "--method_hparams={gradcam: {layer: x}}"],
        "--method_hparams {'gradcam': {'layer': 'x'}}: must be keyed by explainers this run evaluates (--explainers: "
        "gradient, or a --ckpt_path method); gradcam is not evaluated: drop it"),
    "batch_size 0": (["--batch_size=0"], "--batch_size 0: must be an int >= 1"),
    "num_workers -1": (["--num_workers=-1"], "--num_workers -1: must be an int >= 0"),
    "protocol name": (["--settings.protocol=deletion"],
                      "--settings.protocol 'deletion': unknown protocol preset 'deletion'; known: ['blur_wide', "
                      "'grid16', 'igos', 'noise', 'rise']; must be a preset"),
    "protocol field": (["--settings.protocol={steps: 0}"],  # parsed into every CausalProtocol field
                       "--settings.protocol {'units': 'pixel', 'steps': 0, "),
    "protocol field reason": (["--settings.protocol={steps: 0}"],
                              ".*: steps must be an int >= 1, got 0; must be a preset .* or a dict of valid "
                              "CausalProtocol fields"),
    "protocol unknown field": (["--settings.protocol={stepz: 4}"],
                               "--settings.protocol {'stepz': 4}: CausalProtocol.__init__() got an unexpected keyword "
                               "argument 'stepz'; must be"),
    "target": (["--target=random"], "--target 'random': must be 'predicted' or 'label'"),
    "max_forward_batch 0": (["--max_forward_batch=0"], "--max_forward_batch 0: must be an int >= 1"),
    "seed -1": (["--seed=-1"], "--seed -1: must be an int in [0, 2**31)"),
    "seed 2**31": ([f"--seed={2**31}"], "--seed 2147483648: must be an int in [0, 2**31)"),
    "randomisation_images -1": (["--randomisation_images=-1"], "--randomisation_images -1: must be an int >= 0"),
    "randomisation_fractions decreasing": (["--randomisation_fractions=[0.5, 0.2]"],
                                           "--randomisation_fractions [0.5, 0.2]: must be a non-empty, non-decreasing"),
    "randomisation_fractions 0": (["--randomisation_fractions=[0.0]"], "--randomisation_fractions [0.0]: must be"),
    "maps_from without run.json": (["--maps_from=/nonexistent/evaluation"],
                                   "--maps_from '/nonexistent/evaluation': must be an earlier evaluate.py --out folder"),
    "num_nodes 0": (["--trainer.num_nodes=0"], "--trainer.num_nodes 0: must be an int >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_named_before_any_work(tmp_path, case):
    extra, message = BAD_VALUES[case]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="invalid option value") as error:
        evaluate.main(_args(out, *extra))
    pattern = r"^  " + (message if message.startswith(".*") else re.escape(message))
    assert re.search(pattern, str(error.value), re.MULTILINE), str(error.value)
    assert not out.exists()  # no run.json, no rows: the corrected rerun is not blocked


def test_every_bad_value_is_listed_at_once(tmp_path):
    with pytest.raises(ValueError) as error:
        evaluate.main(_args(tmp_path / "out", "--num_images=0", "--split=foo", "--settings.iou_threshold=5"))
    lines = str(error.value).splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["--split", "--num_images", "--settings.iou_threshold"]


def test_method_hparams_may_name_only_evaluated_methods(tmp_path):
    with pytest.raises(ValueError, match="gradcam, rise are not evaluated: drop them"):
        evaluate.main(_args(tmp_path / "out", "--explainers=gradient",
                            "--method_hparams={rise: {n_masks: 8}, gradcam: {}}"))


def test_method_hparams_may_name_an_alias_or_a_ckpt_method(tmp_path, tiny_predictor_path):
    """Keys are the run's explainer keys: an alias of --explainers, a NAME=PATH of --ckpt_path, or the method a plain
    --ckpt_path PATH records (read only when a key is not found otherwise)."""
    parser = evaluate.build_parser()
    alias = parser.parse_args(_args(tmp_path, "--explainers=[gradient, {name: rise, alias: rise_8}]",
                                    "--method_hparams={rise_8: {n_masks: 8}}"))
    assert problems(alias) == []
    path = str(tiny_predictor_path)
    for ckpt, key in ((f"[predictor_ct_posthoc={path}]", "predictor_ct_posthoc"), (f"[{path}]", "predictor_ct")):
        cfg = parser.parse_args(_args(tmp_path, "--explainers=", f"--ckpt_path={ckpt}",
                                      f"--method_hparams={{{key}: {{posthoc_points: 8}}}}"))
        assert problems(cfg) == [], ckpt
    other = parser.parse_args(_args(tmp_path, "--explainers=gradient", f"--ckpt_path=[{path}]",
                                    "--method_hparams={predictor_bt: {}}"))
    assert problems(other) and "predictor_bt is not evaluated" in problems(other)[0]


def test_valid_values_pass(tmp_path):
    """The defaults and the edges of each range are accepted (the checks refuse nothing that would work)."""
    parser = evaluate.build_parser()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "run.json").write_text("{}")
    (tmp_path / "predictor.ckpt").write_bytes(b"")
    edges = ["--num_images=1", "--settings.mf_steps=1", "--settings.mf_eps=0", "--settings.top_fraction=1",
             "--settings.pointing_tolerance=0", "--settings.iou_threshold=0", "--overlay_images=0", "--split=val",
             "--method_hparams={rise: {n_masks: 8}}", f"--seed={2**31 - 1}", "--settings.protocol={units: 4, steps: 4}",
             "--settings.protocol=igos", "--randomisation_fractions=[0.25, 1.0]", "--target=label",
             f"--maps_from={tmp_path / 'earlier'}", "--trainer.num_nodes=1"]
    assert problems(parser.parse_args(_args(tmp_path))) == []
    assert problems(parser.parse_args(_args(tmp_path, *edges))) == []
    only_ckpt = parser.parse_args(_args(tmp_path, "--explainers=", f"--ckpt_path=[{tmp_path / 'predictor.ckpt'}]"))
    assert problems(only_ckpt) == []  # a trained explainer alone is an evaluation


@pytest.mark.parametrize("config", EVALUATE_CONFIGS)
def test_every_evaluate_config_passes_the_checks(repo_root, config):
    """The rules refuse none of the shipped evaluate.py configs, except for files that training runs make or the
    user sets (e.g. outputs/demo/*/checkpoints/last.ckpt, a COCO-trained resnet50's weights)."""
    cfg = evaluate.build_parser().parse_args(["--config", str(repo_root / "configs" / "evaluate" / config)])
    assert [line for line in problems(cfg) if ": no such file " not in line] == []


def test_a_rule_table_is_plain_data(tmp_path):
    """The table can be re-keyed for another config layout (e.g. settings.mf_steps): options it does not find
    are not checked, and a dotted key reaches a nested value."""
    from jsonargparse import Namespace

    nested = Namespace(settings=Namespace(mf_steps=0, iou_threshold=math.nan))  # NaN: e.g. from a YAML .nan
    table = [Rule("settings.mf_steps", int_in(1), "an int >= 1"), Rule("absent", int_in(1), "never checked"),
             Rule("settings.iou_threshold", number_in(0, 1), "a number in [0, 1]")]
    assert problems(nested, table) == ["--settings.mf_steps 0: must be an int >= 1",
                                       "--settings.iou_threshold nan: must be a number in [0, 1]"]
    with pytest.raises(ValueError, match="--settings.mf_steps 0"):
        validate_args(nested, table)
    # every row names an option evaluate.py has (a renamed option would otherwise go unchecked silently)
    parsed = evaluate.build_parser().parse_args(_args(tmp_path))
    assert [row.option for row in EVALUATE_RULES if row.option not in parsed] == []
