"""The report: CSV-logger and W&B offline run folders -> Markdown / CSV table with Delta m %, and a chart."""

from __future__ import annotations

import csv
import json

import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_mtl.report import build_rows, find_runs, main
from tests.fixtures.trainers import tiny_module, tiny_multidigits, tiny_trainer


def _csv_run(folder, rows):
    """A CSV logger's metrics.csv: sparse rows, one per log call, blanks elsewhere."""
    folder.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _wandb_run(folder, summary):
    files = folder / "wandb" / "offline-run-20250101_000000-abc123" / "files"
    files.mkdir(parents=True)
    (files / "wandb-summary.json").write_text(json.dumps(summary))


def _fixture(tmp_path):
    # a multi-task run logged by the CSV logger: validation twice, test once at the end
    _csv_run(tmp_path / "pcgrad" / "version_0", [
        {"epoch": 0, "step": 9, "train/seg/loss": 1.0},
        {"epoch": 0, "step": 9, "val/seg/miou": 0.30, "val/depth/abs_err": 0.70},
        {"epoch": 1, "step": 19, "val/seg/miou": 0.36, "val/depth/abs_err": 0.62},
        {"epoch": 1, "step": 19, "test/seg/miou": 0.40, "test/depth/abs_err": 0.55, "test/seg/loss": 0.9,
         "test/mean/loss": 0.8},
    ])  # fmt: skip
    # a multi-task run from W&B offline
    _wandb_run(tmp_path / "mgda", {"test/seg/miou": 0.35, "test/depth/abs_err": 0.50, "_step": 20,
                                   "test/seg/pixel_acc": 0.6, "best": {"nested": 1}})  # fmt: skip
    _csv_run(tmp_path / "single_seg" / "version_0", [{"test/seg/miou": 0.38, "test/seg/pixel_acc": 0.7}])
    _csv_run(tmp_path / "single_depth" / "version_0", [{"test/depth/abs_err": 0.60}])


def test_rows_and_delta_m_by_hand(tmp_path):
    _fixture(tmp_path)
    runs = find_runs(tmp_path / "pcgrad") + find_runs(tmp_path / "mgda")
    assert [r.name for r in runs] == ["pcgrad/version_0", "mgda/wandb/offline-run-20250101_000000-abc123"]
    baselines = find_runs(tmp_path / "single_seg") + find_runs(tmp_path / "single_depth")
    columns, rows = build_rows(runs, baselines)
    assert columns == ["seg/miou", "seg/pixel_acc", "depth/abs_err", "delta_m"]
    pcgrad, mgda = rows[2], rows[3]
    assert pcgrad["seg/miou"] == 0.40 and pcgrad["depth/abs_err"] == 0.55  # test values, losses left out
    # seg: -(0.40 - 0.38) / 0.38 (pixel_acc not logged by this run); depth: (0.55 - 0.60) / 0.60
    assert pcgrad["delta_m"] == pytest.approx(100 * (-(0.02 / 0.38) + (-0.05 / 0.60)) / 2)
    # seg: mean of miou and pixel_acc terms; depth: (0.50 - 0.60) / 0.60
    seg = (-(0.35 - 0.38) / 0.38 - (0.6 - 0.7) / 0.7) / 2
    assert mgda["delta_m"] == pytest.approx(100 * (seg + (-0.1 / 0.6)) / 2)
    assert rows[0]["kind"] == "single-task" and "delta_m" not in rows[0]
    # --stage val reads the last validation values
    _, val_rows = build_rows(find_runs(tmp_path / "pcgrad"), stage="val")
    assert val_rows[0]["seg/miou"] == 0.36 and val_rows[0]["stage"] == "val"


def test_command_writes_markdown_csv_and_png(tmp_path):
    _fixture(tmp_path)
    out = tmp_path / "report"
    paths = main([str(tmp_path / "pcgrad"), str(tmp_path / "mgda"), "--baselines", str(tmp_path / "single_seg"),
                  str(tmp_path / "single_depth"), "--out", str(out)])  # fmt: skip
    markdown = paths["md"].read_text().splitlines()
    assert markdown[0].startswith("| run | kind | stage | seg/miou") and "Delta m %" in markdown[0]
    assert len(markdown) == 2 + 4 and "| pcgrad/version_0 | multi-task | test | 0.4000 |" in markdown[4]
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert float(table[3]["delta_m"]) == pytest.approx(100 * (((0.03 / 0.38) + (0.1 / 0.7)) / 2 - 0.1 / 0.6) / 2)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_on_a_real_csv_logger_run(tmp_path):
    trainer = tiny_trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1,
                           logger=CSVLogger(tmp_path, name="real"))  # fmt: skip
    model, data = tiny_module(), tiny_multidigits()
    trainer.fit(model, data)
    trainer.test(model, data)
    _csv_run(tmp_path / "single" / "version_0", [{"test/left/acc": 0.5, "test/right/acc": 0.5}])
    columns, rows = build_rows(find_runs(tmp_path / "real"), find_runs(tmp_path / "single"))
    real = rows[-1]
    assert columns == ["left/acc", "right/acc", "delta_m"]
    expected = 100 * ((-(real["left/acc"] - 0.5) / 0.5) + (-(real["right/acc"] - 0.5) / 0.5)) / 2
    assert real["delta_m"] == pytest.approx(expected)


def test_errors_and_help(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.csv or a W&B offline run"):
        find_runs(tmp_path)
    _csv_run(tmp_path / "odd", [{"test/t/sharpness": 1.0}])
    _csv_run(tmp_path / "odd_single", [{"test/t/sharpness": 2.0}])
    with pytest.raises(ValueError, match="--higher sharpness"):
        build_rows(find_runs(tmp_path / "odd"), find_runs(tmp_path / "odd_single"))
    _, rows = build_rows(find_runs(tmp_path / "odd"), find_runs(tmp_path / "odd_single"), extra_higher=["sharpness"])
    assert rows[1]["delta_m"] == pytest.approx(50.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--baselines" in capsys.readouterr().out


def test_the_package_entry_dispatches_report(tmp_path):
    """`python -m lightning_mtl report ...` reaches the report, every other first word the Lightning CLI."""
    import subprocess
    import sys

    _fixture(tmp_path)
    out = tmp_path / "entry"
    done = subprocess.run([sys.executable, "-m", "lightning_mtl", "report", str(tmp_path / "pcgrad"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "report.md").read_text().startswith("| run |")


def test_chart_reads_close_values_labels_them_and_names_every_row_apart(tmp_path):
    """Two runs 0.9475 and 0.961 apart on the axis, value labels, axis labels, a legend, and rows from different
    folders that share `quickstart/version_0` told apart by their parent folders."""
    _csv_run(tmp_path / "a" / "quickstart" / "version_0", [{"test/left/acc": 0.9475}])
    _csv_run(tmp_path / "b" / "quickstart" / "version_0", [{"test/left/acc": 0.961}])
    _csv_run(tmp_path / "single" / "quickstart" / "version_0", [{"test/left/acc": 0.95}])
    runs = find_runs(tmp_path / "a" / "quickstart") + find_runs(tmp_path / "b" / "quickstart")
    columns, rows = build_rows(runs, find_runs(tmp_path / "single" / "quickstart"))
    names = [r["run"] for r in rows]
    assert len(set(names)) == len(names) == 3
    assert {"a/quickstart/version_0", "b/quickstart/version_0"} <= set(names)
    from lightning_mtl.report import _figure

    fig = _figure(columns, rows)
    acc = next(ax for ax in fig.axes if ax.get_title() == "left/acc")
    low, high = sorted(acc.get_xlim())
    assert low > 0.5  # not from zero: 0.9475 and 0.961 are far apart on the axis
    assert low <= 0.9475 and high >= 0.961 and (0.961 - 0.9475) / (high - low) > 0.5
    assert acc.get_xlabel() and acc.get_ylabel()
    texts = {t.get_text() for t in acc.texts}
    assert {"0.9475", "0.9610", "0.9500"} <= texts
    legend = acc.get_legend() or fig.legends[0]
    assert {t.get_text() for t in legend.get_texts()} >= {"single-task run", "multi-task run"}
    assert {t.get_text() for t in acc.get_yticklabels()} == set(names)


def test_runs_without_metrics_are_skipped_with_a_note(tmp_path, capsys):
    _fixture(tmp_path)
    _csv_run(tmp_path / "pcgrad" / "version_1", [{"epoch": 0, "step": 3, "train/seg/loss": 1.0}])  # failed early
    paths = main([str(tmp_path / "pcgrad"), "--out", str(tmp_path / "out")])
    markdown = paths["md"].read_text().splitlines()
    assert len(markdown) == 2 + 1 and "version_1" not in paths["md"].read_text()
    assert "skipped pcgrad/version_1" in capsys.readouterr().err


def test_report_help_shows_one_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Delta m %" in out and "%%" not in out


def test_without_matplotlib_the_tables_are_written_and_one_warning_says_why(tmp_path, monkeypatch):
    import sys

    _fixture(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.warns(UserWarning, match="matplotlib") as record:
        paths = main([str(tmp_path / "pcgrad"), "--out", str(tmp_path / "out")])
    assert len([w for w in record if "matplotlib" in str(w.message)]) == 1
    assert paths["md"].is_file() and paths["csv"].is_file() and "png" not in paths


def test_normalised_values_and_their_mean_by_hand(tmp_path, capsys):
    """--normalised: each task's metric in % of its baseline (baseline ÷ value where lower is better), the mean
    over tasks of each task's mean; with higher-is-better metrics only it is 100 - Delta m %."""
    _fixture(tmp_path)
    runs = find_runs(tmp_path / "pcgrad") + find_runs(tmp_path / "mgda")
    baselines = find_runs(tmp_path / "single_seg") + find_runs(tmp_path / "single_depth")
    columns, rows = build_rows(runs, baselines, normalised=True)
    assert columns == ["seg/miou", "seg/pixel_acc", "depth/abs_err", "seg/miou_norm", "depth/abs_err_norm",
                       "seg/pixel_acc_norm", "mean_norm", "delta_m"]  # fmt: skip
    pcgrad, mgda = rows[2], rows[3]
    assert pcgrad["seg/miou_norm"] == pytest.approx(100 * 0.40 / 0.38)
    assert pcgrad["depth/abs_err_norm"] == pytest.approx(100 * 0.60 / 0.55)  # lower is better: inverted
    assert "seg/pixel_acc_norm" not in pcgrad  # pcgrad logged no pixel_acc
    assert pcgrad["mean_norm"] == pytest.approx((100 * 0.40 / 0.38 + 100 * 0.60 / 0.55) / 2)
    seg = (100 * 0.35 / 0.38 + 100 * 0.6 / 0.7) / 2
    assert mgda["mean_norm"] == pytest.approx((seg + 100 * 0.60 / 0.50) / 2)
    assert "mean_norm" not in rows[0]  # a baseline is not normalised by itself
    # --metrics keeps the named metrics; accuracies only: mean_norm = 100 - Delta m %
    _csv_run(tmp_path / "merged", [{"test/a/acc": 0.45, "test/b/acc": 0.8, "test/b/f1": 0.1, "test/a/norm_acc": 9.0}])
    _csv_run(tmp_path / "expert_a", [{"test/a/acc": 0.9, "test/a/f1": 0.2}])
    _csv_run(tmp_path / "expert_b", [{"test/b/acc": 0.5}])
    paths = main([str(tmp_path / "merged"), "--baselines", str(tmp_path / "expert_a"), str(tmp_path / "expert_b"),
                  "--normalised", "--metrics", "acc", "--out", str(tmp_path / "out")])  # fmt: skip
    with open(paths["csv"]) as f:
        merged = list(csv.DictReader(f))[-1]
    assert [c for c in merged if "/" in c] == ["a/acc", "b/acc", "a/acc_norm", "b/acc_norm"]
    assert float(merged["a/acc_norm"]) == pytest.approx(50.0) and float(merged["b/acc_norm"]) == pytest.approx(160.0)
    assert float(merged["mean_norm"]) == pytest.approx(105.0) == 100 - float(merged["delta_m"])
    assert "mean normalised %" in paths["md"].read_text().splitlines()[0]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "merged"), "--normalised", "--out", str(tmp_path / "none")])
    assert "--normalised divides by the baselines" in capsys.readouterr().err
