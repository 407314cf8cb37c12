"""Pieces of the benchmark reports' Markdown: configs as YAML blocks, and the machine in one line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf


def split_common(shared: Mapping[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The top-level entries equal on every task, and each task's other entries."""
    configs = list(shared.values())
    common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}
    return common, {task: {k: v for k, v in c.items() if k not in common} for task, c in shared.items()}


def yaml_block(config: Mapping[str, Any]) -> list[str]:
    """``config`` as the lines of a fenced YAML block, keys sorted, with a blank line after it."""
    return ["```yaml", OmegaConf.to_yaml(OmegaConf.create(dict(config)), sort_keys=True).rstrip(), "```", ""]


def describe_machine(machine: Mapping[str, Any]) -> str:
    """One line on the machine a run recorded (``metrics.json``'s ``machine``)."""
    if not machine:
        return "not recorded"
    memory = f", {machine['memory_gib']} GiB RAM" if machine.get("memory_gib") else ""
    device = machine.get("device", "cpu")
    return (
        f"{machine.get('cpu_count')} CPU cores ({machine.get('cpu')}){memory}, "
        f"{'no GPU' if device == 'cpu' else device}; torch {machine.get('torch')}, Python {machine.get('python')}"
    )
