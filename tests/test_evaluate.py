"""evaluate.py end to end: outputs, resume after a kill, 1 vs 2 processes, clear errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from saliency_lab.cli import evaluate
from saliency_lab import explainers
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.lightning_modules.evaluation import check_batch
from saliency_lab.metrics import EvaluationSettings
from tests.conftest import subprocess_env


@pytest.fixture(scope="module")
def tiny_blackbox(tiny_blackbox_path):
    return f"ckpt:{tiny_blackbox_path}"


def args_for(blackbox, out, *extra):
    return ["--blackbox.class_path=saliency_lab.core.blackbox.BlackBox", f"--blackbox.init_args.model={blackbox}",
            "--data.class_path=saliency_lab.datamodules.ClutteredFashionMNISTDataModule",
            "--data.init_args.image_size=32", "--data.init_args.num_test=64", "--num_images=6", "--batch_size=4",
            "--explainers=gradient,rise", "--method_hparams={rise: {n_masks: 32}}", "--settings.mf_steps=8",
            "--settings.protocol={units: 8, steps: 8, deletion_substrate: blur, insertion_substrate: blur, "
            "blur_kernel: 5, blur_sigma: 2.0}", "--overlay_images=3", "--wandb=false", f"--out={out}", *extra]


def test_writes_every_output(tiny_blackbox, tmp_path):
    results = evaluate.main(args_for(tiny_blackbox, tmp_path))
    for name in ("results.json", "results.csv", "summary.md", "curves.png", "overlays.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) >= {"protocol", "blackbox", "data", "num_images", "excluded", "methods"}
    assert saved["num_images"] == 6 and list(saved["methods"]) == ["gradient", "rise"]
    for stats in saved["methods"].values():
        assert set(stats) >= {"deletion", "insertion", "deletion_norm", "insertion_norm", "road_morf", "road_lerf",
                              "road_gap", "mf", "mf_normalized", "mi", "pointing_game", "iou", "f1",
                              "seconds_per_image", "forwards_per_image", "backwards_per_image"}
        assert 0 <= stats["deletion"] <= 1 and 0 <= stats["insertion"] <= 1 and 0 <= stats["mi"] <= 100
        assert 0 <= stats["road_morf"] <= 1 and 0 <= stats["road_lerf"] <= 1
        assert abs(stats["road_gap"] - (stats["road_lerf"] - stats["road_morf"])) < 1e-6
    assert saved["methods"]["rise"]["forwards_per_image"] == 32
    assert saved["methods"]["gradient"]["backwards_per_image"] >= 1
    assert saved["protocol"]["protocol"]["units"] == 8
    assert set(saved["excluded"]["deletion_norm_degenerate"]) == {"gradient", "rise"}
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 * 2 and lines[0].startswith("index,method,label,target,deletion")
    assert "| rise |" in (tmp_path / "summary.md").read_text()
    assert "road_morf | road_lerf | road_gap" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "agreement.json").exists()  # two methods: no ranking to agree on
    assert saved["protocol"]["road_fractions"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_model_randomisation_check_is_written_and_reused(tiny_blackbox, tmp_path, monkeypatch):
    args = args_for(tiny_blackbox, tmp_path, "--randomisation_images=3", "--randomisation_fractions=[0.5, 1.0]")
    evaluate.main(args)
    saved = json.loads((tmp_path / "randomisation.json").read_text())
    assert saved["settings"]["images"] == 3
    by_key = {(r["explainer"], r["fraction"]): r for r in saved["rows"]}
    assert set(by_key) == {(m, f) for m in ("gradient", "rise") for f in (0.0, 0.5, 1.0)}
    assert by_key[("gradient", 0.0)]["spearman"] == pytest.approx(1.0)  # deterministic: unchanged at step 0
    assert len(by_key[("rise", 1.0)]["per_image"]) == 3 and by_key[("rise", 1.0)]["layers"] > 0
    assert "## Model randomisation" in (tmp_path / "summary.md").read_text()

    from saliency_lab.lightning_modules import evaluation as evaluation_module

    monkeypatch.setattr(evaluation_module, "randomisation_rows", lambda *a, **k: pytest.fail("not reused"))
    evaluate.main(args)  # same settings: the saved rows are reused
    assert (tmp_path / "summary.md").read_text().count("## Model randomisation") == 1
    assert json.loads((tmp_path / "randomisation.json").read_text()) == saved


def test_rerun_skips_finished_pairs_and_extends(tiny_blackbox, tmp_path):
    evaluate.main(args_for(tiny_blackbox, tmp_path, "--explainers=gradient", "--method_hparams={}"))
    rows_before = (tmp_path / "rows" / "rows-rank0.jsonl").read_text().count("\n")
    evaluate.main(args_for(tiny_blackbox, tmp_path))  # adds rise, keeps gradient's rows
    rows = [json.loads(line) for line in (tmp_path / "rows" / "rows-rank0.jsonl").read_text().splitlines()]
    assert rows_before == 6 and len(rows) == 12
    assert sum(r["method"] == "gradient" for r in rows) == 6


@pytest.fixture
def explained(monkeypatch):
    """Method name -> images explained, counted at the explainer contract."""
    counts: dict[str, int] = {}
    original = explainers.Explainer.__call__

    def counting(self, images, *args, **kwargs):
        counts[self.name] = counts.get(self.name, 0) + images.shape[0]
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(explainers.Explainer, "__call__", counting)
    return counts


def _rise(n_masks):
    return f"--method_hparams={{rise: {{n_masks: {n_masks}}}}}"


def test_rerun_with_other_hyper_parameters_recomputes_exactly_their_rows(tiny_blackbox, tmp_path, explained,
                                                                         capsys):
    """A user's story: RISE with n_masks 8, then 32 into the same --out. Before, the old
    rows were reused and forwards_per_image mixed both; now RISE's rows are computed again, gradient's reused,
    and the run says so only for what it does compute again."""
    first = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=4", _rise(8)))
    assert explained == {"gradient": 4, "rise": 4}
    explained.clear()
    capsys.readouterr()
    results = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=4", _rise(32)))
    assert explained == {"rise": 4}  # the unrelated method is not computed again
    said = capsys.readouterr().out
    assert "the rows of 'rise' on 4 images are computed again" in said and "n_masks: 8 -> 32" in said
    assert "'gradient'" not in said
    assert results["methods"]["rise"]["forwards_per_image"] == 32 and results["num_images"] == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    rise = saved["methods_hparams"]["rise"]  # the full resolved hyper-parameters, defaults included
    assert rise["n_masks"] == 32 and rise["grid_size"] == 7 and rise["seed"] == 0
    assert saved["methods_hparams"]["gradient"]["channel_reduction"] == "abs_max"
    assert len(saved["blackbox_sha256"]) == 64 and torch.__version__.startswith(saved["versions"]["torch"])
    assert "git_commit" in saved and saved["row_keys"]["rise"] != saved["row_keys"]["gradient"]
    rows = [json.loads(line) for line in (tmp_path / "rows" / "rows-rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and saved["row_keys"]["gradient"] == first["row_keys"]["gradient"]
    assert sorted(r["key"] for r in rows if r["method"] == "rise") == sorted(
        [first["row_keys"]["rise"]] * 4 + [saved["row_keys"]["rise"]] * 4)
    explained.clear()
    capsys.readouterr()
    back = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=4", _rise(8)))  # n_masks 8 rows kept
    assert explained == {} and back["methods"]["rise"]["forwards_per_image"] == 8
    assert "computed again" not in capsys.readouterr().out  # run.json said n_masks 32, but every row is there


def test_rerun_with_a_retrained_blackbox_at_the_same_path_recomputes(tiny_blackbox_path, tmp_path, explained):
    path = tmp_path / "blackbox.pt"
    shutil.copy(tiny_blackbox_path, path)
    out = tmp_path / "out"
    first = evaluate.main(args_for(f"ckpt:{path}", out, "--num_images=3", "--explainers=gradient", "--method_hparams={}"))
    record = torch.load(path, weights_only=True)  # "retrained": other weights, same architecture, same path
    record["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    torch.save(record, path)
    explained.clear()
    second = evaluate.main(args_for(f"ckpt:{path}", out, "--num_images=3", "--explainers=gradient", "--method_hparams={}"))
    assert explained == {"gradient": 3}
    assert second["blackbox_sha256"] != first["blackbox_sha256"] and second["blackbox"] == first["blackbox"]


def test_rerun_with_a_retrained_checkpoint_at_the_same_path_recomputes(tiny_blackbox, tiny_predictor_path, tmp_path,
                                                                      explained):
    path = tmp_path / "predictor.ckpt"
    shutil.copy(tiny_predictor_path, path)
    args = ["--num_images=2", "--explainers=gradient", "--method_hparams={}", f"--ckpt_path=[{path}]"]
    first = evaluate.main(args_for(tiny_blackbox, tmp_path / "out", *args))
    (name,) = set(first["methods"]) - {"gradient"}
    checkpoint = torch.load(path, weights_only=True)
    weight = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("net.") and v.is_floating_point())
    checkpoint["state_dict"][weight] = checkpoint["state_dict"][weight] * 1.5
    torch.save(checkpoint, path)
    explained.clear()
    second = evaluate.main(args_for(tiny_blackbox, tmp_path / "out", *args))
    assert explained == {name: 2}
    assert second["checkpoints"][name]["sha256"] != first["checkpoints"][name]["sha256"]


def test_torn_last_row_then_resume_keeps_every_row(tiny_blackbox, tmp_path, explained):
    """A kill during an append leaves half a line; the resumed run must not glue its next row onto it."""
    evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=4", "--explainers=gradient", "--method_hparams={}"))
    path = tmp_path / "rows" / "rows-rank0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # rows 2 and 3 lost, row 2 torn
    explained.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=4", "--explainers=gradient", "--method_hparams={}"))
    assert explained == {"gradient": 2} and results["num_images"] == 4  # before: 3, row 2 glued onto the torn line
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line readable
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    assert any("torn last line" in str(w.message) for w in caught)


def test_second_run_on_the_same_out_is_refused(tiny_blackbox, tmp_path):
    from saliency_lab.core.files import FolderBusyError, FolderLock

    with FolderLock(tmp_path):  # another evaluate.py holds the folder
        with pytest.raises(FolderBusyError, match=rf"{tmp_path} is in use by another .*pid {os.getpid()}"):
            evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=2", "--explainers=gradient", "--method_hparams={}"))
    assert not (tmp_path / "rows").exists()
    evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=2", "--explainers=gradient", "--method_hparams={}"))  # free again


def test_unknown_method_lists_the_known_ones(tiny_blackbox, tmp_path):
    with pytest.raises(ValueError, match=r"unknown method.*known: .*gradcam"):
        evaluate.main(args_for(tiny_blackbox, tmp_path, "--explainers=gradient,no_such_method"))


@pytest.mark.parametrize("alias", ["../x", "ABSOLUTE", "", ".hidden", "a|b", "x" * 101])
def test_an_alias_that_is_not_a_file_name_is_refused_before_anything_is_touched(tiny_blackbox, tmp_path, alias):
    """An alias becomes OUT/maps/ALIAS (and a rerun deletes that folder when its settings changed): a path is
    refused by validate_args, before OUT is created, and nothing outside OUT is created or deleted."""
    victim = tmp_path / "x"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    alias = str(victim) if alias == "ABSOLUTE" else alias
    out = tmp_path / "out" / "run"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    spec = f"--explainers=[{{name: gradient, alias: {json.dumps(alias)}}}]"
    with pytest.raises(ValueError, match=r"--explainers .*explainer alias .* cannot name a file") as caught:
        evaluate.main(args_for(tiny_blackbox, out, spec, "--method_hparams={}"))
    assert repr(alias) in str(caught.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and (victim / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"--ckpt_path .*method NAME '\.\.x' cannot name a file"):
        evaluate.main(args_for(tiny_blackbox, out, "--explainers=gradient", "--method_hparams={}",
                               f"--ckpt_path=[..x={victim / 'keep.txt'}]"))
    assert not out.parent.exists()


def test_bad_images_are_named():
    good = torch.rand(3, 3, 8, 8)
    check_batch(good, torch.arange(3))
    nan = good.clone()
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf.*\[11\]"):
        check_batch(nan, torch.tensor([10, 11, 12]))
    bright = good.clone()
    bright[2] += 1.5
    with pytest.raises(ValueError, match=r"outside \[0,1\].*\[12\]"):
        check_batch(bright, torch.tensor([10, 11, 12]))


def _run(args, **kwargs):
    return subprocess.Popen([sys.executable, "evaluate.py", *args], env=subprocess_env(), **kwargs)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tiny_blackbox, tmp_path, repo_root):
    extra = ["--num_images=12", "--batch_size=2", "--method_hparams={rise: {n_masks: 256}}"]
    reference = tmp_path / "reference"
    evaluate.main(args_for(tiny_blackbox, reference, *extra))  # uninterrupted: in this process (only the kill needs
    # a child); the killed run is stopped after 6 of its 24 rows

    killed = tmp_path / "killed"
    proc = _run(args_for(tiny_blackbox, killed, *extra), cwd=repo_root, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    rows = killed / "rows" / "rows-rank0.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and (not rows.exists() or rows.read_text().count("\n") < 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it was killed"
    assert _run(args_for(tiny_blackbox, killed, *extra), cwd=repo_root).wait(timeout=600) == 0
    first = json.loads((reference / "results.json").read_text())
    second = json.loads((killed / "results.json").read_text())
    for method, stats in first["methods"].items():
        for key, value in stats.items():
            if value is None:
                assert second["methods"][method][key] is None, (method, key)
            elif key != "seconds_per_image":
                assert second["methods"][method][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (method, key)


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tiny_blackbox, tmp_path, repo_root):
    one, two = tmp_path / "one", tmp_path / "two"
    check = ["--randomisation_images=5", "--randomisation_fractions=[0.5, 1.0]"]  # in the Trainer stage, sharded
    evaluate.main(args_for(tiny_blackbox, one, *check))  # one process: this one
    assert _run(args_for(tiny_blackbox, two, *check, "--trainer=configs/trainer/cpu_ddp.yaml"),
                cwd=repo_root).wait(timeout=600) == 0
    assert {p.name for p in (two / "randomisation").iterdir()} == {"rows-rank0.jsonl", "rows-rank1.jsonl"}
    table_one = json.loads((one / "randomisation.json").read_text())["rows"]
    table_two = json.loads((two / "randomisation.json").read_text())["rows"]
    assert [(r["explainer"], r["fraction"], r["images"]) for r in table_two] == \
        [(r["explainer"], r["fraction"], 5) for r in table_one]
    for a_row, b_row in zip(table_one, table_two):
        assert b_row["per_image"] == pytest.approx(a_row["per_image"], abs=1e-4, nan_ok=True), a_row["explainer"]
        assert b_row["spearman"] == pytest.approx(a_row["spearman"], abs=1e-4, nan_ok=True)
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert a["num_images"] == b["num_images"] == 6
    for method, stats in a["methods"].items():
        # (M_F is undefined on this untrained black box: q_O ~ q_F, every image excluded)
        for key in ("deletion", "insertion", "mi", "pointing_game", "iou", "f1", "forwards_per_image"):
            assert stats[key] is not None, (method, key)
            assert b["methods"][method][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), (method, key)


def test_checkpoint_that_is_no_explainer_is_refused(tiny_blackbox, tmp_path):
    path = tiny_blackbox.removeprefix("ckpt:")
    with pytest.raises(ValueError, match="not a trained-explainer checkpoint"):
        evaluate.main(args_for(tiny_blackbox, tmp_path, f"--ckpt_path=[{path}]"))


def test_wandb_tables_and_images_are_logged(tiny_blackbox, tmp_path, monkeypatch):
    from saliency_lab.cli.utils import WandbLogger

    logged = {}
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, key, columns, data: logged.setdefault(key, (columns, data)))
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, **kw: logged.setdefault(key, images))
    evaluate.main([*args_for(tiny_blackbox, tmp_path), "--wandb=true"])
    columns, data = logged["evaluation/rows"]
    assert columns[:2] == ["index", "method"] and len(data) == 12
    assert [row[0] for row in logged["evaluation/summary"][1]] == ["gradient", "rise"]
    assert [str(p).rsplit("/", 1)[-1] for p in logged["evaluation/figures"]] == ["curves.png", "overlays.png"]


EVALUATE_CONFIGS = sorted(path.name for path in (Path(__file__).parents[1] / "configs" / "evaluate").glob("*.yaml"))


@pytest.mark.parametrize("config", EVALUATE_CONFIGS)
def test_every_evaluate_config_parses_into_its_objects(repo_root, config):
    """Each configs/evaluate/ config (the README's commands) parses, with a configs/trainer/*.yaml on top, into a
    black box spec, explainer specs the registry knows and a protocol that resolves."""
    cfg = evaluate.build_parser().parse_args(["--config", str(repo_root / "configs" / "evaluate" / config),
                                              "--trainer", str(repo_root / "configs" / "trainer" / "cpu_ddp.yaml")])
    assert cfg.blackbox.class_path == "saliency_lab.core.blackbox.BlackBox" and cfg.blackbox.init_args.model
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp"
    specs = evaluate.explainer_specs(cfg)
    assert len(specs) >= 2 and all(explainers.parse_spec(s).name in explainers.available() for s in specs)
    settings = EvaluationSettings(**cfg.settings.as_dict()).resolve(64, target=cfg.target)
    assert settings.protocol.target == cfg.target and settings.protocol.steps >= 1


def test_saved_maps_are_scored_under_another_protocol(tiny_blackbox, tmp_path):
    """--save_maps then --maps_from: the second run explains nothing again, reports the first run's cost, and
    gives exactly what explaining anew under that protocol gives."""
    first, second, direct = tmp_path / "first", tmp_path / "second", tmp_path / "direct"
    evaluate.main(args_for(tiny_blackbox, first, "--save_maps=true"))
    assert len(list((first / "maps" / "rise").glob("*.pt"))) == 6
    other = "--settings.protocol={units: pixel, steps: 4, deletion_substrate: mean, insertion_substrate: blur, blur_kernel: 3, blur_sigma: 1.0}"
    calls = []
    original = explainers.Explainer.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    explainers.Explainer.__call__ = counting
    try:
        reused = evaluate.main(args_for(tiny_blackbox, second, other, f"--maps_from={first}"))
    finally:
        explainers.Explainer.__call__ = original
    assert calls == []  # every map came from the first run
    fresh = evaluate.main(args_for(tiny_blackbox, direct, other))
    for method in ("gradient", "rise"):
        for key in ("deletion", "insertion", "mi", "forwards_per_image", "backwards_per_image"):
            assert reused["methods"][method][key] == pytest.approx(fresh["methods"][method][key]), (method, key)
    # other hyper-parameters: nothing is reused
    changed = evaluate.main(args_for(tiny_blackbox, tmp_path / "changed", "--method_hparams={rise: {n_masks: 16}}",
                                     f"--maps_from={first}"))
    assert changed["methods"]["rise"]["forwards_per_image"] == 16


def test_predictor_claims_over_training_seeds_is_runnable(repo_root, monkeypatch, capsys):
    """experiments/predictor_claims.py: its evaluate.py and train.py commands parse, and its table is mean ± sd."""
    from saliency_lab.cli import train
    from experiments.predictor_claims import CLI, evaluate_command, seed_table, train_command

    monkeypatch.chdir(repo_root)
    command = evaluate_command(1, Path("outputs/x"), 20)
    assert command[:len(CLI) + 1] == [*CLI, "evaluate"]
    cfg = evaluate.build_parser().parse_args(command[len(CLI) + 1:])
    specs = evaluate.explainer_specs(cfg)
    assert [s if isinstance(s, str) else s["name"] for s in specs] == [
        "gradcam", "predictor_ct", "predictor_ct_posthoc", "predictor_bt", "mgnet"]
    assert specs[3]["checkpoint"] == "outputs/x/seed1/bt/checkpoints/last.ckpt" and cfg.num_images == 20
    assert cfg.blackbox.init_args.precision == "32"  # float32 passes on every CPU: seeds of other machines mix
    command = train_command("bt", 2, Path("outputs/x"), Path("filter.ckpt"))
    assert command[:len(CLI) + 1] == [*CLI, "fit"]
    monkeypatch.setattr(sys, "argv", ["saliency-lab"])  # as the command line of saliency-lab fit would be
    capsys.readouterr()
    with pytest.raises(SystemExit) as printed_and_exited:  # --print_config prints, then exits: nothing is built
        train.main([*command[len(CLI):], "--print_config"])
    out, err = capsys.readouterr()
    assert printed_and_exited.value.code in (0, None), err[-2000:]
    printed = yaml.safe_load(out)
    assert printed["seed_everything"] == 2 and printed["model"]["init_args"]["draw_seed"] == 2
    assert printed["data"]["init_args"]["seed"] == 0  # the scenes stay the same for every training seed
    table = seed_table([{"methods": {"a": {"deletion": 0.1, "mf": 20.0}}},
                        {"methods": {"a": {"deletion": 0.3, "mf": None}}}], keys=("deletion", "mf"))
    assert table == {"a": {"deletion": "0.200 ± 0.141", "mf": "20.0"}}


def test_predictor_claims_controller_kinds_train_the_papers_settings_and_pair_seed_averages(
        repo_root, monkeypatch, capsys):
    """The controllers' study of predictor_claims: each kind's training config carries its setting, the evaluation
    names every kind's explainer under its alias, CT post hoc on MGnet reads the MGnet run, and --compare pairs the
    seed-averaged per-image scores."""
    from saliency_lab.cli import train
    from experiments.predictor_claims import CLI, KINDS, compared, evaluate_command, train_command

    monkeypatch.chdir(repo_root)
    kinds = ["ct", "mgnet", "ct_h2.5", "mgnet_area8", "square", "mgnet_ct_posthoc"]
    cfg = evaluate.build_parser().parse_args(evaluate_command(0, Path("outputs/x"), 8, kinds)[len(CLI) + 1:])
    specs = {s if isinstance(s, str) else s.get("alias", s["name"]): s for s in evaluate.explainer_specs(cfg)}
    assert list(specs) == ["gradcam", "predictor_ct", "predictor_ct_posthoc", "mgnet", "predictor_ct_h2.5",
                           "mgnet_area8", "predictor_square", "mgnet_ct_posthoc"]
    assert specs["predictor_ct_h2.5"]["name"] == "predictor_ct"
    assert specs["mgnet_ct_posthoc"]["checkpoint"] == specs["mgnet"]["checkpoint"] == \
        "outputs/x/seed0/mgnet/checkpoints/last.ckpt"
    assert KINDS["mgnet_ct_posthoc"].config is None
    monkeypatch.setattr(sys, "argv", ["saliency-lab"])
    printed = {}
    for kind in ("ct_h2.5", "mgnet_area8", "square"):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            train.main([*train_command(kind, 1, Path("outputs/x"), Path("filter.ckpt"))[len(CLI):], "--print_config"])
        printed[kind] = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert printed["ct_h2.5"]["h"] == 2.5 and printed["ct_h2.5"]["mode"] == "ct"
    assert printed["square"]["mode"] == "square"
    area = [o for o in printed["mgnet_area8"]["objectives"] if o["class_path"].endswith(".Area")]
    assert area[0]["init_args"]["weight"] == 8.0 and printed["mgnet_area8"]["mode"] == "mgnet"
    rows = lambda a, b: [{"index": i, "method": m, "deletion": v + 0.01 * i}  # noqa: E731
                         for i in range(6) for m, v in (("a", a), ("b", b))]
    diff = compared([rows(0.3, 0.1), rows(0.5, 0.1)], "a", "b", resamples=50)
    assert diff["deletion"]["mean"] == pytest.approx(0.3) and diff["deletion"]["images"] == 6
    from experiments.predictor_claims import same_evaluation
    results = {"methods": {"a": {"images": 200}, "b": {"images": 200}}, "passes": {"blackbox_precision": "32"}}
    assert same_evaluation(results, {"a", "b"}, 200)
    assert not same_evaluation(results, {"a", "b"}, 500) and not same_evaluation(results, {"a"}, 200)
    # an evaluation whose passes ran at precision "auto" (bf16 on some CPUs) is not the claims' float32 one
    assert not same_evaluation({**results, "passes": {"blackbox_precision": "auto"}}, {"a", "b"}, 200)


def test_predictor_claims_lambda_grid_moves_one_weight_per_kind(repo_root, monkeypatch, capsys):
    """--kinds lambda_grid: every grid kind's training config is its base model's loss with exactly one constraint
    weight changed (CT: the classification loss plus that one term; MGnet: Eq. 2 with that one weight moved), and
    the group names expand to their kinds in the evaluation."""
    from saliency_lab.cli import train
    from experiments.predictor_claims import CLI, GROUPS, KINDS, LAMBDA_GRID, evaluate_command, train_command
    from saliency_lab.lightning_modules.objectives import default_objectives

    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["saliency-lab"])
    terms = {"area": "Area", "tv": "Smoothness", "bg": "Destruction"}
    mgnet = {"Preservation": 0.3, "Area": 1.0, "Smoothness": 0.5, "Destruction": 1.0}  # the embedded MGnet's
    for kind in (*LAMBDA_GRID, "ct_eta3"):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            train.main([*train_command(kind, 1, Path("outputs/x"), Path("filter.ckpt"))[len(CLI):], "--print_config"])
        model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
        objectives = model["objectives"] or [o.config() for o in default_objectives(model["mode"])]
        weights = {o["class_path"].rsplit(".", 1)[-1]: o["init_args"]["weight"] for o in objectives}
        if kind == "ct_eta3":
            assert model["eta"] == 3.0 and model["mode"] == "ct" and weights == {"Preservation": 1.0}
            continue
        base, setting = kind.split("_", 1)
        term = next(t for t in terms if setting.startswith(t))
        value = float(setting[len(term):])
        if base == "ct":
            assert model["mode"] == "ct" and weights == {"Preservation": 1.0, terms[term]: value}
        else:
            expected = {**mgnet, terms[term]: value}
            assert model["mode"] == "mgnet"
            assert weights == {k: v for k, v in expected.items() if v > 0}, kind
    cfg = evaluate.build_parser().parse_args(evaluate_command(0, Path("outputs/x"), 8, GROUPS["lambda_grid"])[len(CLI) + 1:])
    aliases = [s if isinstance(s, str) else s.get("alias", s["name"]) for s in evaluate.explainer_specs(cfg)]
    assert {"predictor_ct_area0.1", "mgnet_bg3", "mgnet_area8", "predictor_ct"} <= set(aliases)
    assert len(aliases) == len(set(aliases)) == 1 + 2 + 1 + 1 + len(LAMBDA_GRID)  # gradcam, ct (+ post hoc), mgnet(s)
    assert all(KINDS[k].config and (repo_root / KINDS[k].config).is_file() for k in (*LAMBDA_GRID, "ct_eta3"))


def test_predictor_claims_links_the_demos_finished_seed0_runs_only(tmp_path, monkeypatch):
    from experiments import predictor_claims

    monkeypatch.setattr(predictor_claims, "ROOT", tmp_path)
    demo = tmp_path / predictor_claims.KINDS["ct"].demo_run
    demo.mkdir(parents=True)
    assert not predictor_claims.link_demo_run("ct", Path("out"))  # the demo's run has not finished
    (demo / "fit_metrics.json").write_text("{}")
    assert predictor_claims.link_demo_run("ct", Path("out"))
    assert (tmp_path / "out" / "seed0" / "ct" / "fit_metrics.json").is_file()
    assert not predictor_claims.link_demo_run("ct", Path("out"))  # linked already
    assert not predictor_claims.link_demo_run("ct_h2.5", Path("out"))  # not a demo run


def test_rerun_at_another_black_box_precision_recomputes_and_records_the_passes(tiny_blackbox, tmp_path, explained):
    """Rows of one pass precision are never reused, nor averaged, under another: the black box's precision
    setting, channels_last, the effective pass dtypes on this device and the Trainer's precision are part of
    each map's key, and results.json says what they were and on which machine."""
    first = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=3", "--explainers=gradient",
                                   "--method_hparams={}", "--blackbox.init_args.precision=auto"))
    assert explained == {"gradient": 3}
    explained.clear()
    second = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=3", "--explainers=gradient",
                                    "--method_hparams={}", "--blackbox.init_args.precision=32"))
    assert explained == {"gradient": 3}  # computed again, although float32 is also what auto means off bf16 hardware
    assert second["row_keys"]["gradient"] != first["row_keys"]["gradient"]
    explained.clear()
    third = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=3", "--explainers=gradient",
                                   "--method_hparams={}", "--blackbox.init_args.precision=32",
                                   "--blackbox.init_args.channels_last=false"))
    assert explained == {"gradient": 3} and third["row_keys"]["gradient"] != second["row_keys"]["gradient"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["passes"] == {"blackbox_precision": "32", "channels_last": False, "plain_pass_dtype": "float32",
                               "fast_pass_dtype": "float32", "trainer_precision": "32-true"}
    assert saved["machine"]["cpu"] and saved["machine"]["device"] == "cpu" and "cpu_bf16_native" in saved["machine"]
    assert saved["methods"]["gradient"]["images"] == 3  # the rows of the other settings are not mixed in


def test_pass_settings_name_the_effective_dtypes(tiny_blackbox_path, monkeypatch):
    """``auto`` is bf16 inside ``fast`` where the device computes bf16 natively, float32 elsewhere: the key
    follows the hardware, so an AMX machine's rows and a machine without bf16 are keyed apart."""
    from saliency_lab.core import blackbox as blackbox_module

    box = BlackBox(f"ckpt:{tiny_blackbox_path}", precision="auto")
    for native, fast in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(blackbox_module, "native_bf16", lambda device, native=native: native)
        passes = evaluate.pass_settings(box, "cpu", "32-true")
        assert passes["fast_pass_dtype"] == fast and passes["plain_pass_dtype"] == "float32"


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "64-true", "bf16-true"])
def test_trainer_precisions_the_methods_cannot_honour_are_refused_before_any_work(tiny_blackbox, tmp_path, precision):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"--trainer.precision={precision} is not supported.*blackbox.init_args"):
        evaluate.main(args_for(tiny_blackbox, out, f"--trainer.precision={precision}"))
    assert not out.exists()


def test_the_trainer_precision_evaluate_honours_runs(tiny_blackbox, tmp_path):
    results = evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=2", "--explainers=gradient",
                                     "--method_hparams={}", "--trainer.precision=32-true"))
    assert results["methods"]["gradient"]["images"] == 2 and results["passes"]["trainer_precision"] == "32-true"


def test_three_methods_or_more_get_the_metric_agreement(tiny_blackbox, tmp_path):
    """Kendall's W and the metric x metric Spearman table of the evaluated methods, as JSON, Markdown and a figure."""
    evaluate.main(args_for(tiny_blackbox, tmp_path, "--num_images=4", "--explainers=gradient,rise,gradcam"))
    agreement = json.loads((tmp_path / "agreement.json").read_text())
    assert agreement["methods"] == ["gradient", "rise", "gradcam"] and agreement["images"] == 4
    assert 0.0 <= agreement["w_of_means"] <= 1.0 and agreement["spearman"]["deletion"]["deletion"] == 1.0
    assert "Kendall's W" in (tmp_path / "agreement.md").read_text()
    assert (tmp_path / "agreement.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_and_explain_default_to_a_gpu_where_one_is_visible():
    from saliency_lab.cli import explain

    assert evaluate.build_parser().get_defaults().trainer.accelerator == "auto"
    assert explain.build_parser().get_defaults().accelerator == "auto"
    assert evaluate.evaluation_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert evaluate.evaluation_device("gpu").type == "cuda" and evaluate.evaluation_device("cpu").type == "cpu"


def test_predictor_claims_store_keeps_a_finished_seed_and_reads_it_back_untrained(tmp_path, monkeypatch, capsys):
    """--store: a seed evaluated here is stored (its results.json and the reported rows without curves), and a later
    run with the same methods and image count reads it instead of training or evaluating; another image count is
    not read from the store."""
    from experiments import predictor_claims

    monkeypatch.setattr(predictor_claims, "ROOT", tmp_path)
    evaluation = tmp_path / "out" / "seed1" / "evaluation"
    (evaluation / "rows").mkdir(parents=True)
    (tmp_path / "out" / "seed1" / "ct").mkdir()
    (tmp_path / "out" / "seed1" / "ct" / "fit_metrics.json").write_text('{"val/loss": 0.5}')
    methods = ["gradcam", "predictor_ct", "predictor_ct_posthoc"]
    rows = [{"index": i, "method": m, "key": "new", "deletion": 0.1 * i + j, "deletion_curve": [1.0, 0.5]}
            for i in range(4) for j, m in enumerate(methods)]
    stale = {"index": 0, "method": "gradcam", "key": "old", "deletion": 9.0, "deletion_curve": [1.0]}
    (evaluation / "rows" / "rows-rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [stale, *rows]))
    (evaluation / "run.json").write_text(json.dumps({"row_keys": {m: "new" for m in methods}}))
    results = {"methods": {m: {"images": 3, "deletion": 0.1} for m in methods}, "passes": {"blackbox_precision": "32"}}
    (evaluation / "results.json").write_text(json.dumps(results))
    folder = predictor_claims.store_seed(Path("store"), 1, Path("out"), ["ct", "mgnet"])
    assert folder == tmp_path / "store" / "seed1"
    assert json.loads((folder / "fits.json").read_text()) == {"ct": {"val/loss": 0.5}}
    kept = predictor_claims.stored_seed(Path("store"), 1, set(methods), 3)
    assert kept is not None and kept[0] == results
    assert sorted((r["index"], r["method"]) for r in kept[1]) == sorted((i, m) for i in range(3) for m in methods)
    assert all("deletion_curve" not in r and r["key"] == "new" for r in kept[1])  # no curves, no stale row
    assert predictor_claims.stored_seed(Path("store"), 1, set(methods), 500) is None
    assert predictor_claims.reported_rows(Path("out/seed1/evaluation"), 4)[0]["key"] == "new"  # not the stale row
    assert predictor_claims.stored_seed(Path("store"), 1, {"gradcam"}, 3) is None
    assert predictor_claims.stored_seed(Path("store"), 2, set(methods), 3) is None
    # a run of the stored seed trains nothing, evaluates nothing and needs no filter checkpoint
    ran = []
    monkeypatch.setattr(predictor_claims, "run", lambda cmd, dry_run: ran.append(cmd))
    table = predictor_claims.main(["--seeds", "1", "--kinds", "ct", "--num_images", "3", "--store", "store",
                                   "--filter", "missing.ckpt", "--compare", "predictor_ct-gradcam"])
    assert ran == [] and table["predictor_ct"]["deletion"] == "0.100"
    assert "predictor_ct - gradcam" in capsys.readouterr().out
