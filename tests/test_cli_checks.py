"""evaluate.py's option values are checked before any work (issue 12, point 3): each bad value gets a
ValueError naming the option and what it accepts, before the output folder, run.json, the black box or the
data are touched."""
from __future__ import annotations

import math
import re

import pytest

import evaluate
from cli_checks import EVALUATE_RULES, Rule, int_in, number_in, problems, validate_args

# A black box that does not exist: were any work started before the checks, this would fail first.
MISSING_BLACKBOX = "ckpt:/nonexistent/blackbox.pt"


def _args(out, *extra: str) -> list[str]:
    return ["--blackbox", MISSING_BLACKBOX, "--data.class_path=datamodules.ClutteredFashionMNISTDataModule",
            "--data.init_args.image_size=32", "--methods=gradient,rise", "--wandb=false", f"--out={out}", *extra]


# (extra arguments, the start of the expected message line)
BAD_VALUES = {
    "methods empty": (["--methods="], "--methods '': must be registry methods, comma-separated, each once (known: "),
    "methods blanks": (["--methods= , "], "--methods ' , ': must be registry methods"),
    "methods unknown": (["--methods=gradient,no_such"], "--methods 'gradient,no_such': unknown method(s) ['no_such']; "
                                                        "must be registry methods"),
    "methods twice": (["--methods=gradient,rise,gradient"],
                      "--methods 'gradient,rise,gradient': gradient listed twice; must be"),
    "num_images 0": (["--num_images=0"], "--num_images 0: must be an int >= 1 (the first N images of the split), "
                                         "or unset for all"),
    "num_images -1": (["--num_images=-1"], "--num_images -1: must be an int >= 1"),
    "split foo": (["--split=foo"], "--split 'foo': must be 'test' or 'val'"),
    "mf_steps 0": (["--mf_steps=0"], "--mf_steps 0: must be an int >= 1"),
    "top_fraction 0": (["--top_fraction=0"], "--top_fraction 0.0: must be a number in (0, 1]"),
    "top_fraction 1.5": (["--top_fraction=1.5"], "--top_fraction 1.5: must be a number in (0, 1]"),
    "pointing_tolerance -1": (["--pointing_tolerance=-1"],
                              "--pointing_tolerance -1.0: must be a distance in pixels >= 0"),
    "iou_threshold 5": (["--iou_threshold=5"], "--iou_threshold 5.0: must be a number in [0, 1]"),
    "overlay_images -3": (["--overlay_images=-3"], "--overlay_images -3: must be an int >= 0"),
    "method_hparams of a method not evaluated": (
        ["--methods=gradient", "--method_hparams={gradcam: {layer: x}}"],
        "--method_hparams {'gradcam': {'layer': 'x'}}: must be keyed by methods this run evaluates with --methods "
        "(gradient); gradcam is not evaluated: drop it"),
    "batch_size 0": (["--batch_size=0"], "--batch_size 0: must be an int >= 1"),
    "num_workers -1": (["--num_workers=-1"], "--num_workers -1: must be an int >= 0"),
    "protocol name": (["--protocol=deletion"], "--protocol 'deletion': must be 'rise', 'igos' or a dict"),
    "protocol field": (["--protocol={steps: 0}"], "--protocol {'steps': 0}: steps must be an int >= 1, got 0; must be "
                                                  "'rise', 'igos' or a dict of valid CausalProtocol fields"),
    "protocol unknown field": (["--protocol={stepz: 4}"], "--protocol {'stepz': 4}: CausalProtocol.__init__() got an "
                                                          "unexpected keyword argument 'stepz'; must be"),
    "target": (["--target=random"], "--target 'random': must be 'predicted' or 'label'"),
    "max_forward_batch 0": (["--max_forward_batch=0"], "--max_forward_batch 0: must be an int >= 1"),
    "seed -1": (["--seed=-1"], "--seed -1: must be an int in [0, 2**31)"),
    "seed 2**31": ([f"--seed={2**31}"], "--seed 2147483648: must be an int in [0, 2**31)"),
    "randomisation_images -1": (["--randomisation_images=-1"], "--randomisation_images -1: must be an int >= 0"),
    "randomisation_fractions decreasing": (["--randomisation_fractions=[0.5, 0.2]"],
                                           "--randomisation_fractions [0.5, 0.2]: must be a non-empty, non-decreasing"),
    "randomisation_fractions 0": (["--randomisation_fractions=[0.0]"], "--randomisation_fractions [0.0]: must be"),
    "num_nodes 0": (["--num_nodes=0"], "--num_nodes 0: must be an int >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_named_before_any_work(tmp_path, case):
    extra, message = BAD_VALUES[case]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="invalid option value") as error:
        evaluate.main(_args(out, *extra))
    assert re.search(r"^  " + re.escape(message), str(error.value), re.MULTILINE), str(error.value)
    assert not out.exists()  # no run.json, no rows: the corrected rerun is not blocked


def test_every_bad_value_is_listed_at_once(tmp_path):
    with pytest.raises(ValueError) as error:
        evaluate.main(_args(tmp_path / "out", "--num_images=0", "--split=foo", "--iou_threshold=5"))
    lines = str(error.value).splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["--split", "--num_images", "--iou_threshold"]


def test_method_hparams_may_name_only_evaluated_methods(tmp_path):
    with pytest.raises(ValueError, match="gradcam, rise are not evaluated: drop them"):
        evaluate.main(_args(tmp_path / "out", "--methods=gradient",
                            "--method_hparams={rise: {n_masks: 8}, gradcam: {}}"))


def test_valid_values_pass(tmp_path):
    """The defaults and the edges of each range are accepted (the checks refuse nothing that would work)."""
    parser = evaluate.build_parser()
    edges = ["--num_images=1", "--mf_steps=1", "--top_fraction=1", "--pointing_tolerance=0", "--iou_threshold=0",
             "--overlay_images=0", "--split=val", "--method_hparams={rise: {n_masks: 8}}", f"--seed={2**31 - 1}",
             "--protocol={units: 4, steps: 4}", "--randomisation_fractions=[0.25, 1.0]", "--target=label"]
    assert problems(parser.parse_args(_args(tmp_path))) == []
    assert problems(parser.parse_args(_args(tmp_path, *edges))) == []
    only_ckpt = parser.parse_args(_args(tmp_path, "--methods=", "--ckpt=[predictor.ckpt]"))
    assert problems(only_ckpt) == []  # a trained explainer alone is an evaluation


def test_a_rule_table_is_plain_data():
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
    assert {row.option for row in EVALUATE_RULES} <= {action.dest for action in evaluate.build_parser()._actions}
