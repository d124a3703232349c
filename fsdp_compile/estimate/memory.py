"""Memory over one compiled step, read off the partitioned forward and backward graphs.

Model (what a compiled step allocates on top of the steady state, i.e. the parameters' shards,
buffers and optimizer state):

- every node's output storage (``node.meta["val"]``, fake tensors) is allocated when the node
  runs, unless it aliases a storage already live (a view);
- a storage is freed after the last node that reads it, unless the graph returns it: the
  forward's outputs (the loss and the activations saved for backward) live into the backward;
  the backward's inputs (saved activations) are freed after their last use in the backward, as
  Inductor's generated code does; the backward's outputs (the gradients' reduced shards) live on
  through the optimizer step;
- graph inputs that are parameters' shards or the batch are not counted (steady state / caller's);
- the last graph's forward returns the gathered tensors of a unit still open when it ends (the
  root unit, kept gathered into backward; every block of a per-block compile): its post-forward
  hook runs after the graph and drops them, so those the backward does not read are freed
  there. Since nothing reads them after the graph, autograd materializes their gradients as
  zeros of the gathered shapes before that graph's backward runs (``returned_gathered``); the
  backward adds them to the parameters' gradients and frees each after its last use.

So the curve holds, at every node: gathered units in flight (prefetch included: the reorder pass
issued them early), activations saved for backward, reduce buffers, and gradients produced so
far. Allocator effects (fragmentation, caching, Inductor's buffer reuse and fusion) are not
modelled, but ``gloo_temporaries=True`` adds what gloo's all-gather allocates besides our
buffers: a flat temporary of the gathered size, live from the collective's issue to its wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from fsdp_compile.torch_private import tree_leaves


@dataclass
class Point:
    phase: str  # "forward" / "backward" / "optimizer"
    index: int  # node index inside its graph
    node: str  # the node's name
    op: str  # its target
    bytes: int  # transient bytes live after the node ran


@dataclass
class Timeline:
    points: list[Point] = field(default_factory=list)

    @property
    def peak(self) -> Point:
        return max(self.points, key=lambda p: p.bytes) if self.points else Point("forward", 0, "", "", 0)


def _storages(val) -> list[tuple[StorageWeakRef, int]]:
    out = []
    for leaf in tree_leaves(val):
        if isinstance(leaf, torch.Tensor):
            try:
                storage = leaf.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            out.append((StorageWeakRef(storage), _concrete(storage.nbytes())))
    return out


def _concrete(n) -> int:
    """Bytes as an int: a symbolic size (a storage the trace sized symbolically) takes its hint."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    if hint is None:
        raise RuntimeError(f"fsdp_compile.estimate: a buffer of the compiled step has a size with no value ({n})")
    return int(hint)


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else node.op


def _unwrap_getitem(node: torch.fx.Node) -> torch.fx.Node:
    while _target_name(node) == "getitem" and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def returned_gathered(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule) -> tuple[dict, dict]:
    """The forward's outputs that are gathered parameters (a getitem of an all-gather copy-out,
    or the all-gather's wait itself), as two maps storage -> bytes: those outputs the backward
    does not read (freed when the unit's post-forward hook drops them), and their tangents in
    ``backward``, which autograd materializes as zeros before the backward runs. The forward
    returns its user outputs, one per tangent of the backward, then what it saves for the
    backward; an output whose shape differs from its tangent's stops the match. ``backward``
    may be another compile's backward of the same forward code (only its tangents are read).
    For a graph that ends with the unit still gathered (its post-forward hook runs after the
    graph): the whole model's last graph, a per-block compiled block's graph. An earlier
    graph's gathered outputs are read by the next graph (a graph break inside a unit), which
    returns their real gradients."""
    output = next((n for n in forward.graph.nodes if n.op == "output"), None)
    tangents = [n for n in backward.graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    if output is None or not tangents:
        return {}, {}
    outs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    saved = {key for n in outs[len(tangents):] if isinstance(n, torch.fx.Node)
             for key, _ in _storages(n.meta.get("val"))}
    unread, zeros = {}, {}
    for out, tangent in zip(outs, tangents):
        if not isinstance(out, torch.fx.Node):
            break
        out_val, tangent_val = out.meta.get("val"), tangent.meta.get("val")
        if not isinstance(out_val, torch.Tensor) or not isinstance(tangent_val, torch.Tensor):
            break
        if tuple(out_val.shape) != tuple(tangent_val.shape):
            break
        source = _target_name(_unwrap_getitem(out))
        if "copy_out" in source or source.startswith("wait_tensor"):
            zeros.update(_storages(tangent_val))
            unread.update((key, n) for key, n in _storages(out_val) if key not in saved)
    return unread, zeros


def walk_graph(
    gm: torch.fx.GraphModule,
    phase: str,
    live: dict,
    timeline: Timeline,
    free_inputs: bool,
    output_survives: bool = True,
    gloo_temporaries: bool = False,
) -> list:
    """Append ``gm``'s nodes to ``timeline``. ``live`` maps storage -> bytes of the transient
    storages alive when the graph starts (updated in place). ``free_inputs``: an input storage
    in ``live`` is freed after its last use. Returns the storages of the graph's outputs."""
    nodes = list(gm.graph.nodes)
    last_use: dict = {}
    for i, node in enumerate(nodes):
        for key, _ in _storages(node.meta.get("val")):
            last_use[key] = max(last_use.get(key, -1), i)
        for arg in node.all_input_nodes:
            for key, _ in _storages(arg.meta.get("val")):
                last_use[key] = max(last_use.get(key, -1), i)
    output = next((n for n in nodes if n.op == "output"), None)
    kept = set()
    if output is not None and output_survives:
        for arg in output.all_input_nodes:
            kept.update(key for key, _ in _storages(arg.meta.get("val")))
    inputs = set()
    for node in nodes:
        if node.op == "placeholder":
            inputs.update(key for key, _ in _storages(node.meta.get("val")))
    total = sum(live.values())
    temporaries: dict[str, int] = {}  # wait node name -> bytes freed there
    for i, node in enumerate(nodes):
        total -= temporaries.pop(node.name, 0)
        if node.op not in ("placeholder", "output"):
            for key, nbytes in _storages(node.meta.get("val")):
                if key not in live and key not in inputs:
                    live[key] = nbytes
                    total += nbytes
            if gloo_temporaries and _target_name(node).startswith("all_gather_into_tensor"):
                wait = next((u for u in node.users if _target_name(u).startswith("wait_tensor")), None)
                if wait is not None:
                    temporaries[wait.name] = sum(n for _, n in _storages(node.meta.get("val")))
                    total += temporaries[wait.name]
        timeline.points.append(Point(phase, i, node.name, _target_name(node), total))
        for key in {k for arg in [node, *node.all_input_nodes] for k, _ in _storages(arg.meta.get("val"))}:
            if last_use.get(key) != i or key in kept or key not in live:
                continue
            if key in inputs and not free_inputs:
                continue
            total -= live.pop(key)
    return [key for key in kept if key in live]
