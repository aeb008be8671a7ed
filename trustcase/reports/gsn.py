"""GSN diagrams of the argument as Graphviz SVG: an overview, then one diagram per AMLAS stage (legible).

Shapes follow the GSN standard: goal = rectangle, strategy = parallelogram, solution = circle-like ellipse,
context = rounded rectangle, assumption / justification = ellipse marked A / J, undeveloped = a hollow
diamond under the goal. Fill colour = verdict. Every node links to the report section holding its evidence.
Rendered with the `dot` program (Debian package graphviz); without it, `svg` returns None and the report
shows the argument as an indented outline instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap

from trustcase.reports.argument import Argument, Node

FILL = {"PASS": ("#dafbe1", "#1a7f37"), "FAIL": ("#ffebe9", "#cf222e"), "INCONCLUSIVE": ("#fff8c5", "#9a6700"),
        None: ("#f6f8fa", "#59636e")}
SHAPES = {"goal": "box", "strategy": "parallelogram", "solution": "ellipse", "context": "box",
          "assumption": "ellipse", "justification": "ellipse"}
WIDTH = {"goal": 30, "strategy": 44, "solution": 24, "context": 30, "assumption": 30, "justification": 30}


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _label(n: Node, max_lines: int = 7) -> str:
    lines = textwrap.wrap(n.text, WIDTH[n.kind]) or [""]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1][: WIDTH[n.kind] - 1] + "…"]
    head = n.id
    if n.verdict is not None:
        head += f"  [{n.verdict.value}]"
    if not n.counted:
        head += "  (advisory, not counted)"
    if n.kind in ("assumption", "justification"):
        head += f"  ({n.kind[0].upper()})"
    return "\\n".join(_esc(x) for x in [head, *lines])


def dot_source(arg: Argument, ids: list[str], title: str, collapsed: set[str] = frozenset()) -> str:
    """Graphviz source for the given nodes; `collapsed` goals are drawn without their support, linked."""
    out = ["digraph gsn {", f'  graph [rankdir=TB, nodesep=0.22, ranksep=0.32, fontname="DejaVu Sans", '
           f'fontsize=12, label="{_esc(title)}", labelloc=t, tooltip="{_esc(title)}"];',
           '  node [fontname="DejaVu Sans", fontsize=9, margin="0.08,0.05", penwidth=1.4];',
           '  edge [arrowsize=0.7, color="#59636e"];']
    shown = set(ids)
    for i in ids:
        n = arg.nodes[i]
        fill, line = FILL[n.verdict.value if n.verdict else None]
        attrs = {"shape": SHAPES[n.kind], "label": _label(n), "fillcolor": fill, "color": line, "style": "filled",
                 "tooltip": _esc(n.details.get("why") or n.text)}
        if n.kind == "context":
            attrs["style"] = "filled,rounded"
        if not n.counted:
            attrs["style"] += ",dashed"
        if n.anchor:
            attrs["URL"] = f"#{n.anchor}"
            attrs["target"] = "_self"
        out.append(f'  "{i}" [' + ", ".join(f'{k}="{v}"' for k, v in attrs.items()) + "];")
        if n.undeveloped and i not in collapsed:
            out.append(f'  "{i}__u" [shape=diamond, label="", width=0.22, height=0.22, style=filled, '
                       f'fillcolor=white, color="{line}", tooltip="undeveloped"];')
            out.append(f'  "{i}" -> "{i}__u" [arrowhead=none];')
    for i in ids:
        n = arg.nodes[i]
        if i not in collapsed:
            for s in n.supported_by:
                if s in shown:
                    out.append(f'  "{i}" -> "{s}" [arrowhead=normal];')
        for c in n.in_context_of:
            if c in shown:
                out.append(f'  "{i}" -> "{c}" [arrowhead=empty, style=solid];')
                out.append(f'  {{rank=same; "{i}"; "{c}"}}')
    out.append("}")
    return "\n".join(out)


def overview_ids(arg: Argument) -> list[str]:
    top = arg.nodes[arg.root]
    strategy = top.supported_by[0] if top.supported_by else None
    ids = [arg.root, *top.in_context_of]
    if strategy:
        ids += [strategy, *arg.nodes[strategy].in_context_of, *arg.nodes[strategy].supported_by]
    return ids


def sources(arg: Argument, stage_titles: dict[str, str]) -> dict[str, str]:
    """Graphviz source per diagram: 'overview', then one per AMLAS stage goal."""
    overview = overview_ids(arg)
    stage_goals = [g for g in overview if g in arg.stage_goals.values()]
    out = {"overview": dot_source(arg, overview, "Top goal and AMLAS stages", collapsed=set(stage_goals))}
    legs = [arg.stage_goals[s] for s in ("testing", "formal") if s in arg.stage_goals]
    below_legs = {n for leg in legs for n in arg.descendants(leg)} - set(legs)
    for stage, goal in arg.stage_goals.items():
        ids = arg.descendants(goal)
        if stage == "verification":  # its two legs collapsed: each has a diagram of its own (legible on a page)
            out[stage] = dot_source(arg, [n for n in ids if n not in below_legs], stage_titles.get(stage, stage),
                                    collapsed=set(legs))
        else:
            out[stage] = dot_source(arg, ids, stage_titles.get(stage, stage))
    return out


def available() -> bool:
    return shutil.which("dot") is not None


def svg(source: str, timeout: float = 60) -> str | None:
    """Run `dot -Tsvg`; the SVG without XML prolog (to be inlined in HTML), or None without Graphviz."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    done = subprocess.run([exe, "-Tsvg"], input=source.encode(), capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"graphviz failed: {done.stderr.decode(errors='replace')[:500]}")
    text = done.stdout.decode()
    text = text[text.index("<svg"):]
    text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S)  # generator comments (version numbers)
    # scale to the container (height follows the viewBox), never beyond the natural size
    return re.sub(r'<svg width="(\d+)pt" height="(\d+)pt"',
                  lambda m: f'<svg class="gsn" width="100%" data-width="{m[1]}" style="max-width:{m[1]}pt"',
                  text, count=1)


def width_pt(svg_text: str) -> int:
    m = re.search(r'data-width="(\d+)"', svg_text)
    return int(m[1]) if m else 0
