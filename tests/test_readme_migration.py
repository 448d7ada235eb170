"""The README's open_clip migration table cannot rot: it names every flag of open_clip's trainer, and every
mmsoftmoe key it gives exists (with a valid value where it gives one)."""

import re
from pathlib import Path

import open_clip_train.params

from mmsoftmoe_training.config import load_config, valid_keys

README = Path(__file__).resolve().parents[1] / "README.md"


def migration_rows() -> list[list[str]]:
    """The cells of each row of the table under `## Coming from open_clip`."""
    section = README.read_text().split("## Coming from open_clip", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `--")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_the_table_names_every_open_clip_flag():
    flags = set(re.findall(r"""['"](--[a-z0-9-]+)['"]""", Path(open_clip_train.params.__file__).read_text()))
    listed = [flag for row in migration_rows() for flag in re.findall(r"`(--[a-z0-9-]+)`", row[0])]
    assert len(listed) == len(set(listed)), "a flag is listed twice"
    assert set(listed) == flags


def test_every_key_in_the_table_exists_and_takes_its_value():
    rows = migration_rows()
    assert all(len(row) == 3 for row in rows)
    for row in rows:
        keys = re.findall(r"`([^`]+)`", row[1])
        assert keys or row[1] == "none", row
        for key in keys:
            name, _, value = key.partition("=")
            assert name in valid_keys(), f"{row[0]}: {name} is not a config key"
            if value:
                load_config(None, [key, "model.pretrained=none"])  # the value parses and validates
