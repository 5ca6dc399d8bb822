"""Every list of variant names is derived from the registries in tether/losses: the docs tables
list exactly the registered names, config validation names the nearest, the CLI and
`tether keys` show them, and every GRPO variant's advantage estimator resolves."""

import re
from pathlib import Path

import pytest

from tether.advantages import GROUP_ADVANTAGES
from tether.config import DPOConfig, GRPOConfig, load_config
from tether.errors import ConfigError
from tether.losses import GRPO_VARIANTS, PREFERENCE_LOSSES

DOCS = Path(__file__).parents[2] / "docs"


def _table_names(page: str, heading: str) -> set[str]:
    """The backticked names in the first column of the first table under `heading`."""
    text = (DOCS / page).read_text().split(heading, 1)[1]
    names, started = set(), False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            if match := re.match(r"\|\s*`([a-z_0-9]+)`", line):
                names.add(match.group(1))
        elif started:
            break
    return names


def test_docs_tables_list_every_registered_name_and_nothing_else():
    assert _table_names("dpo.md", "## Losses (`dpo.loss`)") == set(PREFERENCE_LOSSES)
    assert _table_names("grpo.md", "## Loss types") == set(GRPO_VARIANTS)


def test_every_grpo_variant_names_a_known_advantage_estimator():
    assert {v.advantages for v in GRPO_VARIANTS.values()} <= set(GROUP_ADVANTAGES)


@pytest.mark.parametrize("cls, key, typo, nearest", [
    (DPOConfig, "dpo.loss", "simpoo", "simpo"), (GRPOConfig, "grpo.loss_type", "dapoo", "dapo")])
def test_unknown_name_lists_the_registry_and_the_nearest(cls, key, typo, nearest):
    names = PREFERENCE_LOSSES if cls is DPOConfig else GRPO_VARIANTS
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, [f"--{key}={typo}"])
    assert str(err.value) == (f"{key} must be one of {', '.join(names)}, got '{typo}'; "
                              f"did you mean '{nearest}'?")


def test_cli_summary_and_keys_list_the_registry(capsys):
    from tether.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert ", ".join(PREFERENCE_LOSSES) in out and ", ".join(GRPO_VARIANTS) in out
    assert main(["keys", "grpo"]) == 0
    assert f"grpo.loss_type = 'grpo'  # one of {', '.join(GRPO_VARIANTS)}" in \
        capsys.readouterr().out
