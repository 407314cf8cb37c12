"""The base model's own scores on the `real` benchmark's test records, before any fine-tuning.

    python experiments/real_base_scores.py            # writes experiments/results/real/base_scores.json

Each task's config is composed exactly as a ``grass-train -m experiment=bench_real`` job composes it (the same
overrides, through Hydra's compose API), so the base model is scored on the same records, with the same prompts
and the same generation settings as every fine-tuned run: the commonsense mixture's seeded test subsets through
``evaluate_suite``, and arithmetic's held-out test split of each seed (the split depends on the seed), through
the same exact match ``grass-train`` reports. ``collect_results.py --preset real`` puts the figures in
``results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_grass.app.data.prompt import check_special_tokens
from lightning_grass.app.evaluation import exact_match
from lightning_grass.app.gguf_base import ensure_gguf_base
from lightning_grass.app.lm import CausalLMModule
from lightning_grass.app.suite_evaluation import SuiteEvaluation
from lightning_grass.app.train import CONFIG_PACKAGE

RESULTS = Path(__file__).parent / "results" / "real" / "base_scores.json"


def _config(task: str, seed: int) -> DictConfig:
    """The config of the bench_real job on ``task`` with ``seed`` (the method does not matter: no training)."""
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        return compose(
            "train",
            overrides=["experiment=bench_real", f"real_task={task}", f"seed={seed}", f"paths.root_dir={Path.cwd()}"],
            return_hydra_config=False,
        )


def score_commonsense(module: CausalLMModule, out_dir: Path) -> dict[str, object]:
    """The suite's average and per-set accuracy on the benchmark's seeded test subsets."""
    cfg = _config("commonsense", 0)
    evaluation = SuiteEvaluation.from_config(cfg.evaluate_suite)
    result = evaluation.run(module.model, module.tokenizer, out_dir / "base_commonsense", "SmolLM2-135M-Instruct")
    return {
        "score": result.average_percent,
        "per_set": {s.benchmark.title: s.accuracy_percent for s in result.scores},
        "how": f"the seeded subsets of {evaluation.sample} records per set (sample_seed {evaluation.sample_seed}), "
        f"{evaluation.max_new_tokens} new tokens, greedy; predictions in base_commonsense/",
    }


def score_arithmetic(module: CausalLMModule, seeds: list[int]) -> dict[str, object]:
    """Exact match on each seed's held-out test split, and their mean."""
    by_seed = {}
    for seed in seeds:
        cfg = _config("arithmetic", seed)
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.tokenizer = module.tokenizer
        datamodule.setup("fit")
        examples = datamodule.test_examples[: cfg.model.eval_examples]
        by_seed[str(seed)] = 100 * exact_match(module.model, module.tokenizer, examples, cfg.model.answer_pattern)
    return {
        "score": statistics.fmean(by_seed.values()),
        "by_seed": by_seed,
        "how": f"exact match on each seed's test split ({', '.join(f'seed {s}: {v:.1f}' for s, v in by_seed.items())})",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON file to write")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the benchmark's seeds")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cfg = _config("commonsense", 0)
    ensure_gguf_base(cfg.base.path, **cfg.base.gguf)
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(pretrained_path=cfg.base.path, dtype=cfg.model.dtype).eval()
    check_special_tokens(module.tokenizer)
    scores = {
        "commonsense": score_commonsense(module, args.out.parent),
        "arithmetic": score_arithmetic(module, args.seeds),
    }
    task_names = {"commonsense": "+".join(cfg.data.sets), "arithmetic": "arithmetic"}
    record = {task_names[task]: score for task, score in scores.items()}
    record["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
