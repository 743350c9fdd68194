"""`python -m lightning_mtl merge`: every config in configs/merging on tiny checkpoints made here, the merged
checkpoint against a hand computation, loaded back by the module class and by `test --ckpt_path`, errors; the
configs' paths are the merging pipeline's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mtl.cli import main
from lightning_mtl.merging import TIES, TaskVector, list_merges

ROOT = Path(__file__).resolve().parents[2]
# the training-free merges' configs (one per registered merge); the folder's other recipes are `fit` configs
CONFIGS = [ROOT / "configs/merging" / f"{name}.yaml" for name in list_merges()]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
VALIDATE = '{"accelerator": "cpu", "devices": 1, "limit_val_batches": 1}'
# the configs merge the DigitsTasks pipeline's experts; the quickstart checkpoints here are MultiDigits models
QUICKSTART_DATA = ["--data", '{"class_path": "MultiDigits", "init_args": {"batch_size": 256, "seed": 0}}',
                   "--metric", "val/mean/acc", "--mode", "max"]  # fmt: skip

pytestmark = pytest.mark.slow  # fits a model through the CLI first


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A two-step quickstart run as the base and two experts: its weights plus fixed random changes."""
    folder = tmp_path_factory.mktemp("merge")
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps=2",
                "--trainer.limit_val_batches=1", "--test_after_fit=false", *QUIET,
                f"--trainer.logger.init_args.save_dir={folder}"])  # fmt: skip
    base = cli.trainer.checkpoint_callback.last_model_path
    checkpoint = torch.load(base, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    experts = []
    for i in range(2):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                 for k, v in checkpoint["state_dict"].items()}  # fmt: skip
        path = folder / f"expert_{i}.ckpt"
        torch.save({**checkpoint, "state_dict": state}, path)
        experts.append(str(path))
    return base, experts, folder


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_merge_config_writes_a_loadable_checkpoint_of_the_hand_merged_model(config, checkpoints, tmp_path):
    from lightning_mtl import MultiTaskModule

    base, experts, _ = checkpoints
    output = tmp_path / "merged.ckpt"
    summary = main(["merge", "--config", str(config), "--base", base, "--experts", str(experts), "--output", str(output),
                    "--grid", "[0.5, 1.0]" if "grid:" in config.read_text() else "null", "--trainer", VALIDATE,
                    *(QUICKSTART_DATA if "grid:" in config.read_text() else [])])  # fmt: skip
    assert output.is_file()
    base_state = torch.load(base, weights_only=True)["state_dict"]
    vectors = [TaskVector.from_checkpoints(base, path, include="encoder.") for path in experts]
    method = summary["method"]
    if method == "ties":
        merged_tau = TIES(k=20)(vectors)
    elif method == "task_arithmetic":
        merged_tau = vectors[0] + vectors[1]
    else:
        merged_tau = 0.5 * (vectors[0] + vectors[1])
    expected = merged_tau.apply_to(base_state, summary["coef"])
    written = torch.load(output, weights_only=True)
    assert written["merging"]["method"] == method and written["hyper_parameters"]["_class_path"].endswith(
        "MultiTaskModule"
    )
    if "grid:" in config.read_text():
        assert set(summary["scores"]) == {0.5, 1.0} and summary["coef"] in (0.5, 1.0)
    for key, value in expected.items():
        assert torch.allclose(written["state_dict"][key], value, atol=1e-6), key
        if not key.startswith("encoder."):  # the heads stay the base's
            assert torch.equal(written["state_dict"][key], base_state[key]), key
    module = MultiTaskModule.load_from_checkpoint(output)
    for key, value in module.state_dict().items():
        assert torch.equal(value, written["state_dict"][key]), key
    tested = main(["test", "--ckpt_path", str(output), "--trainer.limit_test_batches=1", *QUIET,
                   f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip
    assert "test/mean/acc" in tested.trainer.callback_metrics


def test_merge_errors_are_one_clear_sentence(checkpoints, tmp_path):
    base, experts, _ = checkpoints
    common = ["--base", base, "--experts", str(experts), "--output", str(tmp_path / "m.ckpt")]
    with pytest.raises(ValueError, match="a coefficient grid is validated on data: give --data"):
        main(["merge", *common, "--grid", "[1.0]"])
    with pytest.raises(ValueError, match="unknown merge 'tiez'; did you mean ties"):
        main(["merge", *common, "--method", "tiez"])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main(["merge", *common, "--experts", f"[{tmp_path / 'missing.ckpt'}]"])
    with pytest.raises(FileNotFoundError, match="base checkpoint .*nothere.ckpt"):
        main(["merge", *common, "--base", str(tmp_path / "nothere.ckpt")])
    with pytest.raises(ValueError, match="model 'NoSuchModule' is not a LightningModule class path or short name"):
        main(["merge", *common, "--model", "NoSuchModule"])
    assert not (tmp_path / "m.ckpt").exists()


def test_a_short_model_name_and_coef_zero_write_the_base_bit_for_bit(checkpoints, tmp_path):
    base, experts, _ = checkpoints
    output = tmp_path / "zero.ckpt"
    main(["merge", "--base", base, "--experts", str(experts), "--output", str(output), "--model", "MultiTaskModule",
          "--method", "ties", "--coef", "0.0"])  # fmt: skip
    written, original = (
        torch.load(output, weights_only=True)["state_dict"],
        torch.load(base, weights_only=True)["state_dict"],
    )
    assert written.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(written[key], value), key


def test_the_merge_configs_read_what_the_pipeline_writes():
    """After examples/merging_pipeline.py the merge commands run as written: every path a merge config names is
    one the pipeline or the recipes it runs write, and the experts are the pipeline's tasks in its order."""
    import ast

    import yaml

    pipeline = (ROOT / "examples" / "merging_pipeline.py").read_text()
    tasks = next(ast.literal_eval(node.value) for node in ast.parse(pipeline).body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TASKS")  # fmt: skip
    for config in CONFIGS:
        values = yaml.safe_load(config.read_text())
        assert values["base"] == "runs/merging/base.ckpt" and 'BASE = f"{ROOT}/base.ckpt"' in pipeline
        assert values["experts"] == [f"runs/merging/experts/{t}/best.ckpt" for t in tasks]
        for task in tasks:  # each expert is written by its task fragment's checkpoint callback
            fragment = yaml.safe_load((ROOT / "configs/merging/tasks" / f"{task}.yaml").read_text())
            assert fragment["trainer"]["callbacks"][0]["init_args"]["dirpath"] == f"runs/merging/experts/{task}"
        assert values["output"] == f"runs/merging/merged/{config.stem}.ckpt"
        if "grid" in values:
            assert values["data"]["init_args"]["tasks"] == tasks and values["metric"] == "val/delta_m"
