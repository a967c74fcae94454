"""Rewrite rules and the driver that applies an ordered rule set to a graph (onnxscript / tinygrad style).

A rule is data: the ops its pattern is rooted at (``anchors``), a ``match`` that looks at the
graph around an anchor node and returns either the bindings the rewrite needs, ``None`` when
the node is not a candidate at all, or a string saying why a candidate does not match (a
near miss the pass reports), and a ``rewrite`` that emits the replacement and says which old
values the new ones stand for. The driver, not the rules, does the bookkeeping: visiting
nodes in order, keeping what no rule rewrites, replacing uses, removing dead nodes, and
repeating until no rule applies.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from umc.ir.core import Graph, IRError, Node, Value
from umc.passes.editor import Editor

MAX_ROUNDS = 8


class Context:
    """Read-only views of the graph a rule matches against: producers, readers, weights."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._producers = graph.producers()
        self._users = graph.users()
        self._outputs = {v.id for v in graph.outputs}
        self.weights = {v.id for v in graph.params} | {v.id for n in graph.init_nodes for v in n.outputs}

    def producer(self, value: Value, op: str | None = None) -> Node | None:
        """The node defining ``value`` (None for inputs and params), if it is an ``op`` node when op is given."""
        node = self._producers.get(value.id)
        return node if node is not None and (op is None or node.op == op) else None

    def readers(self, value: Value) -> list[Node]:
        """Nodes reading ``value``."""
        return self._users.get(value.id, [])

    def only_read_by(self, value: Value, node: Node) -> bool:
        """True when ``node`` is the one reader of ``value`` and it is not a graph output."""
        return value.id not in self._outputs and all(r is node for r in self.readers(value))


Bindings = dict[str, Any]
MatchResult = Bindings | str | None


@dataclass(frozen=True)
class Rule:
    """A pattern rooted at one of ``anchors``, its constraints (``match``) and its replacement (``rewrite``).

    ``rewrite(node, bindings, editor)`` returns {old value: new value}; ``note`` describes one application.
    """

    name: str
    anchors: tuple[str, ...]
    match: Callable[[Node, Context], MatchResult]
    rewrite: Callable[[Node, Bindings, Editor], dict[Value, Value]]
    note: str


def apply_rules(graph: Graph, rules: tuple[Rule, ...]) -> tuple[Graph, list[str]]:
    """Apply ``rules`` (first matching rule wins at each node) until none applies; the graph and notes.

    Notes say what each rule did (with counts) and why near-miss candidates were left alone.
    """
    applied: Counter[str] = Counter()
    misses: dict[str, list[str]] = {}
    for _ in range(MAX_ROUNDS):
        graph, changed = _one_round(graph, rules, applied, misses)
        if not changed:
            break
    else:
        raise IRError(f"rules {', '.join(r.name for r in rules)} still rewrite after {MAX_ROUNDS} rounds: "
                      "a rule matches its own replacement")
    notes = [f"{rule.note} (x{applied[rule.name]})" if applied[rule.name] > 1 else rule.note
             for rule in rules if applied[rule.name]]
    for name, reasons in misses.items():
        unique = list(dict.fromkeys(reasons))
        notes.append(f"{name} left {len(reasons)} candidate(s) alone: {'; '.join(unique[:3])}")
    return graph, notes


def _one_round(graph: Graph, rules: tuple[Rule, ...], applied: Counter, misses: dict[str, list[str]]):
    context = Context(graph)
    editor = Editor(graph)
    changed = False
    round_misses: dict[str, list[str]] = {}
    for node in graph.nodes:
        for rule in rules:
            if node.op not in rule.anchors:
                continue
            found = rule.match(node, context)
            if isinstance(found, str):
                round_misses.setdefault(rule.name, []).append(f"{node.scope}: {found}")
            if not isinstance(found, dict):
                continue
            for old, new in rule.rewrite(node, found, editor).items():
                editor.replace(old, new)
            applied[rule.name] += 1
            changed = True
            break
        else:
            editor.keep(node)
    if not changed:
        misses.update(round_misses)
        return graph, False
    return editor.finish(), True
