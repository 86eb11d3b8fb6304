"""Where template.yaml is found (billing_local.template.find_template), not where the package is."""

from __future__ import annotations

from pathlib import Path

import pytest

from billing_local.template import TEMPLATE_ENV, TemplateNotFoundError, find_template


def test_the_variable_names_the_template_wherever_the_working_directory_is(tmp_path: Path) -> None:
    chosen = tmp_path / "elsewhere" / "stack.yaml"
    chosen.parent.mkdir()
    chosen.write_text("Resources: {}\n")
    (tmp_path / "template.yaml").write_text("Resources: {}\n")  # would be found by the walk up
    assert find_template(tmp_path, {TEMPLATE_ENV: str(chosen)}) == chosen.resolve()


def test_a_variable_naming_no_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(TemplateNotFoundError, match=TEMPLATE_ENV):
        find_template(tmp_path, {TEMPLATE_ENV: str(tmp_path / "missing.yaml")})


def test_the_template_is_found_from_a_directory_below_the_project_root(tmp_path: Path) -> None:
    (tmp_path / "template.yaml").write_text("Resources: {}\n")
    below = tmp_path / "functions" / "biller"
    below.mkdir(parents=True)
    assert find_template(below, {}) == (tmp_path / "template.yaml").resolve()
