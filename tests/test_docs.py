"""The READMEs hold on a newcomer's machine: they name no path of the machine they were written on."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Home and workspace folders of whoever wrote a text (a `/work/venv/bin/python` in a command, say).
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home|root|mnt|Users)/\S*")


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_a_readme_names_no_path_of_the_machine_it_was_written_on(readme):
    assert MACHINE_PATH.findall((ROOT / readme).read_text()) == []
