"""SiteFiles.from_files: reading the administrator's files, errors with file and position."""

from __future__ import annotations

from pathlib import Path

import pytest

from mepcore.config import SiteFiles, load_environment
from mepcore.errors import TemplateConfigError


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_template_includes_schema_and_environment(tmp_path: Path) -> None:
    template = _write(tmp_path, "user_config_template.yaml.j2", '{% include "part.j2" %}')
    _write(tmp_path, "part.j2", "engine: {type: ThreadPoolEngine}\n")
    _write(tmp_path, "notes.txt", "not a template")
    schema = _write(tmp_path, "user_config_schema.json", '{"type": "object"}')
    env = _write(tmp_path, "user_environment.yaml", "A: x\nB: 2\nC: '1.5'\n")
    site = SiteFiles.from_files(template, schema, env)
    assert site.template_name == "user_config_template.yaml.j2"
    assert dict(site.includes) == {"part.j2": "engine: {type: ThreadPoolEngine}\n"}
    assert site.schema == {"type": "object"}
    assert dict(site.environment) == {"A": "x", "B": "2", "C": "1.5"}
    assert len(site.template_digest) == 64
    assert SiteFiles.from_files(template).schema is None


def test_digest_follows_the_template_and_its_includes(tmp_path: Path) -> None:
    template = _write(tmp_path, "t.yaml.j2", '{% include "part.j2" %}')
    part = _write(tmp_path, "part.j2", "a: 1\n")
    first = SiteFiles.from_files(template).template_digest
    assert SiteFiles.from_files(template).template_digest == first
    part.write_text("a: 2\n")
    assert SiteFiles.from_files(template).template_digest != first
    assert SiteFiles.from_texts("x").template_digest != SiteFiles.from_texts("y").template_digest


def test_template_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    template = _write(tmp_path, "t.yaml.j2", "a: 1\nb: {{ x \n")
    with pytest.raises(TemplateConfigError) as info:
        SiteFiles.from_files(template)
    assert info.value.reason == "config.template_invalid"
    assert f"{template}:" in info.value.detail
    broken_include = _write(tmp_path, "inc.j2", "{% endif %}")
    template.write_text("ok")
    with pytest.raises(TemplateConfigError) as info:
        SiteFiles.from_files(template)
    assert str(broken_include) + ":1" in info.value.detail


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(TemplateConfigError) as info:
        SiteFiles.from_files(tmp_path / "absent.j2")
    assert info.value.reason == "config.template_invalid"
    bad = tmp_path / "bad.j2"
    bad.write_bytes(b"a: 1\n\xff\n")
    with pytest.raises(TemplateConfigError) as info:
        SiteFiles.from_files(bad)
    assert f"{bad}:2" in info.value.detail


def test_schema_errors_name_file_and_position(tmp_path: Path) -> None:
    template = _write(tmp_path, "t.yaml.j2", "x")
    broken = _write(tmp_path, "s.json", '{\n  "type": "object",\n  oops\n}')
    with pytest.raises(TemplateConfigError) as info:
        SiteFiles.from_files(template, broken)
    assert info.value.reason == "config.schema_invalid"
    assert f"{broken}:3:" in info.value.detail
    wrong = _write(tmp_path, "w.json", '{"properties": {"a": {"type": 7}}}')
    with pytest.raises(TemplateConfigError) as info:
        SiteFiles.from_files(template, wrong)
    assert info.value.reason == "config.schema_invalid"
    assert str(wrong) in info.value.detail
    not_object = _write(tmp_path, "n.json", "[]")
    with pytest.raises(TemplateConfigError):
        SiteFiles.from_files(template, not_object)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("A: 1\nB: true\n", ":2:4"),
        ("A: 1\nB:\n", ":2:3"),
        ("A: [1]\n", ":1:4"),
        ("A: 1\nA: 2\n", ":2:1"),
        ("A-B: 1\n", ":1:1"),
        ("- a\n", ":1:1"),
        ("A: &x 1\nB: *x\n", ":2:4"),
        ("A: [\n", ":2:1"),
    ],
)
def test_environment_errors_name_file_line_and_column(
    tmp_path: Path, text: str, where: str
) -> None:
    path = _write(tmp_path, "user_environment.yaml", text)
    with pytest.raises(TemplateConfigError) as info:
        load_environment(path)
    assert info.value.reason == "config.environment_invalid"
    assert f"{path}{where}" in info.value.detail


def test_empty_environment_is_empty(tmp_path: Path) -> None:
    assert load_environment(_write(tmp_path, "e.yaml", "# nothing\n")) == {}
