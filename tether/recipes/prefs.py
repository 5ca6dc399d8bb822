"""`tether prefs`: build a preference set by sampling a model and ordering pairs by a gold reward
(the stages and the cache: tether/recipes/preference_set.py)."""

from __future__ import annotations

from tether.config import PrefsConfig
from tether.recipes.preference_set import build


def run(cfg: PrefsConfig) -> dict:
    train, held = build(cfg.prefs, precision=cfg.precision, progress=cfg.progress,
                        generation=cfg.generation)
    print(f"train pairs: {train}\nheld-out pairs: {held}")
    return {"train": train, "heldout": held}
