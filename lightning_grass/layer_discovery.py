"""Find a model's transformer blocks and the always-on modules around them.

Discovery works on the module tree, so the same call finds the layers of a bare Hugging Face model, of one
held in a ``LightningModule`` attribute, and of one inside a ``peft`` wrapper.

1. ``layers="model.model.layers"`` (a dotted path resolved with ``getattr``) overrides everything.
2. Otherwise the known layouts in :data:`KNOWN_LAYOUTS` are tried: the first entry that matches the end
   of some ``nn.ModuleList``'s dotted name wins.
3. Otherwise the generic fallback picks, among all ``nn.ModuleList`` whose children share one class, the
   one that holds the most parameters. A new architecture therefore needs no code; adding its path to
   the table only makes the choice explicit.

Every module with parameters outside the blocks goes to one always-on group, by what it is, whatever order it
was registered in (litgpt's ``GPT`` registers ``lm_head`` before ``transformer``):

- ``embeddings``: every ``nn.Embedding`` (token and position embeddings), and the module a Hugging Face
  model returns from ``get_input_embeddings()``.
- ``head``: the module a Hugging Face model returns from ``get_output_embeddings()``, an ``nn.Linear`` whose
  ``out_features`` is an embedding's ``num_embeddings`` (the vocabulary), and a module that holds an
  embedding's parameter (a head tied to the token embedding).
- ``final_norm``: the norm a known layout names (needed where it is registered before the blocks, as in OPT);
  otherwise the norm modules registered after the blocks.
- Any other module goes by its place: registered before the blocks it joins ``embeddings`` (an embedding
  norm, an input projection), after them ``head``.

A parameter held by modules of two groups (tied word embeddings: Gemma, GPT-2) belongs to the first of
``embeddings``, ``head``, ``final_norm``, so :meth:`LayerMap.group_parameters` yields every parameter once.
A head tied to the token embedding therefore trains or freezes with the embeddings, and
:attr:`LayerMap.tied` lists each such parameter with the groups that share it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from lightning_grass.errors import SettingValueError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownLayout:
    """Where one family of architectures keeps its blocks and final norm.

    Attributes:
        blocks: Dotted path of the block container, matched against the end of a module's dotted name.
        final_norm: Paths of the final norm, relative to the same root as ``blocks``; the first that exists
            is used. Needed where the final norm is registered before the blocks (OPT).
        models: The architectures this entry covers, for readers.
    """

    blocks: str
    final_norm: tuple[str, ...]
    models: str


#: One line per layout. A new architecture with another layout needs one line here, or nothing (fallback).
KNOWN_LAYOUTS: tuple[KnownLayout, ...] = (
    KnownLayout(
        "model.layers",
        ("model.norm", "model.final_layernorm"),
        "Llama, Mistral, Mixtral, Qwen2/3, Gemma/2, Phi/3",
    ),
    KnownLayout("model.decoder.layers", ("model.decoder.final_layer_norm",), "OPT"),
    KnownLayout("gpt_neox.layers", ("gpt_neox.final_layer_norm",), "GPT-NeoX, Pythia"),
    KnownLayout("transformer.h", ("transformer.ln_f",), "GPT-2, GPT-J, Falcon, BLOOM"),
)


#: The always-on groups of a :class:`LayerMap`, each a list of modules outside the blocks. A parameter that
#: modules of two groups hold belongs to the first of them in this order.
ALWAYS_ON_GROUPS = ("embeddings", "head", "final_norm")


@dataclass(frozen=True, eq=False)
class TiedParameter:
    """A parameter that modules of two always-on groups share, such as a head tied to the token embedding.

    Attributes:
        parameter: The shared parameter.
        group: The group it belongs to (``"embeddings"`` for a tied head), which decides whether it trains.
        tied_to: The other groups whose modules hold it (``("head",)`` for a tied head).
        names: Its dotted names relative to the module given to discovery, in registration order, one per
            module that holds it (``("transformer.wte.weight", "lm_head.weight")`` for GPT-2).
    """

    parameter: nn.Parameter
    group: str
    tied_to: tuple[str, ...]
    names: tuple[str, ...]


@dataclass
class LayerMap:
    """Where a model's transformer blocks and always-on modules are.

    Attributes:
        blocks: The transformer blocks, in forward order. ``blocks[i]`` is layer ``i``.
        path: Dotted path of the container of ``blocks``, relative to the module given to discovery.
        found_by: ``"override"``, ``"table"`` or ``"fallback"``: which discovery rule matched.
        embeddings: The embeddings and other modules with parameters registered before the blocks.
        final_norm: The final norm.
        head: The output projection (the LM head) and other modules with parameters registered after the
            blocks.
        tied: The parameters that modules of two groups share; each is in :meth:`group_parameters` of its
            ``group`` only.
    """

    blocks: list[nn.Module]
    path: str
    found_by: str
    embeddings: list[nn.Module] = field(default_factory=list)
    final_norm: list[nn.Module] = field(default_factory=list)
    head: list[nn.Module] = field(default_factory=list)
    tied: list[TiedParameter] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def layer_parameters(self, index: int) -> list[nn.Parameter]:
        """All parameters of block ``index``, in registration order."""
        return list(self.blocks[index].parameters())

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        """Parameters of an always-on group: ``"embeddings"``, ``"head"`` or ``"final_norm"``.

        A parameter that modules of two groups hold is returned for the first of them only (see :attr:`tied`).
        """
        if group not in ALWAYS_ON_GROUPS:
            raise ValueError(f"group={group!r} is not an always-on group; use 'embeddings', 'head' or 'final_norm'")
        earlier = {id(p) for name in ALWAYS_ON_GROUPS[: ALWAYS_ON_GROUPS.index(group)] for p in self._direct(name)}
        return [p for p in self._direct(group) if id(p) not in earlier]

    def _direct(self, group: str) -> list[nn.Parameter]:
        return _unique(p for module in getattr(self, group) for p in module.parameters(recurse=False))


def discover_layers(model: nn.Module, layers: str | None = None) -> LayerMap:
    """Find the transformer blocks of ``model`` and sort every other parameter into an always-on group.

    Args:
        model: A Hugging Face causal LM, or any module that contains one (a ``LightningModule``, a ``peft``
            wrapper), or any model whose blocks live in an ``nn.ModuleList``.
        layers: Optional dotted path of the block container, relative to ``model``, for example
            ``"model.model.layers"``. It is resolved attribute by attribute, never evaluated.

    Returns:
        The :class:`LayerMap` of ``model``.

    Raises:
        SettingValueError: If ``layers`` does not resolve to a non-empty ``nn.ModuleList``, or if no candidate
            container exists. The message lists the candidate paths that were seen.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
        ...     num_attention_heads=4, num_key_value_heads=4, vocab_size=100))
        >>> layer_map = discover_layers(model)
        >>> layer_map.path, layer_map.num_layers
        ('model.layers', 4)
    """
    candidates = _module_lists(model)
    final_norm_paths: tuple[str, ...] = ()
    if layers is not None:
        path, found_by = _resolve_override(model, layers, candidates), "override"
    elif (known := _match_known_layout(candidates)) is not None:
        (path, final_norm_paths), found_by = known, "table"
    else:
        path, found_by = _largest_uniform_list(model, candidates), "fallback"
    container = model.get_submodule(path)
    layer_map = LayerMap(blocks=list(container), path=path, found_by=found_by)
    _assign_always_on(model, path, final_norm_paths, layer_map)
    log.debug("discovered %d layers at %r (%s)", layer_map.num_layers, path, found_by)
    return layer_map


def _module_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)}


def _resolve_override(model: nn.Module, layers: str, candidates: dict[str, nn.ModuleList]) -> str:
    module: object = model
    for part in layers.split("."):
        if not part.isidentifier() or not hasattr(module, part):
            raise SettingValueError(
                f"layers={layers!r} does not resolve on {type(model).__name__}: no attribute {part!r}. "
                f"Candidate paths: {_describe(candidates)}"
            )
        module = getattr(module, part)
    if not isinstance(module, nn.ModuleList) or not len(module):
        raise SettingValueError(
            f"layers={layers!r} resolves to {type(module).__name__}, not a non-empty nn.ModuleList. "
            f"Candidate paths: {_describe(candidates)}"
        )
    return layers


def _match_known_layout(candidates: dict[str, nn.ModuleList]) -> tuple[str, tuple[str, ...]] | None:
    for layout in KNOWN_LAYOUTS:
        matches = [name for name in candidates if name == layout.blocks or name.endswith("." + layout.blocks)]
        if matches:
            path = max(matches, key=lambda name: _num_params(candidates[name]))
            root = path[: -len(layout.blocks)]
            return path, tuple(root + norm for norm in layout.final_norm)
    return None


def _largest_uniform_list(model: nn.Module, candidates: dict[str, nn.ModuleList]) -> str:
    uniform = [name for name, container in candidates.items() if len({type(block) for block in container}) == 1]
    if not uniform:
        raise SettingValueError(
            f"no transformer blocks found in {type(model).__name__}: no nn.ModuleList of same-class blocks. "
            f"Candidate paths: {_describe(candidates)}. Pass layers='dotted.path.to.blocks'."
        )
    return max(uniform, key=lambda name: _num_params(candidates[name]))


def _assign_always_on(model: nn.Module, path: str, final_norm_paths: tuple[str, ...], layer_map: LayerMap) -> None:
    modules = dict(model.named_modules())
    outside = {
        name: module
        for name, module in modules.items()
        if name != path and not name.startswith(path + ".") and any(True for _ in module.parameters(recurse=False))
    }
    known_norm = next((modules[p] for p in final_norm_paths if p in modules), None)
    embeddings = _embedding_ids(model, outside)
    heads = _head_ids(model, outside, embeddings)
    blocks_seen = False
    for name, module in modules.items():
        blocks_seen = blocks_seen or name == path
        if name not in outside:
            continue
        if module is known_norm:
            layer_map.final_norm.append(module)
        elif id(module) in embeddings:
            layer_map.embeddings.append(module)
        elif id(module) in heads:
            layer_map.head.append(module)
        elif known_norm is None and blocks_seen and _is_norm(module):
            layer_map.final_norm.append(module)
        else:
            (layer_map.head if blocks_seen else layer_map.embeddings).append(module)
    layer_map.tied = _tied_parameters(model, layer_map)


def _embedding_ids(model: nn.Module, outside: dict[str, nn.Module]) -> set[int]:
    """Every ``nn.Embedding`` outside the blocks, and what Hugging Face models return as input embeddings."""
    found = {id(m) for m in outside.values() if isinstance(m, nn.Embedding)}
    ids = {id(m) for m in outside.values()}
    return found | {id(m) for m in _hf_modules(model, "get_input_embeddings") if id(m) in ids}


def _head_ids(model: nn.Module, outside: dict[str, nn.Module], embeddings: set[int]) -> set[int]:
    """Output embeddings of Hugging Face models, projections to a vocabulary, and holders of an embedding's weight."""
    ids = {id(m) for m in outside.values()}
    found = {id(m) for m in _hf_modules(model, "get_output_embeddings") if id(m) in ids}
    embedding_params = {id(p) for m in outside.values() if id(m) in embeddings for p in m.parameters(recurse=False)}
    vocabularies = {m.num_embeddings for m in outside.values() if isinstance(m, nn.Embedding)}
    for module in outside.values():
        if id(module) in embeddings:
            continue
        projects = isinstance(module, nn.Linear) and module.out_features in vocabularies
        if projects or any(id(p) in embedding_params for p in module.parameters(recurse=False)):
            found.add(id(module))
    return found


def _hf_modules(model: nn.Module, getter: str) -> list[nn.Module]:
    """What ``getter`` (``get_input_embeddings``, ``get_output_embeddings``) returns on each module that has it."""
    found = []
    for module in model.modules():
        method = getattr(module, getter, None)
        if not callable(method):
            continue
        try:
            result = method()
        except (NotImplementedError, AttributeError):  # a base class's default, for a model without one
            continue
        if isinstance(result, nn.Module):
            found.append(result)
    return found


def _tied_parameters(model: nn.Module, layer_map: LayerMap) -> list[TiedParameter]:
    groups_of: dict[int, list[str]] = {}
    for group in ALWAYS_ON_GROUPS:
        for p in layer_map._direct(group):
            groups_of.setdefault(id(p), []).append(group)
    shared: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if len(groups_of.get(id(p), ())) > 1:
            shared.setdefault(id(p), (p, []))[1].append(name)
    return [
        TiedParameter(p, groups_of[key][0], tuple(groups_of[key][1:]), tuple(names))
        for key, (p, names) in shared.items()
    ]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _unique(params: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _describe(candidates: dict[str, nn.ModuleList]) -> str:
    if not candidates:
        return "(none: the model has no nn.ModuleList)"
    return ", ".join(f"{name} ({len(c)} x {type(c[0]).__name__})" for name, c in candidates.items())
