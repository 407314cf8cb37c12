"""The `grass-train` Hydra app and the `grass-cli` Lightning CLI, end to end on tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_grass.app.lm import CausalLMModule

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model=scratch_llama",
    "data.num_train=48",
    "data.num_val=8",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "sampler.probe_steps=2",
    "sampler.sample_every=2",
    "logger=csv",
    "callbacks=none",
]


def run(command, cwd, timeout=300):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_grass_train_writes_metrics_model_and_plots(tmp_path):
    out = tmp_path / "run"
    stdout = run([sys.executable, "-m", "lightning_grass.app.train", *TINY, f"paths.output_dir={out}"], cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "grass" and metrics["task"] == "arithmetic"
    assert 0.0 <= metrics["exact_match_before"] <= 1.0 and 0.0 <= metrics["exact_match_after"] <= 1.0
    assert metrics["peak_memory_bytes"] > 0 and metrics["optimizer_state_bytes_peak"] > 0
    assert metrics["median_step_seconds"] > 0
    assert sum(metrics["layer_selection_counts"]) == 2 * 2, "the draws at steps 2 and 4 trained; step 6's did not"
    assert "val/perplexity" in metrics and "val/token_accuracy" in metrics
    assert (out / "importance.png").stat().st_size > 0 and (out / "sampling.png").stat().st_size > 0
    assert 1.0 <= metrics["effective_layers_mean"] <= 2.0 and sum(metrics["draw_share"]) == pytest.approx(1.0)
    assert "effective layers on average; share of draws per layer" in stdout
    assert (out / "csv" / "version_0" / "metrics.csv").is_file()
    assert "GRASS fine-tuning summary" in stdout and str(out / "metrics.json") in stdout
    reloaded = CausalLMModule(pretrained_path=out / "model")
    assert reloaded.tokenizer is not None
    assert reloaded.model.config.num_hidden_layers == 2


def test_a_module_wise_run_records_its_unit_budget_and_modules(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lightning_grass.app.train", *TINY, "sampler.unit=module"]
    stdout = run([*command, "evaluate_before=false", f"paths.output_dir={out}"], cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    model = CausalLMModule(pretrained_path=out / "model").model
    layer_size = sum(p.numel() for p in model.model.layers[0].parameters())
    assert (metrics["method"], metrics["unit"], metrics["parameter_budget"]) == (
        "grass_module",
        "module",
        2 * layer_size,
    )
    assert metrics["modules"][:2] == ["0.self_attn.q_proj", "0.self_attn.k_proj"] and len(metrics["modules"]) == 14
    trained = [r["active_units"] for r in metrics["history"] if r["resampled"] and r["trained"]]
    assert len(trained) == 2 and sum(metrics["module_selection_counts"]) == sum(len(units) for units in trained)
    assert len(metrics["draw_share"]) == 14 and sum(metrics["draw_share"]) == pytest.approx(1.0)
    assert f"14, drawn up to {2 * layer_size:,} parameters per window" in stdout
    header = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"grass/active/module_000", "grass/importance/module_013"} <= set(header)
    assert (out / "selection.png").stat().st_size > 0 and (out / "sampling.png").stat().st_size > 0


def test_a_config_directory_of_your_own_adds_options(tmp_path):
    own = tmp_path / "my_conf" / "sampler"
    own.mkdir(parents=True)
    (own / "lisa_every_step.yaml").write_text(
        "_target_: lightning_grass.GRASSCallback\nmode: lisa\nn_active: 1\nsample_every: 1\nseed: 0\n"
    )
    out = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("sampler.")]
    overrides = [*tiny, "sampler=lisa_every_step", "logger=none", f"paths.output_dir={out}"]
    command = [sys.executable, "-m", "lightning_grass.app.train", "--config-dir", str(tmp_path / "my_conf")]
    run([*command, *overrides], cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lisa"
    assert sum(metrics["layer_selection_counts"]) == 6, "one layer drawn at the start and after steps 1 to 5"


def test_multirun_writes_one_directory_per_job(tmp_path):
    out = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "lightning_grass.app.train",
        "-m",
        "sampler=lisa,grass",
        *TINY,
        f"paths.output_dir={out}",
    ]
    run(command, cwd=tmp_path)
    methods = sorted(json.loads((out / str(job) / "metrics.json").read_text())["method"] for job in (0, 1))
    assert methods == ["grass", "lisa"]


def test_grass_cli_fit_and_print_config(tmp_path, tiny_pretrained_dir):
    overrides = [
        f"--model.pretrained_path={tiny_pretrained_dir}",
        "--trainer.max_steps=4",
        "--trainer.callbacks.init_args.probe_steps=2",
        "--trainer.val_check_interval=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.num_train=32",
        "--data.num_val=8",
        "--data.batch_size=8",
        "--model.eval_examples=4",
        "--model.max_new_tokens=8",
    ]
    config = str(REPO / "conf" / "cli" / "grass.yaml")
    printed = run(
        [str(Path(sys.executable).parent / "grass-cli"), "fit", "--config", config, *overrides, "--print_config"],
        tmp_path,
    )
    parsed = yaml.safe_load(printed)
    assert parsed["trainer"]["strategy"]["class_path"] == "lightning_grass.GRASSStrategy"
    assert parsed["trainer"]["callbacks"][0]["class_path"] == "lightning_grass.GRASSCallback"
    assert parsed["data"]["answer_pattern"] == r"####\s*(\S+)"

    run(
        [
            str(Path(sys.executable).parent / "grass-cli"),
            "fit",
            "--config",
            config,
            *overrides,
            "--trainer.strategy=grass",
        ],
        tmp_path,
    )
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "Lightning's default ModelCheckpoint wrote the fitted state"
    state = torch.load(checkpoints[0], weights_only=False)
    assert state["global_step"] == 4
    assert any("GRASSCallback" in key for key in state["callbacks"])


@pytest.mark.slow
def test_default_job_improves_exact_match_over_the_base(tmp_path):
    out = tmp_path / "default"
    # From a fresh folder the base model is built first (about 150 s here), then 500 steps are fitted.
    run([sys.executable, "-m", "lightning_grass.app.train", f"paths.output_dir={out}"], cwd=tmp_path, timeout=1200)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_match_after"] > metrics["exact_match_before"] + 0.1


@pytest.mark.slow  # 16 s: Optuna trials end to end; multirun and the launchers are in the default run
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    out = tmp_path / "search"
    command = [
        sys.executable,
        "-m",
        "lightning_grass.app.train",
        "hparams_search=optuna",
        *TINY,
        "logger=none",
        "hydra.sweeper.n_trials=2",
        "sampler.n_active=choice(1,2)",  # the 2-layer smoke model: gamma at most 2
        f"paths.output_dir={out}",
    ]
    run(command, cwd=tmp_path)
    trials = [json.loads((out / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert all(t["method"] == "grass" for t in trials)
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["exact_match_after"] for t in trials)


@pytest.mark.slow
def test_grass_train_on_two_ddp_processes_writes_its_outputs_once(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "lightning_grass.app.train", *TINY, "strategy=grass_ddp", "trainer.devices=2"]
    stdout = run([*command, f"paths.output_dir={out}"], cwd=tmp_path)
    assert stdout.count("GRASS fine-tuning summary") == 1
    assert json.loads((out / "metrics.json").read_text())["method"] == "grass"
    assert (out / "train_ddp_process_1.log").is_file(), "Lightning's launcher ran a second process"


def test_pretrain_tiny_experiment_builds_a_base_that_reloads(tmp_path):
    base = tmp_path / "base"
    overrides = [
        "experiment=pretrain_tiny",
        f"base.path={base}",
        "base.build.max_steps=3",
        "base.build.num_documents=200",
        "base.build.model_config.num_hidden_layers=2",
        "base.build.model_config.hidden_size=32",
        "base.build.model_config.intermediate_size=64",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    stdout = run([sys.executable, "-m", "lightning_grass.app.train", *overrides], cwd=tmp_path)
    assert f"Base model written to {base}" in stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stage"] == "pretrain"
    reloaded = CausalLMModule(pretrained_path=base)
    assert reloaded.model.config.num_hidden_layers == 2
    assert reloaded.tokenizer.decode(reloaded.tokenizer.encode("7 + 5 = 12")) == "7 + 5 = 12"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base-")], "no staging folder left behind"
