"""A case where the layers that need training are known: perturb two layers of a pretrained base, then recover.

The 12-layer base (`grass-train experiment=pretrain_tiny base=deep` builds it) gets Gaussian noise added to
the weights of two chosen layers, which raises its loss on its own pretraining corpus. Fine-tuning on that
corpus with two layers active at a time then has an answer by construction: the perturbed layers are the ones
to train. For each sampler and calibration this measures how often the perturbed layers were drawn (uniform
draws hit them 2 times in 12) and how fast the loss recovers.

    python experiments/controlled_case.py                  # writes experiments/results/controlled/results.md
    python experiments/controlled_case.py --seeds 100 101 102 --out /tmp/dev   # development seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_grass import GRASSCallback, GRASSStrategy
from lightning_grass.app.data import pretraining_corpus
from lightning_grass.app.lm import CausalLMModule
from lightning_grass.app.pretrain import PackedCorpus

RESULTS = Path(__file__).parent / "results" / "controlled"
BASE = Path(".cache/base/deep_llama")
PERTURBED = (3, 8)

#: Sampler settings compared: name -> GRASSCallback keyword arguments.
SAMPLERS: dict[str, dict[str, Any]] = {
    "LISA": {"mode": "lisa"},
    "GRASS* (mean, tau 1)": {"mode": "grass_static"},
    "GRASS (mean, tau 1)": {"mode": "grass"},
    "GRASS (log, tau 1)": {"mode": "grass", "normalize": "log"},
    "GRASS (rank, tau 0.25)": {"mode": "grass", "normalize": "rank", "temperature": 0.25},
    "GRASS (mean, 4 effective layers)": {"mode": "grass", "target_effective_layers": 4.0},
    "GRASS (relative, mean, tau 1)": {"mode": "grass", "importance": "relative"},
}


class LossRecorder(Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


def perturbed_module(seed: int, scale: float, lr: float) -> CausalLMModule:
    """The base with Gaussian noise of ``scale`` times each weight's std added to the perturbed layers."""
    module = CausalLMModule(pretrained_path=BASE, lr=lr, warmup_steps=5, min_lr_ratio=1.0)
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for index in PERTURBED:
            for p in module.model.model.layers[index].parameters():
                if p.ndim >= 2:
                    p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return module


def corpus_loader(module: CausalLMModule, seed: int, steps: int, batch_size: int) -> DataLoader:
    """Blocks of the base's pretraining corpus (a fresh draw of documents), shuffled by ``seed``."""
    tokenizer = module.tokenizer
    token_ids: list[int] = []
    for document in pretraining_corpus(steps * batch_size * 4, 1_000 + seed):
        token_ids += [*tokenizer.encode(document, add_special_tokens=False), tokenizer.eos_token_id]
    dataset = PackedCorpus(token_ids, 128)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune the perturbed base with one sampler; return its draws and losses."""
    pl.seed_everything(seed, verbose=False)
    module = perturbed_module(seed, args.scale, args.lr)
    callback = GRASSCallback(n_active=2, probe_steps=5, sample_every=args.sample_every, seed=seed, **SAMPLERS[name])
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        strategy=GRASSStrategy(offload="none"),
        callbacks=[callback, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, corpus_loader(module, seed, args.steps, args.batch_size))
    draws = [
        layer
        for record in callback.history
        if record["resampled"] and record["step"] > 0
        for layer in record["active_layers"]
    ]
    hits = sum(layer in PERTURBED for layer in draws) / max(1, len(draws))
    spread = [r["effective_layers"] for r in callback.history if r["effective_layers"] is not None]
    return {"sampler": name, "seed": seed, "hit_rate": hits, "losses": recorder.losses, "effective_layers": spread}


def base_losses(args: argparse.Namespace, seeds: list[int]) -> dict[str, float]:
    """The loss of the unperturbed and of the perturbed base on the first batch, averaged over seeds."""
    clean, perturbed = [], []
    for seed in seeds:
        module = CausalLMModule(pretrained_path=BASE)
        batch = next(iter(corpus_loader(module, seed, args.steps, args.batch_size)))
        with torch.no_grad():
            clean.append(float(module.model(**batch).loss))
            perturbed.append(float(perturbed_module(seed, args.scale, args.lr).model(**batch).loss))
    return {"clean": statistics.fmean(clean), "perturbed": statistics.fmean(perturbed)}


def window_mean(losses: list[float], end: int, width: int = 10) -> float:
    """Mean training loss over the ``width`` steps that end at step ``end``."""
    return statistics.fmean(losses[max(0, end - width) : end])


def main() -> None:
    """Run every sampler on every seed and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scale", type=float, default=1.0, help="noise std as a multiple of each weight's std")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    reference = base_losses(args, args.seeds)
    results = [run(name, seed, args) for name in args.samplers for seed in args.seeds]
    checkpoints = [args.steps // 4, args.steps // 2, args.steps]
    rows = []
    for name in args.samplers:
        runs = [r for r in results if r["sampler"] == name]
        hit = statistics.fmean(r["hit_rate"] for r in runs)
        spread = statistics.fmean(statistics.fmean(r["effective_layers"]) for r in runs)
        losses = [statistics.fmean(window_mean(r["losses"], end) for r in runs) for end in checkpoints]
        cells = " | ".join(f"{value:.3f}" for value in losses)
        rows.append(f"| {name} | {hit:.1%} | {spread:.1f} | {cells} |")
    header = " | ".join(f"loss at step {end}" for end in checkpoints)
    command = "python experiments/controlled_case.py " + " ".join(
        f"--{k.replace('_', '-')}={' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in ("out", "samplers")
    )
    text = "\n".join(
        [
            "# A controlled case: two perturbed layers of a 12-layer base",
            "",
            f"Layers {list(PERTURBED)} of the deep base had Gaussian noise of {args.scale} times each weight's std "
            f"added. Fine-tuning on the base's own corpus (batch {args.batch_size} x 128 tokens, AdamW, lr "
            f"{args.lr}, {args.steps} steps) with 2 of 12 layers active, resampled every {args.sample_every} steps "
            f"(GRASS probes 5 steps first). Uniform sampling hits a perturbed layer with 2 of 12 draws (16.7%). "
            f"Seeds {args.seeds}; means over seeds. Loss: the mean training loss of the 10 steps before each "
            f"checkpoint. The base's loss on the first batch: {reference['clean']:.3f} before the perturbation, "
            f"{reference['perturbed']:.3f} after.",
            "",
            f"| sampler | draws on perturbed layers | effective layers | {header} |",
            "|---|---|---|" + "---|" * len(checkpoints),
            *rows,
            "",
            f"Command: `{command}` ({time.perf_counter() - start:.0f} s on this machine).",
            "",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "runs.json").write_text(json.dumps({"reference": reference, "runs": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
