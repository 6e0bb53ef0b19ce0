"""mep against the recorded behaviour of Globus Compute 4.19 (the differential suite).

``tools/record_gc_vectors.py`` ran the reference packages and wrote what they do into
``tests/fixtures/gc/``; these tests read those files (no network, no reference package)
and check mep against them:

- identity mapping: every vector is ``same`` (mep maps to the very name, or refuses to
  load exactly where the reference refuses) or ``refused-by-design`` (the reference maps
  or loads, mep refuses, for the reason given); and whatever the mark, mep never produces
  a name the reference did not produce;
- template rendering: mep's rendering reads back as the same YAML data, or both refuse;
  a case marked ``differs-by-design`` says what mep gives instead and why; whatever the
  reference's loader accepts, mep's accepts;
- configuration keys: every key the reference's loader accepts in a user endpoint's
  configuration, mep accepts (honoured, or ignored with a warning).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from mepcore.config import (
    IGNORED_ENGINE_KEYS,
    IGNORED_KEYS,
    MappedIdentity,
    endpoint_config_schema,
    parse_endpoint_config,
    render_template,
    validate_variables,
)
from mepcore.errors import ConfigError, IdentityConfigError, IdentityError
from mepcore.identity import IdentityMapper, is_portable_username
from mepcore.types import Account, Identity, IdentitySet

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gc"
IDENTITY = json.loads((FIXTURES / "identity_vectors.json").read_text())["vectors"]
TEMPLATES = json.loads((FIXTURES / "template_cases.json").read_text())
UEP_KEYS = json.loads((FIXTURES / "uep_keys.json").read_text())
REFUSED = "refused-by-design"


# -- identity mapping --------------------------------------------------------------------


def mep_mapping(vector: dict[str, Any]) -> tuple[str, str | None]:
    """("load_error", None), ("refused", reason) or ("mapped", name or None)."""
    try:
        mapper = IdentityMapper.from_documents(vector["documents"])
    except IdentityConfigError:
        return ("load_error", None)
    try:
        result = mapper.map(IdentitySet.from_json(vector["identities"]))
    except IdentityError as exc:
        return ("refused", exc.reason)
    name = result.username
    if name is not None and not is_portable_username(name):
        return ("refused", "identity.invalid_username")
    return ("mapped", name)


def test_enough_identity_vectors_each_marked() -> None:
    marks = Counter(REFUSED if isinstance(v["mep"], dict) else v["mep"] for v in IDENTITY)
    assert set(marks) == {"same", REFUSED}
    assert len(IDENTITY) >= 50
    assert all(v["mep"][REFUSED] for v in IDENTITY if isinstance(v["mep"], dict))


@pytest.mark.parametrize("vector", IDENTITY, ids=[v["id"] for v in IDENTITY])
def test_identity_vector(vector: dict[str, Any]) -> None:
    reference = vector["reference"]
    outcome = mep_mapping(vector)
    # Never more: a name mep produces is the name the reference produced.
    if outcome[0] == "mapped" and outcome[1] is not None:
        assert reference["loaded"] and reference["username"] == outcome[1], vector["why"]
    if vector["mep"] == "same":
        if not reference["loaded"]:
            assert outcome == ("load_error", None), vector["why"]
        else:
            assert outcome == ("mapped", reference["username"]), vector["why"]
    else:
        # The reference loads the file and maps (or, for a file, accepts it); mep refuses.
        assert reference["loaded"], vector["why"]
        assert reference["username"] is not None, vector["why"]
        assert outcome[0] in ("load_error", "refused") or outcome == ("mapped", None)


# -- template rendering -------------------------------------------------------------------


ALICE = TEMPLATES["identity"]
ACCOUNT = Account(
    ALICE["uname"],
    ALICE["uid"],
    ALICE["gid"],
    ALICE["dir"],
    ALICE["shell"],
    group_ids=(ALICE["gid"],),
    group_names=(ALICE["uname"],),
    gecos=ALICE["gecos"],
)
MAPPED = MappedIdentity(ACCOUNT, Identity(TEMPLATES["matched_identity"], {}))


def _file(name: str) -> str:
    return (FIXTURES / TEMPLATES["files"][name]).read_text()


def mep_render(case: dict[str, Any]) -> tuple[str, Any]:
    """("rendered", text) or ("error", reason)."""
    template = case["template"]
    text = _file(template) if template.startswith("@") else template
    schema = json.loads(_file("schema" + case["schema"])) if "schema" in case else None
    try:
        variables = validate_variables(case["variables"], schema)
        return (
            "rendered",
            render_template(
                text,
                variables,
                mapped=MAPPED,
                user_runtime=case.get("user_runtime"),
                parent_config=case.get("parent_config"),
                environment=TEMPLATES["environment"],
                includes=case.get("includes"),
            ),
        )
    except ConfigError as exc:
        return ("error", exc.reason)


def test_enough_template_cases_including_the_reference_files() -> None:
    cases = TEMPLATES["cases"]
    assert len(cases) >= 20
    assert {"@default", "@configure"} <= {c["template"] for c in cases}
    # The reference's default template is what configure --multi-user writes.
    assert _file("@default") == _file("@configure")


@pytest.mark.parametrize("case", TEMPLATES["cases"], ids=[c["id"] for c in TEMPLATES["cases"]])
def test_template_case(case: dict[str, Any]) -> None:
    reference = case["reference"]
    kind, value = mep_render(case)
    if not reference["rendered"]:
        assert kind == "error", case["why"]
        return
    assert kind == "rendered", (case["why"], value)
    if "yaml_error" in reference:
        # The reference renders text that is not YAML: mep renders the very same text
        # (and refuses it when it parses the configuration).
        assert value == reference["text"], case["why"]
        with pytest.raises(ConfigError):
            parse_endpoint_config(value)
        return
    data = yaml.safe_load(value)
    if case["mep"] == "same":
        assert data == reference["data"], case["why"]
    else:
        assert data == case["mep"]["data"] != reference["data"], case["why"]
    if reference.get("accepted"):
        parse_endpoint_config(value)


# -- configuration keys ------------------------------------------------------------------


def _sample(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    if "oneOf" in schema:
        return _sample(schema["oneOf"][0])
    if "$ref" in schema:
        return {"type": "SimpleLauncher"}
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "object" in kinds and "properties" in schema and "type" in schema["properties"]:
        return {"type": "LocalProvider"}
    samples = {
        "string": "x",
        "integer": max(schema.get("minimum", 1), 1),
        "boolean": False,
        "number": 0.5,
        "object": {},
        "null": None,
    }
    if "array" in kinds:
        return [] if "minItems" not in schema else [50_000] * schema["minItems"]
    return samples[next(k for k in kinds if k in samples)]


def _engine_properties(engine: str) -> dict[str, Any]:
    for rule in endpoint_config_schema()["properties"]["engine"]["allOf"]:
        if rule["if"]["properties"]["type"]["const"] == engine:
            return dict(rule["then"]["properties"])
    raise AssertionError(engine)


TOP_LEVEL = sorted(UEP_KEYS["top_level"])
ENGINE_KEYS = [(engine, key) for engine, keys in UEP_KEYS["engines"].items() for key in keys]


@pytest.mark.parametrize("key", TOP_LEVEL)
def test_every_top_level_key_the_reference_accepts_is_accepted(key: str) -> None:
    schema = endpoint_config_schema()["properties"][key]
    value = UEP_KEYS["top_level"][key] if key in IGNORED_KEYS else _sample(schema)
    config = parse_endpoint_config(json.dumps({key: value}))
    assert [w.path for w in config.warnings] == ([f"$.{key}"] if key in IGNORED_KEYS else [])


@pytest.mark.parametrize(("engine", "key"), ENGINE_KEYS, ids=[f"{e}.{k}" for e, k in ENGINE_KEYS])
def test_every_engine_key_the_reference_accepts_is_accepted(engine: str, key: str) -> None:
    properties = _engine_properties(engine)
    assert key in properties, f"{engine}.{key} is accepted by Globus Compute 4.19"
    ignored = IGNORED_ENGINE_KEYS.get(engine, {})
    value = UEP_KEYS["engines"][engine][key] if key in ignored else _sample(properties[key])
    config = parse_endpoint_config(json.dumps({"engine": {"type": engine, key: value}}))
    assert [w.path for w in config.warnings] == ([f"$.engine.{key}"] if key in ignored else [])


# -- the documentation says what the suite checks ------------------------------------------


def test_the_docs_list_every_divergence_with_the_current_counts() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    identity = (docs / "identity-mapping.md").read_text()
    refused = [v for v in IDENTITY if v["mep"] != "same"]
    assert f"checks this against {len(IDENTITY)} recorded vectors" in identity
    assert f"{len(IDENTITY) - len(refused)} give the same result, {len(refused)} are" in identity
    for vector in refused:
        assert vector["id"] in identity, vector["id"]
    templates = " ".join((docs / "config-templates.md").read_text().split())
    cases = TEMPLATES["cases"]
    differing = [c for c in cases if c["mep"] != "same"]
    assert f"checks {len(cases)} recorded cases" in templates
    assert f"{len(cases) - len(differing)} give the same YAML data" in templates
    assert f"{len(differing)} differ by design" in templates
    for case in differing:
        assert case["id"] in templates, case["id"]
