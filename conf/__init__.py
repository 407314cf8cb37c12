"""The Hydra configs of ``grass-train`` and ``grass-cli``, shipped in the package as ``lightning_grass.conf``."""
