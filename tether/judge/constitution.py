"""A constitution (Bai et al. 2022): principles, each a critique request, a revision request and a
comparison for the judge; and the chat turns of SL-CAI's critique -> revision loop.

    principles = load_constitution()            # the built-in one, or load_constitution(PATH)
    turns = critique_turns(prompt_msgs + [answer], principles[0])   # ... + user: critique
    turns = revision_turns(turns, critique, principles[0])  # + assistant: critique, user: revision

A constitution file is a YAML list of mappings with the keys `name`, `critique`, `revision` and
`compare` (docs/rlaif.md); a bad file is an error naming the file, the entry and the field.
Pure: no model, no recipe.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from tether.errors import DataError

BUILTIN = Path(__file__).with_name("constitution.yaml")


@dataclass(frozen=True)
class Principle:
    name: str  # a short label, unique within its constitution
    critique: str  # critique request: a user turn after the policy's answer
    revision: str  # revision request: a user turn after the policy's critique
    compare: str  # the judge's principle for two responses: "Which response is ...?"


FIELDS = tuple(f.name for f in fields(Principle))


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """The principles of a constitution file (None: the built-in one, tether/judge/
    constitution.yaml). Every entry needs every field as a non-empty string; names are unique."""
    source = Path(path) if path is not None else BUILTIN
    if not source.is_file():
        raise DataError("constitution file not found (cai.constitution)", source=str(source))
    try:
        entries = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise DataError(f"not valid YAML{where}", source=str(source)) from None
    if not isinstance(entries, list) or not entries:
        raise DataError("a constitution is a non-empty YAML list of principles, each with "
                        f"{', '.join(FIELDS)}", source=str(source))
    principles, names = [], set()
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise DataError(f"must be a mapping with {', '.join(FIELDS)}, got "
                            f"{type(entry).__name__}", source=str(source), row=number)
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise DataError(f"unknown key(s) {unknown}; a principle has {', '.join(FIELDS)}",
                            source=str(source), row=number, field=str(unknown[0]))
        for name in FIELDS:
            value = entry.get(name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"must be a non-empty string, got {value!r}",
                                source=str(source), row=number, field=name)
        if entry["name"] in names:
            raise DataError(f"the name {entry['name']!r} is used twice", source=str(source),
                            row=number, field="name")
        names.add(entry["name"])
        principles.append(Principle(**{k: entry[k].strip() for k in FIELDS}))
    return principles


def pick_principles(n: int, n_principles: int, *, seed: int, stage: str) -> list[int]:
    """n principle indices drawn uniformly with replacement, from a generator that depends only
    on (seed, stage): the same prompt gets the same principle when a run resumes."""
    rng = random.Random(f"cai-{stage}-{seed}")
    return [rng.randrange(n_principles) for _ in range(n)]


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn; messages are copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def critique_turns(conversation: list[dict], principle: Principle) -> list[dict]:
    """The conversation so far (ending with the assistant's answer), then the critique request
    as a user turn; the policy continues with its critique."""
    return [*conversation, {"role": "user", "content": principle.critique}]


def revision_turns(critique_conversation: list[dict], critique: str,
                   principle: Principle) -> list[dict]:
    """`critique_turns(...)`, the policy's critique as an assistant turn, then the revision
    request as a user turn; the policy continues with its revision."""
    return [*critique_conversation, {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision}]


def clean_revision(text: str) -> str:
    """A revision without what is not the response itself: surrounding whitespace, a first line
    that only introduces it ("Here is the rewritten response:"), and quotes around all of it.

    >>> clean_revision('Sure! Here is a kinder version:\\n\\n"What a lovely park!" ')
    'What a lovely park!'
    """
    text = text.strip()
    first, sep, rest = text.partition("\n")
    if sep and first.rstrip().endswith(":") and rest.strip():
        text = rest.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def degenerate(text: str, *, min_words: int = 3) -> str | None:
    """Why a (cleaned) revision is no SFT target, or None if it is one: "empty", "too short"
    (fewer than `min_words` words), or "repetitive" (10 or more words of which fewer than a
    third are distinct: a sampling loop).

    >>> [degenerate(t) for t in ("", "Nice.", "a lovely day in the park", "so so " * 8)]
    ['empty', 'too short', None, 'repetitive']
    """
    words = text.split()
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too short"
    if len(words) >= 10 and len({w.lower() for w in words}) < len(words) / 3:
        return "repetitive"
    return None
