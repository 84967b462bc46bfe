"""evaluate.py end to end: outputs, resume after a kill, 1 vs 2 processes, clear errors."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
from lightning_modules.evaluation import check_batch
from tests.conftest import subprocess_env



@pytest.fixture(scope="module")
def tiny_blackbox(tiny_blackbox_path):
    return f"ckpt:{tiny_blackbox_path}"


def args_for(blackbox, out, *extra):
    return ["--blackbox", blackbox, "--data.class_path=datamodules.ClutteredFashionMNISTDataModule",
            "--data.init_args.image_size=32", "--data.init_args.num_test=64", "--num_images=6", "--batch_size=4",
            "--methods=gradient,rise", "--method_hparams={rise: {n_masks: 32}}", "--mf_steps=8",
            "--protocol={units: 8, steps: 8, deletion_substrate: blur, insertion_substrate: blur, blur_kernel: 5,"
            " blur_sigma: 2.0}", "--overlay_images=3", "--wandb=false", f"--out={out}", *extra]


def test_writes_every_output(tiny_blackbox, tmp_path):
    results = evaluate.main(args_for(tiny_blackbox, tmp_path))
    for name in ("results.json", "results.csv", "summary.md", "curves.png", "overlays.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) >= {"protocol", "blackbox", "data", "num_images", "excluded", "methods"}
    assert saved["num_images"] == 6 and list(saved["methods"]) == ["gradient", "rise"]
    for stats in saved["methods"].values():
        assert set(stats) >= {"deletion", "insertion", "mf", "mf_normalized", "mi", "pointing_game", "iou", "f1",
                              "seconds_per_image", "forwards_per_image", "backwards_per_image"}
        assert 0 <= stats["deletion"] <= 1 and 0 <= stats["insertion"] <= 1 and 0 <= stats["mi"] <= 100
    assert saved["methods"]["rise"]["forwards_per_image"] == 32
    assert saved["methods"]["gradient"]["backwards_per_image"] >= 1
    assert saved["protocol"]["protocol"]["units"] == 8
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 * 2 and lines[0].startswith("index,method,label,target,deletion")
    assert "| rise |" in (tmp_path / "summary.md").read_text()


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

    import callbacks.sanity

    monkeypatch.setattr(callbacks.sanity, "model_randomisation", lambda *a, **k: pytest.fail("not reused"))
    evaluate.main(args)  # same settings: the saved check is reused
    assert (tmp_path / "summary.md").read_text().count("## Model randomisation") == 1


def test_rerun_skips_finished_pairs_and_extends(tiny_blackbox, tmp_path):
    evaluate.main(args_for(tiny_blackbox, tmp_path, "--methods=gradient", "--method_hparams={}"))
    rows_before = (tmp_path / "rows" / "rows-rank0.jsonl").read_text().count("\n")
    evaluate.main(args_for(tiny_blackbox, tmp_path))  # adds rise, keeps gradient's rows
    rows = [json.loads(line) for line in (tmp_path / "rows" / "rows-rank0.jsonl").read_text().splitlines()]
    assert rows_before == 6 and len(rows) == 12
    assert sum(r["method"] == "gradient" for r in rows) == 6


def test_rerun_with_other_settings_is_refused(tiny_blackbox, tmp_path):
    evaluate.main(args_for(tiny_blackbox, tmp_path, "--methods=gradient", "--method_hparams={}"))
    with pytest.raises(ValueError, match="other settings"):
        evaluate.main(args_for(tiny_blackbox, tmp_path, "--methods=gradient", "--method_hparams={}", "--mf_steps=4"))


def test_unknown_method_lists_the_known_ones(tiny_blackbox, tmp_path):
    with pytest.raises(ValueError, match=r"unknown method.*known: .*gradcam"):
        evaluate.main(args_for(tiny_blackbox, tmp_path, "--methods=gradient,no_such_method"))


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
    extra = ["--num_images=24", "--batch_size=2", "--method_hparams={rise: {n_masks: 256}}"]
    reference = tmp_path / "reference"
    assert _run(args_for(tiny_blackbox, reference, *extra), cwd=repo_root).wait(timeout=600) == 0

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
    assert _run(args_for(tiny_blackbox, one), cwd=repo_root).wait(timeout=600) == 0
    assert _run(args_for(tiny_blackbox, two, "--strategy=ddp", "--devices=2"), cwd=repo_root).wait(timeout=600) == 0
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
        evaluate.main(args_for(tiny_blackbox, tmp_path, f"--ckpt=[{path}]"))


def test_wandb_tables_and_images_are_logged(tiny_blackbox, tmp_path, monkeypatch):
    from cli_utils import WandbLogger

    logged = {}
    monkeypatch.setattr(WandbLogger, "log_table", lambda self, key, columns, data: logged.setdefault(key, (columns, data)))
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, **kw: logged.setdefault(key, images))
    evaluate.main([*args_for(tiny_blackbox, tmp_path), "--wandb=true"])
    columns, data = logged["evaluation/rows"]
    assert columns[:2] == ["index", "method"] and len(data) == 12
    assert [row[0] for row in logged["evaluation/summary"][1]] == ["gradient", "rise"]
    assert [str(p).rsplit("/", 1)[-1] for p in logged["evaluation/figures"]] == ["curves.png", "overlays.png"]
