"""One registry of every model the library builds: classifiers, detectors, segmenters and their peers.

As torchvision's ``list_models`` / ``get_model`` and timm's ``register_model``: each documented
builder registers itself with its task, its head and its backbone, and everything that needs a
model by name (``mobileone.create_model``, the command line, the benchmarks) looks it up here.
The task modules need torchvision, so they register when imported; ``mobileone.list_models`` and
``mobileone.create_model`` import them on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

TASKS = ("classify", "detect", "segment")
PEER = "mnv3"  # the MobileNetV3-Large peer of every task: torchvision's trunk, no weights
PEER_ALIASES = (PEER, "mobilenet_v3_large")

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, task, head (``None`` for a classifier), backbone and builder."""

    name: str
    task: str
    backbone: str  # "mobileone_s0" .. or PEER
    builder: Callable[..., nn.Module]
    head: str | None = None

    @property
    def peer(self) -> bool:
        """Whether this is a reference model (not MobileOne) kept for fair comparisons."""
        return self.backbone == PEER


_REGISTRY: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry``; registering a name again for the same task, backbone and head keeps the first entry."""
    if entry.task not in TASKS:
        raise ValueError(f"unknown task {entry.task!r}; choose one of {list(TASKS)}")
    known = _REGISTRY.get(entry.name)
    if known is None:
        _REGISTRY[entry.name] = entry
        return entry
    if (known.task, known.backbone, known.head) != (entry.task, entry.backbone, entry.head):
        raise ValueError(f"a model named {entry.name!r} is registered already ({known.task}); choose another name")
    return known


def register_model(task: str, backbone: str, head: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register a builder function under its own name."""

    def wrap(fn: Builder) -> Builder:
        register(ModelEntry(fn.__name__, task, backbone, fn, head))
        return fn

    return wrap


def normalize_name(name: str) -> str:
    """One spelling of a model name: lower case, ``-`` as ``_``, ``mobilenet_v3_large`` as ``mnv3``."""
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace("\u03bc", "mu")
    return key.replace("mobilenet_v3_large", PEER)


def list_registered(task: str | None = None, *, peers: bool = True) -> list[str]:
    """Registered names, in registration order; ``task`` filters; ``peers=False`` keeps MobileOne models only."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)} or None for all")
    return [n for n, e in _REGISTRY.items() if (task is None or e.task == task) and (peers or not e.peer)]


def find_model(name: str, task: str | None = None) -> ModelEntry:
    """The entry registered as ``name`` (any spelling :func:`normalize_name` accepts); a clear error otherwise."""
    key = normalize_name(name)
    entry = _REGISTRY.get(key)
    if entry is None and not key.startswith("mobileone_"):
        entry = _REGISTRY.get(f"mobileone_{key}")  # "s0" names the classifier
    if entry is None or (task is not None and entry.task != task):
        head = key.partition("_")[0]
        task = task or next((e.task for e in _REGISTRY.values() if e.head == head), None)
        known = list_registered(task)
        where = f" for task {task!r}" if task else ""
        raise ValueError(f"unknown model {name!r}{where}; choose one of {known}")
    return entry


def names_a_task_model(name: str) -> bool:
    """Whether ``name`` starts with a registered head (``ssdlite_``, ``deeplabv3_`` ...): a detector or segmenter."""
    heads = {e.head for e in _REGISTRY.values() if e.head}
    return normalize_name(name).partition("_")[0] in heads


def find_by_parts(task: str, backbone: str, head: str | None = None) -> ModelEntry:
    """The entry of ``task`` with this backbone (``mobileone_s0`` or the peer) and head."""
    for entry in _REGISTRY.values():
        if entry.task == task and entry.backbone == backbone and entry.head == head:
            return entry
    heads = sorted({e.head for e in _REGISTRY.values() if e.task == task and e.head})
    raise ValueError(
        f"no {task} model with backbone {backbone!r} and head {head!r}; heads: {heads}, models: {list_registered(task)}"
    )


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with its builder's keyword arguments."""
    return find_model(name).builder(**kwargs)


def documented_builders(
    task: str, build: Callable[..., nn.Module], summaries: dict[str, str], args: str, example: str
) -> tuple[Callable[..., nn.Module], ...]:
    """One documented, registered builder function per entry of ``summaries`` (name -> what the model is).

    As torchvision's and timm's one function per model, without writing the same function twenty times:
    ``name(*args, **kwargs)`` is ``build(name, *args, **kwargs)``; its docstring is the summary, ``args`` (the
    Args section) and an example calling it with ``example``. A name ``head_s0`` has head ``head`` and
    backbone ``mobileone_s0`` (``head_mnv3``: the peer); a classifier's name is its backbone.
    """

    def make(name: str, summary: str) -> Callable[..., nn.Module]:
        def builder(*call_args: Any, **kwargs: Any) -> nn.Module:
            return build(name, *call_args, **kwargs)

        head, _, tail = name.partition("_")
        head_name, backbone = (
            (None, name) if task == "classify" else (head, PEER if tail == PEER else f"mobileone_{tail}")
        )
        builder.__name__ = builder.__qualname__ = name
        builder.__doc__ = f"{summary}\n\nArgs:\n    {args}\n\nExample:\n    >>> model = {name}({example})\n"
        register(ModelEntry(name, task, backbone, builder, head_name))
        return builder

    return tuple(make(name, summary) for name, summary in summaries.items())
