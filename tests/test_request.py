import pytest

from pyexec_connector import errors, request
from pyexec_connector.errors import QueryError
from pyexec_connector.request import parse_query


def code_of(params, strict=False):
    with pytest.raises(QueryError) as info:
        parse_query(params, strict=strict)
    return info.value.code


@pytest.mark.parametrize("params, code", [
    ({"code": "x=1", "limitReturnTo": 5}, errors.BAD_RETURN_VALUES),
    ({"code": "x=1", "limitReturnTo": ["a", 1]}, errors.BAD_RETURN_VALUES),
    ({"code": "x=1", "limitReturnTo": ["a"], "codeHandlesReturn": True}, errors.CONFLICTING_RETURN),
    ({"code": "x=1", "limitReturnTo": "a", "codeHandlesReturn": "yes"}, errors.CONFLICTING_RETURN),
    ({"code": "x=1", "presetValues": [1]}, errors.BAD_GLOBAL_PRESET),
    ({"code": "x=1", "presetValues": "a=1"}, errors.BAD_GLOBAL_PRESET),
    ({}, errors.NO_CODE),
    ({"presetValues": {}}, errors.NO_CODE),
    (None, errors.BAD_QUERY),
    ([1, 2], errors.BAD_QUERY),
    ("code", errors.BAD_QUERY),
    ({"code": 5}, errors.BAD_PARAMETER),
    ({"code": "x=1", "name": ["n"]}, errors.BAD_PARAMETER),
    ({"script": {"a": 1}}, errors.BAD_PARAMETER),
    ({"code": "x=1", "codeHandlesReturn": "perhaps"}, errors.BAD_PARAMETER),
    ({"code": "x=1", "cache_code": 3}, errors.BAD_PARAMETER),
    ({"code": "x=1", "replace": {}}, errors.BAD_PARAMETER),
])
def test_rules(params, code):
    assert code_of(params) == code
    assert code_of(params, strict=True) == code


@pytest.mark.parametrize("params, code, expected", [
    ({"code": "x=1", "script": "s.py"}, errors.AMBIGUOUS_CODE, ("x=1", None, None)),
    ({"code": "x=1", "script": "s.py", "name": "n"}, errors.AMBIGUOUS_CODE, ("x=1", "n", None)),
    ({"script": "s.py", "name": "other"}, errors.AMBIGUOUS_NAME, (None, "s.py", "s.py")),
])
def test_upstreams_reading_unless_strict(params, code, expected):
    heard = []
    parsed = parse_query(params, warn=lambda *args: heard.append(args))
    assert (parsed.code, parsed.name, parsed.script) == expected
    assert heard == [(code, params["script"], params.get("name"))]
    assert code_of(params, strict=True) == code


def test_bad_parameter_names_the_parameter():
    with pytest.raises(QueryError) as info:
        parse_query({"code": "x=1", "codeHandlesReturn": [True]})
    assert info.value.params[0] == "codeHandlesReturn"


@pytest.mark.parametrize("word, value", [("true", True), ("YES", True), ("t", True), ("1", True),
                                         ("false", False), ("no", False), ("0", False), (True, True)])
def test_boolean_words(word, value):
    assert parse_query({"code": "x=1", "codeHandlesReturn": word}).code_handles_return is value


def test_defaults_and_names():
    request = parse_query({"code": "x=1"})
    assert request.cache_code is False and request.replace is False and request.preset_values == {}
    assert request.limit_return_to is None and request.cache_key is None
    named = parse_query({"code": "x=1", "name": "n.py"})
    assert named.cache_code is True and named.filename == "n.py" and named.cache_key == "n.py"
    script = parse_query({"script": "s.py", "name": "s.py"})
    assert script.cache_key == "s.py" and script.filename == "s.py"


def test_limit_return_to_forms():
    assert parse_query({"code": "x", "limitReturnTo": "a, b,,c"}).limit_return_to == ("a", "b", "c")
    assert parse_query({"code": "x", "limitReturnTo": ["a"]}).limit_return_to == ("a",)


@pytest.mark.parametrize("params", [
    {"code": "x = 1"}, {"name": "n"}, {"code": "x = 1", "name": "n"}, {"code": "x", "presetValues": {"a": 1}},
    {"code": "x", "presetValues": None}, {"name": "n", "presetValues": {}}, {"code": "x", "name": None},
])
def test_the_plain_query_shortcut_gives_what_the_full_parse_gives(params):
    assert request._PLAIN_PARAMETERS >= params.keys()
    assert parse_query(params) == request.parse_query_full(params)


@pytest.mark.parametrize("params", [
    {"name": ""}, {"name": "a\x00b"}, {"name": 3}, {"code": 3}, {"code": None}, {}, {"presetValues": {}},
    {"code": "x", "presetValues": [1]}, {"name": None, "code": None},
])
def test_the_plain_query_shortcut_leaves_bad_queries_to_the_full_parse(params):
    with pytest.raises(QueryError) as shortcut:
        parse_query(params)
    with pytest.raises(QueryError) as full:
        request.parse_query_full(params)
    assert (shortcut.value.code, shortcut.value.params) == (full.value.code, full.value.params)
