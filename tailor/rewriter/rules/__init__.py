"""Recognition rules. Each is a small class with `pattern` (the op kinds it anchors on) and
`match(dataflow, node)`, returning a site or None; rules are grouped into sets per region."""
from __future__ import annotations

from tailor.rewriter.dataflow import Dataflow


def match_all(g: Dataflow, rules) -> list:
    """Every site any rule of the set finds, in graph order."""
    sites = []
    for node in g.nodes():
        for rule in rules:
            if g.op(node) in rule.pattern:
                site = rule.match(g, node)
                if site is not None:
                    sites.append(site)
    return sites
