"""`tether report`: the HTML is parsed with html.parser and checked against the fake run's files:
every figure is a valid embedded PNG whose `data-metrics` / `data-points` match metrics.jsonl,
the eval table holds the right before/after numbers, model text is escaped, and the CLI errors
in one line with status 2."""

import base64
import json
import math
from html.parser import HTMLParser

import pytest

from tether.cli import main
from tether.eval.report import detect_recipe, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script> & <b>bold</b>"

# A PPO-like run: evaluations at step 0 and at the end, "nan"/"inf" strings, a warnings line.
METRICS = [
    {"step": 0, "eval/reward": 0.1, "eval/accuracy": 0.25, "eval/gold": 0.0},
    {"step": 1, "loss/policy": 1.0, "loss/value": 0.5, "reward/mean": 0.1,
     "reward/arithmetic/mean": 0.2, "reward/std": 0.3, "gold/mean": 0.3, "kl/k1": 0.01,
     "kl/k3": 0.02, "policy/entropy": 2.0, "completions/mean_length": 10.0,
     "policy/clipfrac": 0.1, "optim/lr": 1e-5, "timing/update": 0.5},
    {"step": 2, "loss/policy": "nan", "loss/value": 0.4, "reward/mean": 0.2, "gold/mean": 0.35,
     "kl/k1": "inf", "kl/k3": 0.03, "policy/entropy": 1.9, "completions/mean_length": 12.0,
     "policy/clipfrac": 0.2, "policy/clipfrac_high": 0.05},
    {"step": 3, "loss/policy": 0.8, "reward/mean": 0.4, "gold/mean": 0.2, "kl/k1": 0.05,
     "policy/entropy": "nan", "warnings": ["reward_hacking", "kl_bound"],
     "warning_messages": ["proxy reward rose while gold fell", HOSTILE]},
    {"step": 3, "eval/reward": 0.5, "eval/accuracy": 0.75, "eval/gold": 1.5},
]

# The figures the report must draw from METRICS (title -> keys, in order of first appearance);
# reward/std, optim/lr and the warnings are in no figure.
EXPECTED_FIGURES = {
    "Loss": ["loss/policy", "loss/value"],
    "Reward": ["reward/mean", "reward/arithmetic/mean"],
    "Gold vs proxy reward": ["gold/mean", "reward/mean"],
    "KL to the reference": ["kl/k1", "kl/k3"],
    "Entropy": ["policy/entropy"],
    "Completion length": ["completions/mean_length"],
    "Clip fraction": ["policy/clipfrac", "policy/clipfrac_high"],
    "Time per step": ["timing/update"],
    "Evaluations": ["eval/reward", "eval/accuracy", "eval/gold"],
}


def finite_points(keys):
    """Finite values of `keys` in METRICS, counted by hand (independently of the report)."""
    return sum(1 for r in METRICS for k in keys
               if k in r and math.isfinite(float(r[k])))


class ReportParser(HTMLParser):
    """Collects every <img>'s attributes, every start tag, the cells of each table by class,
    and the text (entities decoded) of each <section> by id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.images, self.tags, self.tables, self.sections = [], [], {}, {}
        self._table = self._row = self._cell = self._section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "section":
            self._section = attrs.get("id")
            self.sections[self._section] = ""
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("class"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = self._row = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._section is not None:
            self.sections[self._section] += data


def parse(path):
    parser = ReportParser()
    text = path.read_text(encoding="utf-8")
    parser.feed(text)
    return parser, text


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root, *, eval_doc=None, samples=None):
    root.mkdir()
    (root / "config.yaml").write_text("model: {}\ntrain: {}\nrun: {}\nppo:\n  kl_coef: 0.05\n")
    write_jsonl(root / "metrics.jsonl", METRICS)
    if eval_doc is not None:
        (root / "eval.json").write_text(json.dumps(eval_doc))
    if samples is not None:
        write_jsonl(root / "samples.jsonl", samples)
    return root


def eval_doc(n=10):
    prompts = [f"prompt {i} {HOSTILE}" for i in range(n)]
    side = lambda name, gold: {  # noqa: E731
        "metrics": {"gold/mean": gold, "kl/k1": 0.0 if name == "reference" else 2.1,
                    "completions/distinct_2": None},
        "samples": [{"prompt": p, "completion": f"{name} says {HOSTILE} #{i}", "gold": gold,
                     "proxy": None} for i, p in enumerate(prompts)]}
    return {"tether_eval": 1, "date": "2026-12-04", "command": "tether eval runs/ppo",
            "model_path": "runs/ppo", "reference_path": "base", "task": "sentiment",
            "settings": {}, "split": "text",
            "results": {"policy": side("policy", 0.4), "reference": side("reference", 0.1)}}


@pytest.fixture(scope="module")
def jsonl_report(tmp_path_factory):
    """A run without eval.json but with samples.jsonl (steps 0 and 3, prompts in other orders)."""
    samples = ([{"step": 0, "prompt": f"p{i} {HOSTILE}", "completion": f"before {i} {HOSTILE}",
                 "reward": 0.1 * i} for i in range(3)]
               + [{"step": 1, "prompt": "p0 " + HOSTILE, "completion": "middle step"}]
               + [{"step": 3, "prompt": f"p{i} {HOSTILE}", "completion": f"after {i}",
                   "reward": 1.0, "gold": 0.5} for i in (2, 0, 1)])
    run = make_run(tmp_path_factory.mktemp("r") / "run", samples=samples)
    return write_report(run)


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("r") / "run", eval_doc=eval_doc())
    return write_report(run, tmp_path_factory.mktemp("out") / "sub" / "r.html")


def test_default_path_and_figures_are_embedded_pngs(jsonl_report):
    assert jsonl_report.name == "report.html"
    parser, _ = parse(jsonl_report)
    assert len(parser.images) == len(EXPECTED_FIGURES)
    for img in parser.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        png = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000


def test_figures_match_metrics_jsonl(jsonl_report):
    parser, _ = parse(jsonl_report)
    drawn = {img["alt"]: img for img in parser.images}
    assert list(drawn) == list(EXPECTED_FIGURES)
    for title, keys in EXPECTED_FIGURES.items():
        assert drawn[title]["data-metrics"].split(",") == keys, title
        assert int(drawn[title]["data-points"]) == finite_points(keys), title
    assert finite_points(EXPECTED_FIGURES["Loss"]) == 4  # loss/policy's "nan" is left out


def test_self_contained_and_model_text_escaped(jsonl_report):
    parser, text = parse(jsonl_report)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "http://" not in text and "https://" not in text
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert HOSTILE in parser.sections["samples"]  # shown as text, entities decoded


def test_header_names_recipe_and_steps(jsonl_report):
    parser, _ = parse(jsonl_report)
    meta = dict(parser.tables["meta"])
    assert meta["recipe"] == "ppo" and meta["steps"] == "3"
    assert meta["run directory"] == str(jsonl_report.parent)


def test_warnings_listed_with_their_step(jsonl_report):
    parser, _ = parse(jsonl_report)
    assert parser.tables["warnings"][1:] == [
        ["3", "reward_hacking", "proxy reward rose while gold fell"], ["3", "kl_bound", HOSTILE]]


def test_eval_table_falls_back_to_first_and_last_eval_values(jsonl_report):
    parser, _ = parse(jsonl_report)
    header, *rows = parser.tables["eval"]
    assert header[0] == "metric" and len(header) == 4
    table = {r[0]: [float(x) for x in r[1:]] for r in rows}
    assert table.keys() == {"eval/reward", "eval/accuracy", "eval/gold"}
    for key, (before, after) in {"eval/reward": (0.1, 0.5), "eval/accuracy": (0.25, 0.75),
                                 "eval/gold": (0.0, 1.5)}.items():
        assert table[key] == pytest.approx([before, after, after - before]), key


def test_samples_jsonl_first_vs_last_step_matched_by_prompt(jsonl_report):
    parser, _ = parse(jsonl_report)
    header, *rows = parser.tables["samples"]
    assert header == ["prompt", "step 0 (before)", "step 3 (after)"]
    assert [r[0] for r in rows] == [f"p{i} {HOSTILE}" for i in range(3)]
    for i, (_, before, after) in enumerate(rows):
        assert before.startswith(f"before {i} {HOSTILE}") and f"reward {0.1 * i:.4g}" in before
        assert after.startswith(f"after {i}") and "gold 0.5" in after


def test_eval_json_table_and_samples(eval_report):
    assert eval_report.name == "r.html" and eval_report.is_file()
    parser, text = parse(eval_report)
    header, *rows = parser.tables["eval"]
    assert header == ["metric", "reference (before)", "policy (after)", "delta"]
    table = {r[0]: r[1:] for r in rows}
    assert [float(x) for x in table["gold/mean"]] == pytest.approx([0.1, 0.4, 0.3])
    assert [float(x) for x in table["kl/k1"]] == pytest.approx([0.0, 2.1, 2.1])
    assert table["completions/distinct_2"] == ["\u2014"] * 3  # null on both sides: no delta
    _, *samples = parser.tables["samples"]
    assert len(samples) == 8  # at most 8 of the 10 prompts
    for i, (prompt, before, after) in enumerate(samples):
        assert prompt == f"prompt {i} {HOSTILE}"
        assert before.startswith(f"reference says {HOSTILE} #{i}") and "gold 0.1" in before
        assert after.startswith(f"policy says {HOSTILE} #{i}") and "proxy" not in after
    assert "<script>" not in text


@pytest.mark.parametrize("sections, recipe", [
    (["model", "data", "train", "run"], "sft"), (["model", "dpo"], "dpo"),
    (["model", "ppo"], "ppo"), (["model", "grpo"], "grpo"), (["model", "rm"], "rm"),
    (["model", "prm"], "prm"), (["pipeline", "sft", "rm", "ppo"], "rlhf")])
def test_detect_recipe(sections, recipe):
    assert detect_recipe({s: {} for s in sections}) == recipe


def test_cli_writes_the_report(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/sft": 2.0}\n{"step": 2, "loss/s')
    assert main(["report", str(run), "--out", str(tmp_path / "x.html")]) == 0
    assert "x.html" in capsys.readouterr().out
    parser, text = parse(tmp_path / "x.html")
    assert [img["data-metrics"] for img in parser.images] == ["loss/sft"]
    assert "1 line(s) of metrics.jsonl" in text  # the torn last line is skipped, and said so
    assert main(["report", str(run), "--out", str(tmp_path / "x.html")]) == 0  # its own: replaced
    assert main(["report", str(run)]) == 0 and main(["report", str(run)]) == 0


@pytest.mark.parametrize("args, named", [
    (["report", "{tmp}/missing"], "missing"), (["report", "{tmp}/empty"], "metrics.jsonl"),
    (["report"], "usage"), (["report", "{tmp}/empty", "--bogus"], "--bogus")])
def test_cli_errors_in_one_line(tmp_path, capsys, args, named):
    (tmp_path / "empty").mkdir()
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether: error: ") and named in err and err.count("\n") == 1
