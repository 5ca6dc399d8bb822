"""`tether report RUN_DIR`: one self-contained HTML file per run (docs/diagnostics.md).

The report holds the run's curves from metrics.jsonl (matplotlib, Agg, embedded as base64 PNG),
the warnings the run raised, the evaluation table before vs after (from eval.json when
`tether eval` wrote one, else the first and last `eval/*` values of metrics.jsonl) and sample
completions before vs after for the same prompts (eval.json, else samples.jsonl). No network, no
external CSS or JavaScript: the file opens anywhere. Every piece of text is HTML-escaped.

Reading and grouping are small pure functions; `write_report` is the only one that touches disk.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path

import yaml

from tether.errors import TetherError

MAX_SAMPLES = 8  # prompts shown in the samples section
RECIPE_SECTIONS = ("pipeline", "dpo", "ppo", "grpo", "prm", "rm")  # first match names the recipe
RECIPE_NAMES = {"pipeline": "rlhf"}
KL_KEYS = ("kl/k1", "kl/k3", "policy/approx_kl")
CLIP_KEYS = ("policy/clipfrac", "policy/clipfrac_low", "policy/clipfrac_high")


# --- reading a run --------------------------------------------------------------------------


@dataclass
class Run:
    """What a run directory holds, parsed; missing files are empty / None."""
    run_dir: Path
    records: list[dict]  # metrics.jsonl lines, in order
    skipped_lines: int = 0  # metrics.jsonl lines that were not JSON objects (e.g. a torn last line)
    config: dict | None = None  # config.yaml
    eval_doc: dict | None = None  # eval.json
    samples: list[dict] = field(default_factory=list)  # samples.jsonl lines


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(JSON-object lines, number of lines skipped because they were not one)."""
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def read_eval_json(path: Path) -> dict:
    """eval.json as written by `tether eval`; a file that is not one is a TetherError naming it."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TetherError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise TetherError(f"{path}: not an eval.json written by `tether eval` (no 'results')")
    return doc


def load_run(run_dir: Path) -> Run:
    """Parse a run directory; a missing directory or metrics.jsonl is a TetherError naming it."""
    if not run_dir.is_dir():
        raise TetherError(f"run directory '{run_dir}' does not exist")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        stages = sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl"))
        hint = f" (subdirectories that have one: {', '.join(stages)})" if stages else ""
        raise TetherError(f"'{run_dir}' has no metrics.jsonl (not a tether run directory?){hint}")
    records, skipped = read_jsonl(metrics)
    config_path, eval_path, samples_path = (run_dir / n for n in
                                            ("config.yaml", "eval.json", "samples.jsonl"))
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    return Run(run_dir=run_dir, records=records, skipped_lines=skipped,
               config=config if isinstance(config, dict) else None,
               eval_doc=read_eval_json(eval_path) if eval_path.is_file() else None,
               samples=read_jsonl(samples_path)[0] if samples_path.is_file() else [])


def detect_recipe(config: dict | None) -> str:
    """The recipe a resolved config belongs to, from its top-level sections (sft has none)."""
    if config is None:
        return "unknown (no config.yaml)"
    section = next((s for s in RECIPE_SECTIONS if s in config), None)
    return RECIPE_NAMES.get(section, section) if section else "sft"


def number(value) -> float | None:
    """A metric value as a float: numbers and the strings "nan"/"inf"/"-inf"; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf",
                                                            "infinity", "-infinity"):
        return float(value)
    return None


def num_steps(records: list[dict]) -> int:
    """The largest step logged (0 for an empty file)."""
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)


def metric_keys(records: list[dict]) -> list[str]:
    """Every key with a numeric value somewhere, in order of first appearance (not `step`)."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and number(v) is not None:
                seen.setdefault(k)
    return list(seen)


def series(records: list[dict], key: str) -> tuple[list[int], list[float], int]:
    """(steps, values) of the finite values of `key`, and how many non-finite ones were dropped."""
    steps, values, dropped = [], [], 0
    for r in records:
        v = number(r.get(key))
        if v is None:
            continue
        if math.isfinite(v):
            steps.append(r.get("step", 0))
            values.append(v)
        else:
            dropped += 1
    return steps, values, dropped


# --- figures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureSpec:
    """One figure: its keys on one axis, on twin y-axes (`twin`), or one panel each (`panels`)."""
    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    twin: bool = False
    panels: bool = False


def _is_reward_mean(key: str) -> bool:
    return key == "reward/mean" or (key.startswith("reward/") and key.endswith("/mean"))


def figure_specs(keys: list[str]) -> list[FigureSpec]:
    """The report's figure groups over the keys present; a group with no key is left out."""
    present = set(keys)

    def pick(pred) -> tuple[str, ...]:
        return tuple(k for k in keys if pred(k))  # in the order of `keys`

    specs = [
        FigureSpec("Loss", pick(lambda k: k.startswith("loss/")), "loss"),
        FigureSpec("Reward", pick(_is_reward_mean), "reward"),
        FigureSpec("Gold vs proxy reward", ("gold/mean", "reward/mean"), twin=True)
        if {"gold/mean", "reward/mean"} <= present else
        FigureSpec("Gold reward", pick(lambda k: k == "gold/mean"), "gold"),
        FigureSpec("KL to the reference", pick(lambda k: k in KL_KEYS), "KL (nats)"),
        FigureSpec("Entropy", pick(lambda k: k == "policy/entropy"), "nats / token"),
        FigureSpec("Completion length", pick(lambda k: k == "completions/mean_length"), "tokens"),
        FigureSpec("Clip fraction", pick(lambda k: k in CLIP_KEYS), "fraction"),
        FigureSpec("Time per step", pick(lambda k: k.startswith("timing/")), "seconds"),
        FigureSpec("Evaluations", pick(lambda k: k.startswith("eval/") and k not in KL_KEYS),
                   panels=True),
    ]
    return [s for s in specs if s.keys]


@dataclass(frozen=True)
class RenderedFigure:
    spec: FigureSpec
    png: bytes
    keys: tuple[str, ...]  # the keys that had at least one finite point
    points: int  # finite points plotted, all keys together
    dropped: dict[str, int]  # non-finite values left out, per key


def _plot(ax, steps: list[int], values: list[float], label: str, color=None) -> None:
    """One curve over steps (markers when there are few points; whole steps on the x axis)."""
    from matplotlib.ticker import MaxNLocator

    ax.plot(steps, values, label=label, color=color, marker="o" if len(values) <= 30 else None,
            markersize=3, linewidth=1.4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _axes(fig, n: int) -> list:
    cols = min(3, n)
    rows = -(-n // cols)
    return list(fig.subplots(rows, cols, squeeze=False).flat)[:n]


def render_figure(spec: FigureSpec, records: list[dict]) -> RenderedFigure | None:
    """Plot a figure spec from the records as PNG bytes; None when no key has a finite point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = {k: series(records, k) for k in spec.keys}
    plotted = tuple(k for k in spec.keys if data[k][0])
    if not plotted:
        return None
    rows = -(-len(plotted) // 3) if spec.panels else 1
    fig = Figure(figsize=(9, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if spec.panels:
        for ax, key in zip(_axes(fig, len(plotted)), plotted):
            _plot(ax, *data[key][:2], key)
            ax.set_title(key, fontsize=9)
            ax.grid(alpha=0.3)
    elif spec.twin and len(plotted) == 2:
        left = fig.subplots()
        right = left.twinx()
        for ax, key, color in ((left, plotted[0], "tab:green"), (right, plotted[1], "tab:blue")):
            _plot(ax, *data[key][:2], key, color=color)
            ax.set_ylabel(key, color=color)
        fig.legend(loc="outside upper right", fontsize=8)
        left.grid(alpha=0.3)
    else:
        ax = fig.subplots()
        for key in plotted:
            _plot(ax, *data[key][:2], key)
        ax.set_ylabel(spec.ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(spec.title)
    fig.supxlabel("step", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    dropped = {k: data[k][2] for k in spec.keys if data[k][2]}
    return RenderedFigure(spec, buf.getvalue(), plotted,
                          sum(len(data[k][0]) for k in plotted), dropped)


# --- warnings, evaluation table, samples ----------------------------------------------------


def collect_warnings(records: list[dict]) -> list[tuple[int, str, str]]:
    """(step, name, message) for every name in a line's `warnings` list (message may be "")."""
    found = []
    for r in records:
        names = r.get("warnings")
        if not isinstance(names, list):
            continue
        messages = r.get("warning_messages")
        messages = messages if isinstance(messages, list) else []
        for i, name in enumerate(names):
            message = messages[i] if i < len(messages) else ""
            found.append((r.get("step", 0), str(name), str(message)))
    return found


@dataclass(frozen=True)
class EvalRow:
    metric: str
    before: float | None
    after: float | None

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before


def eval_rows_from_json(doc: dict) -> list[EvalRow]:
    """metric | reference (before) | policy (after), over the keys of either side."""
    results = doc.get("results", {})
    ref = (results.get("reference") or {}).get("metrics") or {}
    pol = (results.get("policy") or {}).get("metrics") or {}
    keys = list(dict.fromkeys([*pol, *ref]))
    return [EvalRow(k, number(ref.get(k)), number(pol.get(k))) for k in keys]


def eval_rows_from_metrics(records: list[dict]) -> list[EvalRow]:
    """For each `eval/*` key of metrics.jsonl, its first logged value (before) and last (after)."""
    rows = []
    for key in metric_keys(records):
        if key.startswith("eval/"):
            values = [v for v in (number(r.get(key)) for r in records) if v is not None]
            rows.append(EvalRow(key, values[0], values[-1]))
    return rows


@dataclass(frozen=True)
class Sample:
    completion: str
    scores: dict[str, float]  # e.g. {"gold": 0.3, "proxy": 1.2}; absent / null scores left out


@dataclass(frozen=True)
class SamplePair:
    prompt: str
    before: Sample
    after: Sample


def _text(value) -> str:
    """Text to show: a string as it is, None as "", anything else (chat messages) as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _sample(row: dict, score_keys: tuple[str, ...]) -> Sample:
    scores = {k: v for k in score_keys if (v := number(row.get(k))) is not None}
    return Sample(_text(row.get("completion")), scores)


def sample_pairs_from_eval(doc: dict, limit: int = MAX_SAMPLES) -> list[SamplePair]:
    """Reference (before) vs policy (after) samples of eval.json, matched by index (the two
    lists hold the same prompts in the same order; a pair whose prompts differ is left out)."""
    results = doc.get("results", {})
    ref = (results.get("reference") or {}).get("samples") or []
    pol = (results.get("policy") or {}).get("samples") or []
    pairs = [SamplePair(_text(p.get("prompt")), _sample(r, ("gold", "proxy")),
                        _sample(p, ("gold", "proxy")))
             for r, p in zip(ref, pol) if r.get("prompt") == p.get("prompt")]
    return pairs[:limit]


def _first_per_prompt(rows: list[dict], step: int) -> dict[str, dict]:
    """prompt -> its first row at `step`."""
    found: dict[str, dict] = {}
    for r in rows:
        if r["step"] == step:
            found.setdefault(_text(r["prompt"]), r)
    return found


def sample_pairs_from_jsonl(rows: list[dict],
                            limit: int = MAX_SAMPLES) -> tuple[list[SamplePair], tuple[int, int]]:
    """Samples of the smallest step (before) vs the largest (after), matched by prompt (the
    first completion of a prompt at each step), and those two steps. No pairs with one step."""
    rows = [r for r in rows if isinstance(r.get("step"), int) and "prompt" in r]
    if not rows:
        return [], (0, 0)
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    if first == last:
        return [], (first, last)
    before, after = _first_per_prompt(rows, first), _first_per_prompt(rows, last)
    pairs = [SamplePair(p, _sample(before[p], ("reward", "gold")),
                        _sample(after[p], ("reward", "gold")))
             for p in before if p in after]
    return pairs[:limit], (first, last)


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption, .note { color: #666; font-size: 0.9em; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.85em; }
table.samples { width: 100%; table-layout: fixed; }
"""


def fmt(value: float | None, signed: bool = False) -> str:
    """A number for a table cell: 4 significant digits, "nan"/"inf" kept, None as an em dash."""
    if value is None:
        return "\u2014"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _table(css_class: str, header: list[str], rows: list[list[str]]) -> str:
    """An HTML table: `header` is plain text (escaped here), each row a list of `<td>` cells
    already rendered (by `_td`, which escapes)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(text: str, num: bool = False) -> str:
    return f'<td class="num">{escape(text)}</td>' if num else f"<td>{escape(text)}</td>"


def html_header(run: Run, written: str) -> str:
    items = [("run directory", str(run.run_dir)), ("recipe", detect_recipe(run.config)),
             ("written", written), ("steps", str(num_steps(run.records)))]
    rows = [[f"<th>{escape(k)}</th>", _td(v)] for k, v in items]
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<h1>tether report</h1><table class="meta"><tbody>{body}</tbody></table>'


def html_figure(fig: RenderedFigure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    caption = f"{fig.spec.title}: {', '.join(fig.keys)} ({fig.points} points)"
    if fig.dropped:
        caption += "; non-finite values left out: " + ", ".join(
            f"{k} \u00d7{n}" for k, n in fig.dropped.items())
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(fig.spec.title)}" '
            f'data-metrics="{escape(",".join(fig.keys))}" data-points="{fig.points}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def html_curves(run: Run) -> str:
    figures = [f for s in figure_specs(metric_keys(run.records))
               if (f := render_figure(s, run.records)) is not None]
    parts = ['<section id="curves"><h2>Curves</h2>']
    if run.skipped_lines:
        parts.append(f'<p class="note">{run.skipped_lines} line(s) of metrics.jsonl were not '
                     "JSON objects and were skipped.</p>")
    parts += [html_figure(f) for f in figures] or ['<p class="note">No metric to plot.</p>']
    return "".join(parts) + "</section>"


def html_warnings(records: list[dict]) -> str:
    found = collect_warnings(records)
    if not found:
        body = '<p class="note">The run raised no warning.</p>'
    else:
        body = _table("warnings", ["step", "warning", "message"],
                      [[_td(str(s), num=True), _td(n), _td(m)] for s, n, m in found])
    return f'<section id="warnings"><h2>Warnings</h2>{body}</section>'


def html_eval(run: Run) -> str:
    if run.eval_doc is not None:
        doc = run.eval_doc
        rows = eval_rows_from_json(doc)
        header = ["metric", "reference (before)", "policy (after)", "delta"]
        note = (f"From eval.json ({doc.get('date', 'undated')}): task {doc.get('task', '?')}, "
                f"split {doc.get('split', '?')}, policy {doc.get('model_path', '?')} vs "
                f"reference {doc.get('reference_path', '?')}.")
    else:
        rows = eval_rows_from_metrics(run.records)
        header = ["metric", "before (first logged)", "after (last logged)", "delta"]
        note = "No eval.json: the first and last eval/* values of metrics.jsonl."
    if not rows:
        body = '<p class="note">No evaluation metric in eval.json or metrics.jsonl.</p>'
    else:
        body = f'<p class="note">{escape(note)}</p>' + _table(
            "eval", header, [[_td(r.metric), _td(fmt(r.before), True), _td(fmt(r.after), True),
                              _td(fmt(r.delta, signed=True), True)] for r in rows])
    return f'<section id="eval"><h2>Evaluation before vs after</h2>{body}</section>'


def _sample_cell(sample: Sample) -> str:
    scores = " \u00b7 ".join(f"{k} {fmt(v)}" for k, v in sample.scores.items())
    note = f'<div class="note">{escape(scores)}</div>' if scores else ""
    return f"<td><pre>{escape(sample.completion)}</pre>{note}</td>"


def html_samples(run: Run) -> str:
    pairs = sample_pairs_from_eval(run.eval_doc) if run.eval_doc is not None else []
    if pairs:
        header, source = ["prompt", "reference (before)", "policy (after)"], "eval.json"
    else:  # no eval.json, or one without samples
        pairs, (first, last) = sample_pairs_from_jsonl(run.samples)
        header = ["prompt", f"step {first} (before)", f"step {last} (after)"]
        source = "samples.jsonl"
    if pairs:
        body = f'<p class="note">From {escape(source)}; at most {MAX_SAMPLES} prompts.</p>' + \
            _table("samples", header, [[f"<td><pre>{escape(p.prompt)}</pre></td>",
                                        _sample_cell(p.before), _sample_cell(p.after)]
                                       for p in pairs])
    else:
        why = ("samples.jsonl has no prompt at both its first and its last step" if run.samples
               else "no samples in eval.json and no samples.jsonl")
        body = f'<p class="note">No samples to compare: {why}.</p>'
    return f'<section id="samples"><h2>Samples before vs after</h2>{body}</section>'


def render_html(run: Run, written: str) -> str:
    """The whole report as one HTML string (pure apart from matplotlib)."""
    title = escape(f"tether report: {run.run_dir}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR
            + f"<title>{title}</title><style>{CSS}</style></head><body>"
            + html_header(run, written) + html_curves(run) + html_warnings(run.records)
            + html_eval(run) + html_samples(run) + "</body></html>\n")


GENERATOR = '<meta name="generator" content="tether report">'  # marks a file report wrote


def out_problem(run_dir: Path, out: Path) -> str | None:
    """Why `out` may not receive the report (None: it may). The report writes a new file, or
    replaces a report it wrote before; it never writes over another file, least of all one of
    the run's (metrics.jsonl, config.yaml, checkpoints)."""
    if out.is_dir():
        return f"--out {out} is a directory; name a file"
    if not out.exists():
        return None
    try:
        with out.open("rb") as f:
            head = f.read(4096)
        ours = GENERATOR.encode() in head or b"<title>tether report: " in head  # or an older one
    except OSError as err:
        return f"--out {out}: {err.strerror}"
    if ours:
        return None
    inside = Path(run_dir).resolve() in out.resolve().parents
    return (f"--out {out} is {'a file of the run' if inside else 'an existing file'} that "
            "tether report did not write; name a new file")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write RUN_DIR's report (default RUN_DIR/report.html) and return its path. A missing run
    directory or metrics.jsonl, an unreadable eval.json, or an `out` that is not a new file or
    an earlier report (`out_problem`) is a TetherError naming it."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    if why := out_problem(run_dir, out):
        raise TetherError(why)
    written = datetime.now().astimezone().isoformat(timespec="seconds")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(render_html(run, written), encoding="utf-8")
    os.replace(tmp, out)
    return out
