"""Find a model's transformer blocks and the always-on modules around them.

Discovery works on the module tree, so the same call finds the layers of a bare Hugging Face model, of one
held in a ``LightningModule`` attribute, and of one inside a ``peft`` wrapper.

1. ``layers="model.model.layers"`` (a dotted path resolved with ``getattr``) overrides everything; several
   paths joined by commas (``"encoder.block,decoder.block"``) pool the blocks of several stacks.
2. Otherwise the known layouts in :data:`KNOWN_LAYOUTS` are tried: the first entry that matches the end
   of some ``nn.ModuleList``'s dotted name wins.
3. Otherwise the generic fallback looks at the *stacks*: the ``nn.ModuleList``s whose children share one
   class, or alternate between classes that each appear more than once (Mllama's self- and cross-attention
   layers). It prefers the stacks that the text embedding feeds (their parent holds the module
   ``get_input_embeddings()`` returns), which are the language model's and not a vision or audio tower's;
   when stacks under two parents are fed, as the encoder and decoder of T5, both are pooled, encoder first.
   Among the rest it picks the one that holds the most parameters. A new architecture therefore needs no
   code; adding its path to the table only makes the choice explicit.

Every other stack (but one beside the chosen blocks that the text embedding feeds, such as a list of adapters),
and everything around it up to where it meets the chosen blocks' branch, is a *tower*:
a vision or audio encoder, with its projector when the language model has a root of its own
(``model.language_model``), as in LLaVA, Gemma 3 and Qwen2.5-VL. Towers form their own group, ``towers``,
which the callback freezes by default.

Every module with parameters outside the blocks goes to one always-on group, by what it is, whatever order it
was registered in (litgpt's ``GPT`` registers ``lm_head`` before ``transformer``):

- ``embeddings``: every ``nn.Embedding`` (token and position embeddings), and the module a Hugging Face
  model returns from ``get_input_embeddings()``.
- ``head``: the module a Hugging Face model returns from ``get_output_embeddings()``, an ``nn.Linear`` whose
  ``out_features`` is an embedding's ``num_embeddings`` (the vocabulary), and a module that holds an
  embedding's parameter (a head tied to the token embedding).
- ``final_norm``: the norm a known layout names (needed where it is registered before the blocks, as in OPT);
  otherwise the norm modules registered after the blocks.
- ``towers``: every module inside a tower (see above), checked first.
- Any other module goes by its place: registered before the blocks it joins ``embeddings`` (an embedding
  norm, an input projection), after them ``head``.

A parameter held by several blocks (Zamba2's shared transformer block) is one of each block's parameters: it
trains while any of them is active (:attr:`LayerMap.shared` lists them).

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
    KnownLayout(
        "language_model.layers",
        ("language_model.norm",),
        "vision-language: Gemma 3, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, LLaVA, Mllama",
    ),
    KnownLayout("text_model.layers", ("text_model.norm",), "vision-language: Idefics3, SmolVLM"),
    KnownLayout(
        "encoder.block,decoder.block",
        ("encoder.final_layer_norm", "decoder.final_layer_norm"),
        "encoder-decoder: T5, mT5, UMT5 (both stacks, one pool)",
    ),
)


#: The groups of a :class:`LayerMap` outside the blocks, each a list of modules. The first three train at every
#: step by default; ``towers`` (vision and audio encoders, projectors) is frozen by default. A parameter that
#: modules of two groups hold belongs to the first of them in this order.
ALWAYS_ON_GROUPS = ("embeddings", "head", "final_norm", "towers")


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
        path: Dotted path of the container of ``blocks``, relative to the module given to discovery; the paths
            of several pooled stacks are joined by commas (``"encoder.block,decoder.block"``).
        found_by: ``"override"``, ``"table"`` or ``"fallback"``: which discovery rule matched.
        embeddings: The embeddings and other modules with parameters registered before the blocks.
        final_norm: The final norm.
        head: The output projection (the LM head) and other modules with parameters registered after the
            blocks.
        towers: Vision and audio encoders, projectors: the modules of every stack not chosen, and what surrounds
            it up to the chosen blocks' branch.
        tied: The parameters that modules of two groups share; each is in :meth:`group_parameters` of its
            ``group`` only.
        other_stacks: The dotted paths of the stacks not chosen, whose modules are in ``towers``.
        shared: Parameters that several blocks hold, each with the indices of those blocks.
    """

    blocks: list[nn.Module]
    path: str
    found_by: str
    embeddings: list[nn.Module] = field(default_factory=list)
    final_norm: list[nn.Module] = field(default_factory=list)
    head: list[nn.Module] = field(default_factory=list)
    towers: list[nn.Module] = field(default_factory=list)
    tied: list[TiedParameter] = field(default_factory=list)
    other_stacks: tuple[str, ...] = ()
    shared: list[tuple[nn.Parameter, tuple[int, ...]]] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def layer_parameters(self, index: int) -> list[nn.Parameter]:
        """All parameters of block ``index``, in registration order."""
        return list(self.blocks[index].parameters())

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        """Parameters of a group outside the blocks: ``"embeddings"``, ``"head"``, ``"final_norm"`` or ``"towers"``.

        A parameter that modules of two groups hold is returned for the first of them only (see :attr:`tied`).
        """
        if group not in ALWAYS_ON_GROUPS:
            raise ValueError(f"group={group!r} is not a group outside the blocks; use one of {ALWAYS_ON_GROUPS}")
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
        paths = [_resolve_override(model, part.strip(), candidates) for part in layers.split(",")]
        found_by = "override"
    elif (known := _match_known_layout(candidates)) is not None:
        (paths, final_norm_paths), found_by = known, "table"
    else:
        paths, found_by = _fallback(model, candidates), "fallback"
    blocks = [block for path in paths for block in model.get_submodule(path)]
    layer_map = LayerMap(blocks=blocks, path=",".join(paths), found_by=found_by)
    text = _text_embedding(model)
    chosen_parents = {path.rpartition(".")[0] for path in paths}
    others = [
        name
        for name, container in candidates.items()
        if _is_stack(container)
        and _unrelated(name, paths)
        and not (text is not None and _parent_holds(model, name, text) and name.rpartition(".")[0] in chosen_parents)
    ]
    block_params = {id(p) for block in blocks for p in block.parameters()}
    others = [name for name in others if not any(id(p) in block_params for p in candidates[name].parameters())]
    layer_map.other_stacks = tuple(others)
    _assign_always_on(model, paths, final_norm_paths, _tower_roots(model, paths, others, text), layer_map)
    layer_map.shared = _shared_parameters(layer_map)
    log.debug("discovered %d layers at %r (%s)", layer_map.num_layers, layer_map.path, found_by)
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


def _match_known_layout(candidates: dict[str, nn.ModuleList]) -> tuple[list[str], tuple[str, ...]] | None:
    for layout in KNOWN_LAYOUTS:
        first, *rest = layout.blocks.split(",")
        matches = [name for name in candidates if name == first or name.endswith("." + first)]
        roots = [name[: -len(first)] for name in matches]
        roots = [root for root in roots if all(root + part in candidates for part in rest)]
        if roots:
            root = max(roots, key=lambda r: _num_params(candidates[r + first]))
            paths = [root + part for part in layout.blocks.split(",")]
            return paths, tuple(root + norm for norm in layout.final_norm)
    return None


def _fallback(model: nn.Module, candidates: dict[str, nn.ModuleList]) -> list[str]:
    """The stacks the text embedding feeds (both of an encoder-decoder), or else the largest stack."""
    stacks = [name for name, container in candidates.items() if _is_stack(container)]
    if not stacks:
        raise SettingValueError(
            f"no transformer blocks found in {type(model).__name__}: no nn.ModuleList of same-class (or alternating) "
            f"blocks. Candidate paths: {_describe(candidates)}. Pass layers='dotted.path.to.blocks'."
        )
    text = _text_embedding(model)
    fed = [name for name in stacks if text is not None and _parent_holds(model, name, text)]
    fed = [name for name in fed if not any(name.startswith(other + ".") for other in fed)]
    largest_per_parent: dict[str, str] = {}
    for name in fed:
        parent = name.rpartition(".")[0]
        if parent not in largest_per_parent or _num_params(candidates[name]) > _num_params(
            candidates[largest_per_parent[parent]]
        ):
            largest_per_parent[parent] = name
    if len(largest_per_parent) > 1:  # an encoder and a decoder, each with the embedding: pooled, in their order
        return [name for name in fed if name in largest_per_parent.values()]
    return [max(fed or stacks, key=lambda name: _num_params(candidates[name]))]


def _is_stack(container: nn.ModuleList) -> bool:
    """Blocks of one class, or of classes that alternate, each appearing more than once; all with parameters."""
    classes = [type(block) for block in container]
    if not all(any(True for _ in block.parameters()) for block in container):
        return False
    return len(set(classes)) == 1 or all(classes.count(cls) > 1 for cls in set(classes))


def _text_embedding(model: nn.Module) -> nn.Module | None:
    """The text's token embedding: the outermost Hugging Face model's ``get_input_embeddings()``, or the first one."""
    found = _hf_modules(model, "get_input_embeddings")
    return found[0] if found else next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _parent_holds(model: nn.Module, path: str, module: nn.Module) -> bool:
    """Whether the parent of the container at ``path`` holds ``module``'s weights (itself, or a tied copy)."""
    parent = model.get_submodule(path.rpartition(".")[0])
    weights = {id(p) for p in module.parameters()}
    return any(id(p) in weights for p in parent.parameters())


def _unrelated(name: str, paths: list[str]) -> bool:
    """Neither one of ``paths`` nor inside or around one of them."""
    return all(name != p and not name.startswith(p + ".") and not p.startswith(name + ".") for p in paths)


def _tower_roots(model: nn.Module, paths: list[str], others: list[str], text: nn.Module | None) -> set[str]:
    """The modules whose subtrees are towers: each other stack's branch below where it meets the chosen blocks.

    Where the chosen blocks have a root of their own below that meeting point (``model.language_model``), every
    other branch there is a tower too (a projector, a vision tower's own embeddings).
    """
    roots: set[str] = set()
    chosen = paths[0].split(".")
    text_side = [m for m in (text, *_hf_modules(model, "get_output_embeddings")) if m is not None]
    text_weights = {id(p) for m in text_side for p in m.parameters()}
    for other in others:
        parts = other.split(".")
        depth = next((i for i, (a, b) in enumerate(zip(parts, chosen, strict=False)) if a != b), len(parts))
        meeting = ".".join(parts[:depth])
        roots.add(".".join(parts[: depth + 1]))
        if len(chosen) - 1 > depth:  # the chosen blocks sit in a root of their own below the meeting point
            lm_branch = ".".join(chosen[: depth + 1])
            for child, module in model.get_submodule(meeting).named_children():
                branch = f"{meeting}.{child}" if meeting else child
                if branch != lm_branch and not any(id(p) in text_weights for p in module.parameters()):
                    roots.add(branch)
    return roots


def _in_any(name: str, roots: set[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _assign_always_on(
    model: nn.Module, paths: list[str], final_norm_paths: tuple[str, ...], towers: set[str], layer_map: LayerMap
) -> None:
    modules = dict(model.named_modules())
    block_params = {id(p) for block in layer_map.blocks for p in block.parameters()}
    outside = {
        name: module
        for name, module in modules.items()
        if not _in_any(name, set(paths)) and any(id(p) not in block_params for p in module.parameters(recurse=False))
    }
    known_norms = {id(modules[p]) for p in final_norm_paths if p in modules}
    in_towers = {name for name in outside if _in_any(name, towers)}
    text_side = {name: module for name, module in outside.items() if name not in in_towers}
    embeddings = _embedding_ids(model, text_side)
    heads = _head_ids(model, text_side, embeddings)
    blocks_seen = False
    for name, module in modules.items():
        blocks_seen = blocks_seen or name in paths
        if name not in outside:
            continue
        if name in in_towers:
            layer_map.towers.append(module)
        elif id(module) in known_norms:
            layer_map.final_norm.append(module)
        elif id(module) in embeddings:
            layer_map.embeddings.append(module)
        elif id(module) in heads:
            layer_map.head.append(module)
        elif not known_norms and blocks_seen and _is_norm(module):
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


def _shared_parameters(layer_map: LayerMap) -> list[tuple[nn.Parameter, tuple[int, ...]]]:
    holders: dict[int, tuple[nn.Parameter, list[int]]] = {}
    for index, block in enumerate(layer_map.blocks):
        for p in block.parameters():
            holders.setdefault(id(p), (p, []))[1].append(index)
    return [(p, tuple(indices)) for p, indices in holders.values() if len(indices) > 1]


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
