"""The fine-tuning application around the library: ``grass-train``, ``grass-cli`` and what they are built from.

It holds the LightningModule for Hugging Face causal LMs (``lm``), the instruction data (``data``), exact
match (``evaluation``), the LoRA baseline (``lora``), the tiny pretrained base (``pretrain``), what a run
records (``run_stats``, ``machine``) and the two entry points (``train``, ``cli``). Its extra dependencies
come with ``pip install "lightning_grass[app]"``.
"""

from lightning_grass._extras import require_app_extra

require_app_extra("lightning_grass.app (grass-train, grass-cli, LoRA, plots)")
