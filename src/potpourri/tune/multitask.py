"""Multi-task inference: one frozen backbone shared by several SubTuned tasks (Kaplun et al., SubTuning §6).

Every task fine-tuned a few block-map entries (and its head) of the same pretrained backbone. Up to a task's
first tuned block it computes exactly what the frozen backbone computes, so that prefix runs **once** for all
tasks; from there each task runs its own path: its tuned copies where it tuned, the shared frozen modules (same
weights, so no extra memory, but its own activations) everywhere else. The backbone's forward is traced once
with ``torch.fx``, every block-map module a leaf, so the split needs no model-specific code.

Example:
    shared = MultiTaskModel.from_results(backbone, {"defects": result_a, "surface": result_b}).eval()
    logits = shared(images)  # {"defects": (B, 7), "surface": (B, 3)}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.models.blocks import block_map, check_blocks, entry_of

__all__ = ["BlockProgram", "MultiTaskModel", "load_task_model"]


class _BlockTracer(fx.Tracer):
    """Records calls of block-map modules without tracing into them."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)


class BlockProgram:
    """A model's forward as an ordered list of fx nodes, each tagged with the block-map entry whose weights it reads.

    ``run`` executes a slice of the nodes with modules looked up through a resolver, so the same program serves
    the shared backbone and every task's tuned copies. Traced in eval mode: inference (and frozen-prefix caching).
    """

    def __init__(self, model: nn.Module, bmap: Mapping[str, list[str]] | None = None) -> None:
        self.block_map = dict(bmap if bmap is not None else block_map(model))
        leaves = {prefix for prefixes in self.block_map.values() for prefix in prefixes}
        was_training = model.training
        model.eval()
        try:
            graph = _BlockTracer(leaves).trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, …) for untraceable Python
            raise PotpourriError(
                f"cannot trace {type(model).__name__}.forward with torch.fx ({type(exc).__name__}: {exc}); "
                "multi-task inference needs a forward without data-dependent Python control flow"
            ) from exc
        finally:
            model.train(was_training)
        self.nodes: list[fx.Node] = list(graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise PotpourriError(f"{type(model).__name__}.forward takes {len(inputs)} inputs; only one is supported")
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.entries: list[str | None] = [
            entry_of(str(n.target), self.block_map) if n.op in ("call_module", "get_attr") else None for n in self.nodes
        ]

    def branch_point(self, entries: Iterable[str]) -> int:
        """Index of the first node that reads weights of ``entries`` (the output node's index when none does)."""
        wanted = set(entries)
        return next((i for i, e in enumerate(self.entries) if e in wanted), len(self.nodes) - 1)

    def crossing(self, cut: int) -> list[fx.Node]:
        """Values computed before ``cut`` that a node at or after ``cut`` reads: what a suffix from ``cut`` needs."""
        needed = {arg for node in self.nodes[cut:] for arg in node.all_input_nodes if self.index[arg] < cut}
        return sorted(needed, key=self.index.__getitem__)

    def run(
        self,
        env: dict[fx.Node, Any],
        start: int,
        stop: int,
        module: Callable[[str], nn.Module],
        attribute: Callable[[str], Any],
    ) -> Any:
        """Execute nodes ``[start, stop)`` into ``env``; returns the model output if the output node was reached."""
        for node in self.nodes[start:stop]:
            if node.op == "placeholder":
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                return args[0]
            if node.op == "call_module":
                env[node] = module(str(node.target))(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # get_attr: a parameter or buffer read directly in forward (ViT cls_token, pos_embed)
                env[node] = attribute(str(node.target))
        return None

    @property
    def input_node(self) -> fx.Node:
        return next(n for n in self.nodes if n.op == "placeholder")


def _owner_prefix(target: str, prefixes: Iterable[str]) -> str | None:
    """The tuned prefix that ``target`` equals or sits under."""
    return next((p for p in prefixes if target == p or target.startswith(p + ".")), None)


def _key(prefix: str) -> str:
    return prefix.replace(".", ":")  # module names cannot contain dots


def _frozen_tensors(model: nn.Module, bmap: Mapping[str, list[str]], tuned: set[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: v for k, v in state.items() if entry_of(k, bmap) not in tuned and not k.endswith("num_batches_tracked")}


class MultiTaskModel(nn.Module):
    """Shared frozen backbone + per-task tuned entries; ``forward(x)`` returns ``{task: output}``.

    The trunk (nodes before the latest task branch point) runs once; each task then runs the nodes from its own
    branch point with its tuned modules. Backbone modules that every task replaces are dropped from memory.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Mapping[str, tuple[nn.Module, Sequence[str]]],
        *,
        block_map_override: Mapping[str, list[str]] | None = None,
    ) -> None:
        """``tasks``: name -> (that task's fine-tuned copy of ``backbone``, the block-map entries it tuned)."""
        super().__init__()
        if not tasks:
            raise PotpourriError("MultiTaskModel needs at least one task")
        self.program = BlockProgram(backbone, block_map_override)
        bmap = self.program.block_map
        reference = _frozen_tensors(backbone, bmap, set())
        self.task_entries: dict[str, list[str]] = {}
        self.tuned = nn.ModuleDict()  # task -> {prefix: tuned module copy}
        self.tuned_params = nn.ModuleDict()  # task -> {prefix: tuned parameter} for entries that are bare tensors
        for name, (model, entries) in tasks.items():
            entries = list(dict.fromkeys(entries))
            check_blocks(entries, bmap)
            for key, value in _frozen_tensors(model, bmap, set(entries)).items():
                same = key in reference and reference[key].shape == value.shape and torch.equal(reference[key], value)
                if not same:
                    raise PotpourriError(
                        f"task '{name}' differs from the shared backbone in '{key}' (entry "
                        f"'{entry_of(key, bmap)}', not among its tuned entries {entries}); build every task from "
                        "a SubTuning run of this same backbone, or list that entry as tuned"
                    )
            modules, params = nn.ModuleDict(), nn.ParameterDict()
            for entry in entries:
                for prefix in bmap[entry]:
                    try:
                        modules[_key(prefix)] = copy.deepcopy(model.get_submodule(prefix))
                    except AttributeError:
                        params[_key(prefix)] = copy.deepcopy(model.get_parameter(prefix))
            self.tuned[name] = modules
            self.tuned_params[name] = params
            self.task_entries[name] = entries
        self.branch = {name: self.program.branch_point(e) for name, e in self.task_entries.items()}
        self.trunk_stop = max(self.branch.values())
        self._keep = {node for start in self.branch.values() for node in self.program.crossing(start)}

        self.backbone = copy.deepcopy(backbone)
        shared_by_none = set.intersection(*(set(e) for e in self.task_entries.values()))
        for entry in shared_by_none:  # every task brings its own copy: the backbone's is never run
            for prefix in bmap[entry]:
                parent, _, child = prefix.rpartition(".")
                owner = self.backbone.get_submodule(parent) if parent else self.backbone
                if isinstance(getattr(owner, child, None), nn.Module):
                    setattr(owner, child, nn.Identity())
        self.backbone.requires_grad_(False)
        self.eval()

    # --- construction from tuning results and run folders ---------------------------------------------------

    @classmethod
    def from_results(cls, backbone: nn.Module, results: Mapping[str, Any]) -> MultiTaskModel:
        """Build from ``TuneResult`` objects (their ``model`` and ``plan['trainable_entries']``).

        Example:
            MultiTaskModel.from_results(backbone, {"a": fit(copy_a, ...), "b": fit(copy_b, ...)})
        """
        return cls(backbone, {name: (r.model, r.plan["trainable_entries"]) for name, r in results.items()})

    @classmethod
    def from_runs(cls, backbone: nn.Module, runs: Mapping[str, str | Path]) -> MultiTaskModel:
        """Build from ``potpourri tune --strategy subtuning --out RUN`` folders (model.safetensors + config.yaml)."""
        return cls(backbone, {name: load_task_model(backbone, path) for name, path in runs.items()})

    # --- inference --------------------------------------------------------------------------------------------

    def _resolvers(self, task: str | None) -> tuple[Callable[[str], nn.Module], Callable[[str], Any]]:
        modules = self.tuned[task] if task is not None else None
        params = self.tuned_params[task] if task is not None else None
        prefixes = [p for e in self.task_entries[task] for p in self.program.block_map[e]] if task else []

        def module(target: str) -> nn.Module:
            prefix = _owner_prefix(target, prefixes)
            if prefix is None:
                return self.backbone.get_submodule(target)
            own = modules[_key(prefix)]
            return own if target == prefix else own.get_submodule(target[len(prefix) + 1 :])

        def attribute(target: str) -> Any:
            prefix = _owner_prefix(target, prefixes)
            if prefix is None:
                owner, _, name = target.rpartition(".")
                return getattr(self.backbone.get_submodule(owner) if owner else self.backbone, name)
            if _key(prefix) in params:
                return params[_key(prefix)]
            owner, _, name = target[len(prefix) + 1 :].rpartition(".")
            return getattr(modules[_key(prefix)].get_submodule(owner), name)

        return module, attribute

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, 3, H, W) -> {task: (B, K_task)}
        program = self.program
        trunk: dict[fx.Node, Any] = {program.input_node: x}
        program.run(trunk, 0, self.trunk_stop, *self._resolvers(None))  # the shared prefix, once
        trunk = {node: value for node, value in trunk.items() if node in self._keep or node is program.input_node}
        outputs = {}
        for task, start in self.branch.items():
            env = dict(trunk)  # values a later branch overwrites are recomputed before this task reads them
            outputs[task] = program.run(env, start, len(program.nodes), *self._resolvers(task))
        return outputs

    # --- accounting ---------------------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Parameters held: the shared backbone, each task's own, and the total (what sits in memory)."""
        counts = {"shared": sum(p.numel() for p in self.backbone.parameters())}
        for task in self.task_entries:
            own = sum(p.numel() for p in self.tuned[task].parameters())
            counts[task] = own + sum(p.numel() for p in self.tuned_params[task].parameters())
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def describe(self) -> dict[str, Any]:
        """Tasks, their tuned entries and branch points (the block each one leaves the shared trunk at)."""
        names = {i: self.program.entries[i] or str(self.program.nodes[i].target) for i in self.branch.values()}
        return {
            "tasks": {t: {"tuned": e, "branches_at": names[self.branch[t]]} for t, e in self.task_entries.items()},
            "params": self.parameter_counts(),
        }


def load_task_model(backbone: nn.Module, run: str | Path) -> tuple[nn.Module, list[str]]:
    """A fine-tuned copy of ``backbone`` and its tuned entries, from a ``potpourri tune`` run folder."""
    import yaml

    from potpourri.core.io import load_state_dict_file

    folder = Path(run)
    config_path, weights_path = folder / "config.yaml", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise PotpourriError(
            f"'{folder}' is not a finished tune run (needs config.yaml and model.safetensors); "
            "pass the --out folder of `potpourri tune --strategy subtuning`"
        )
    config = yaml.safe_load(config_path.read_text()) or {}
    entries = config.get("trainable_entries")
    if not entries:
        raise PotpourriError(f"'{config_path}' lists no trainable_entries; was it written by `potpourri tune`?")
    state = load_state_dict_file(weights_path)
    model = copy.deepcopy(backbone)
    own = model.state_dict()
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]
    if resized:  # a head for this task's classes
        classes = int(state[resized[0]].shape[0])
        head_name = block_map(model).get("head", [""])[0]
        head = model.get_submodule(head_name) if head_name else None
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(classes)
        elif isinstance(head, nn.Linear):
            parent, _, child = head_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Linear(head.in_features, classes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise PotpourriError(f"run '{folder}' does not fit this backbone: {first[:200]}") from exc
    return model, list(entries)
