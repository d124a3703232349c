"""Lift parameter-use markers out of activation-checkpointed regions (Dynamo graph, pre-AOT).

``torch.utils.checkpoint.checkpoint`` (and ``checkpoint_wrapper``, HF gradient checkpointing,
selective checkpointing) traces into a higher-order op whose body is a subgraph. A parameter
read inside the region becomes a marker inside that body, where ``insert_collectives`` (which
rewrites one graph) would not see it, and the unit would fall back to one gather per read.

Before (Dynamo graph; ``s0``, ``s1`` are the unit's shards, lifted into the body)::

    out = tag_activation_checkpoint(body, s0, s1, x)
    body(s0, s1, x):
        w = fsdp_compile.param_use([s0, s1], None, unit=3, index=0, mode=SYNC)
        return linear(x, w)

After (the marker is evaluated outside the region; the body takes the full tensor as input)::

    w = fsdp_compile.param_use([s0, s1], None, unit=3, index=0, mode=SYNC)
    out = tag_activation_checkpoint(body, s0, s1, x, w)
    body(s0, s1, x, w):
        return linear(x, w)

A marker is a pure function of the shards, so evaluating it before the region changes no value.
The region then checkpoints only compute: the unit's gather is outside it, where
``insert_collectives`` makes it one gather per unit and ``reshard`` decides (by tags, the same
on every rank) whether backward gathers again (FULL_SHARD) or keeps the full tensors
(SHARD_GRAD_OP) -- so a checkpointed unit still has one all-gather and one reduce-scatter in
backward and never saves its gathered parameters under FULL_SHARD. Nested regions lift level by
level. Only checkpoint regions (``tag_activation_checkpoint``) and plain ``wrap`` bodies are
opened: their operands map one to one onto the body's inputs. Entry point ``hoist_markers``.
"""
from __future__ import annotations

import torch
import torch.fx

from fsdp_compile import torch_private
from fsdp_compile.passes.insert_collectives import is_param_use

_LIFTABLE = ("tag_activation_checkpoint", "wrap")


def _body_of(node: torch.fx.Node, gm: torch.fx.GraphModule):
    """The body GraphModule of a liftable higher-order op call, else None."""
    if node.op != "call_function" or not isinstance(node.target, torch_private.HigherOrderOperator):
        return None
    if node.target.__name__ not in _LIFTABLE or not node.args or node.args[0].op != "get_attr":
        return None
    body = getattr(gm, node.args[0].target)
    return body if isinstance(body, torch.fx.GraphModule) else None


def hoist_markers(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm`` (and its region bodies) in place; returns how many markers were lifted
    into ``gm`` from regions."""
    lifted = 0
    for node in list(gm.graph.nodes):
        body = _body_of(node, gm)
        if body is None:
            continue
        hoist_markers(body)  # inner regions first: their markers are now this body's
        lifted += _lift_from_body(gm, node, body)
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def _lift_from_body(gm: torch.fx.GraphModule, call: torch.fx.Node, body: torch.fx.GraphModule) -> int:
    markers = [n for n in body.graph.nodes if is_param_use(n)]
    if not markers:
        return 0
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = call.args[1:]
    if len(placeholders) != len(operands):
        return 0  # not the one-operand-per-input form we know how to rewrite
    outer_of = dict(zip(placeholders, operands))

    def outside(arg):
        if isinstance(arg, torch.fx.Node):
            if arg not in outer_of:
                raise RuntimeError(f"fsdp_compile: cannot lift a parameter read out of {call.name}: "
                                   f"its shard {arg.name} is computed inside the region")
            return outer_of[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(outside(a) for a in arg)
        return arg

    lifted: dict[tuple, torch.fx.Node] = {}  # (unit, index, mode) -> the body's new input
    last_input = placeholders[-1]
    new_operands = []
    for marker in markers:
        key = tuple(marker.args[2:])
        if key not in lifted:
            with gm.graph.inserting_before(call):
                outer = gm.graph.call_function(marker.target, outside(marker.args), dict(marker.kwargs))
                outer.meta.update(marker.meta)
            with body.graph.inserting_after(last_input):
                inner = body.graph.placeholder(f"fsdp_param_{len(lifted)}_{marker.name}")
                inner.meta.update(marker.meta)
            last_input = inner
            lifted[key] = inner
            new_operands.append(outer)
        marker.replace_all_uses_with(lifted[key])
        body.graph.erase_node(marker)
    call.args = (*call.args, *new_operands)
    body.graph.lint()
    body.recompile()
    return len(new_operands)
