"""Request validation at its edges (fedrest.server.validation, no coordinator): every limit accepts its own value
and refuses the next one, each check refuses on its own, and each refusal is the exact 4xx a user reads."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from fedrest.server import validation as v
from fedrest.server.errors import BadUpdateMetadata, UpdateTooLarge
from fedrest.server.http_errors import MULTIPART_SLACK, ApiError
from fedrest.server.registry import Node

APP = Flask("validation-tests")


def refused(call, *args, code: int = 400, error: str = "bad_request", **kwargs) -> str:
    """The message of the ApiError that ``call(*args, **kwargs)`` raises (with its code and error checked)."""
    with pytest.raises(ApiError) as raised:
        call(*args, **kwargs)
    assert (raised.value.code, raised.value.error) == (code, error)
    return raised.value.message


def node(num_samples: int = 100) -> Node:
    return Node("id", "node-a", "cpu", num_samples, {}, "digest", 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- the building blocks


@pytest.mark.parametrize("value", [-2.0, -2, 3, 3.0, 0.5])
def test_a_finite_number_within_its_closed_range_is_kept_as_a_float(value):
    assert v.finite_number(value, "x", -2.0, 3.0) == float(value)
    assert isinstance(v.finite_number(value, "x", -2.0, 3.0), float)


@pytest.mark.parametrize("value, message", [
    (True, "x must be a finite number"), ("1", "x must be a finite number"), (None, "x must be a finite number"),
    (float("nan"), "x must be a finite number"), (float("inf"), "x must be a finite number"),
    (10**400, "x must be a finite number"),
    (-2.001, "x must be in [-2.0, 3.0], got -2.001"), (3.001, "x must be in [-2.0, 3.0], got 3.001"),
])
def test_a_finite_number_refuses_what_is_not_one_or_lies_outside(value, message):
    assert refused(v.finite_number, value, "x", -2.0, 3.0) == message


def test_a_positive_int_runs_from_1_to_its_bound():
    assert [v.positive_int(n, "n", hi=5) for n in (1, 5)] == [1, 5]
    assert v.positive_int(10**9, "n") == 10**9 == v.MAX_NUM_SAMPLES
    for value in (0, 6, True, 2.0, "2", None):
        assert refused(v.positive_int, value, "n", hi=5) == f"n must be an integer in [1, 5], got {value!r}"
    assert refused(v.positive_int, 10**9 + 1, "n") == "n must be an integer in [1, 1000000000], got 1000000001"


def test_short_text_takes_printable_text_up_to_its_length():
    assert v.short_text("a" * 8, "name", 8) == "a" * 8
    assert v.short_text(" a~\u00e9\u4e2d", "name", 8) == " a~\u00e9\u4e2d"  # space, ~ (126) and non-ASCII are text
    for value in ("a" * 9, "", "   ", None, 3):
        assert refused(v.short_text, value, "name", 8) == "name must be a non-empty string of at most 8 characters"
    for value in ("a\x1fb", "a\x7fb", "a\nb", "\x00"):
        assert refused(v.short_text, value, "name", 8) == "name must not contain control characters"
    assert refused(v.short_text, "a\ud800", "name", 8) == "name must be valid unicode text"


def test_a_string_list_has_at_most_its_items_each_short_text():
    assert v._string_list(["a", "bb"], "classes", 2, 2) == ["a", "bb"]
    assert v._string_list([], "classes", 2, 2) == []
    for value in (["a", "b", "c"], "ab", None):
        assert refused(v._string_list, value, "classes", 2, 2) == "classes must be a list of at most 2 strings"
    assert refused(v._string_list, ["abc"], "classes", 2, 2) == \
        "classes[] must be a non-empty string of at most 2 characters"


# ----------------------------------------------------------------------------- JSON bodies


def body_of(call, payload, content_type: str = "application/json"):
    data = payload if isinstance(payload, str) else json.dumps(payload)
    with APP.test_request_context(method="POST", data=data, content_type=content_type):
        return call()


def registration(**fields) -> dict:
    return {"name": "node-a", "device": "cpu", "num_samples": 10, **fields}


def test_a_json_body_must_be_a_json_object():
    assert body_of(v.json_object, {"a": 1}) == {"a": 1}
    assert refused(body_of, v.json_object, {"a": 1}, "text/plain", code=415, error="unsupported_media_type") == \
        "send a JSON object with Content-Type: application/json"
    assert refused(body_of, v.json_object, [1]) == "the body must be a JSON object"
    for text in ("", "null", "{"):
        assert refused(body_of, v.json_object, text) == \
            "the body must be a JSON object (it is empty, null or not valid JSON)"
    assert refused(body_of, v.json_object, "[" * 5000 + "]" * 5000) == "the JSON body is nested too deeply"


def test_a_registration_is_cleaned_with_its_defaults():
    assert body_of(v.registration, registration()) == {
        "name": "node-a", "device": "cpu", "num_samples": 10, "system_info": {}, "instance_id": None, "task": None,
        "eval_samples": 0}
    full = body_of(v.registration, registration(system_info={"os": "linux"}, instance_id="i" * 64,
                                                eval_samples=10**9, task={"name": "mnist"}))
    assert (full["system_info"], full["instance_id"], full["eval_samples"]) == ({"os": "linux"}, "i" * 64, 10**9)
    assert full["task"] == {"name": "mnist", "schema": [], "classes": None, "details": {}}


def test_a_registration_at_each_limit_is_accepted():
    info = {"k": "x" * (v.MAX_SYSTEM_INFO_BYTES - len('{"k": ""}'))}  # exactly 4096 bytes of JSON
    assert len(json.dumps(info)) == v.MAX_SYSTEM_INFO_BYTES
    cleaned = body_of(v.registration, registration(name="n" * 128, device="d" * 64, system_info=info))
    assert (len(cleaned["name"]), len(cleaned["device"]), cleaned["system_info"]) == (128, 64, info)


@pytest.mark.parametrize("fields, message", [
    ({"name": "n" * 129}, "name must be a non-empty string of at most 128 characters"),
    ({"device": "d" * 65}, "device must be a non-empty string of at most 64 characters"),
    ({"num_samples": 0}, "num_samples must be an integer in [1, 1000000000], got 0"),
    ({"system_info": {"k": "x" * (4096 - len('{"k": ""}') + 1)}},
     "system_info must be a JSON object of at most 4096 bytes"),
    ({"system_info": ["not", "an", "object"]}, "system_info must be a JSON object of at most 4096 bytes"),
    ({"system_info": {"load": float("nan")}}, "system_info must not hold NaN, Infinity or invalid unicode"),
    ({"system_info": {"s": "\ud800"}}, "system_info must not hold NaN, Infinity or invalid unicode"),
    ({"instance_id": "i" * 65}, "instance_id must be a non-empty string of at most 64 characters"),
    ({"eval_samples": -1}, "eval_samples must be an integer in [0, 1000000000]"),
    ({"eval_samples": 10**9 + 1}, "eval_samples must be an integer in [0, 1000000000]"),
    ({"eval_samples": True}, "eval_samples must be an integer in [0, 1000000000]"),
    ({"eval_samples": 1.0}, "eval_samples must be an integer in [0, 1000000000]"),
])
def test_a_registration_one_past_a_limit_is_400_naming_it(fields, message):
    payload = registration(**fields)
    if "\ud800" in json.dumps(payload, ensure_ascii=True) or "NaN" in json.dumps(payload):
        payload = json.dumps(payload)  # what a client would send
    assert refused(body_of, v.registration, payload) == message


def test_an_evaluation_has_num_samples_and_at_most_64_finite_metrics_named_in_64_characters():
    metrics = {f"m{i}": float(i) for i in range(v.MAX_METRICS - 1)} | {"n" * 64: -1e15}
    assert body_of(v.evaluation, {"num_samples": 5, "metrics": metrics}) == (5, metrics)
    assert body_of(v.evaluation, {"num_samples": 5, "metrics": {}}) == (5, {})
    too_many = {f"m{i}": 0.0 for i in range(v.MAX_METRICS + 1)}
    for bad, message in (
            ({"num_samples": 0, "metrics": {}}, "num_samples must be an integer in [1, 1000000000], got 0"),
            ({"num_samples": 5, "metrics": too_many}, "metrics must be an object of at most 64 names to numbers"),
            ({"num_samples": 5, "metrics": [1.0]}, "metrics must be an object of at most 64 names to numbers"),
            ({"num_samples": 5, "metrics": {"n" * 65: 1.0}},
             "metric name must be a non-empty string of at most 64 characters"),
            ({"num_samples": 5, "metrics": {"loss": 1.0000001e15}},
             "metrics.loss must be in [-1000000000000000.0, 1000000000000000.0], got 1000000100000000.0")):
        assert refused(body_of, v.evaluation, bad) == message


# ----------------------------------------------------------------------------- a task's fingerprint


def test_a_fingerprint_at_its_limits_is_kept():
    assert len(v.task_fingerprint({"name": "t", "schema": [["k", [1], "f"]] * 20_000})["schema"]) == 20_000
    schema = [["k" * 1024, [2**40 - 1] + [0] * 15, "d" * 32]]
    details = {"k": "x" * (4096 - len('{"k": ""}'))}
    task = {"name": "t" * 128, "schema": schema, "classes": ["c" * 128] * 3, "details": details}
    assert v.task_fingerprint(task) == task


@pytest.mark.parametrize("task, message", [
    (["mnist"], "task must be a JSON object (name, schema, classes, details)"),
    ({"name": "t" * 129}, "task.name must be a non-empty string of at most 128 characters"),
    ({"name": "t", "schema": [["k", [1], "f"]] * 20_001}, "task.schema must be a list of at most 20000 entries"),
    ({"name": "t", "schema": {"k": 1}}, "task.schema must be a list of at most 20000 entries"),
    ({"name": "t", "schema": [["k", [1]]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", [1], "f", 1]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", 1, "f"]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [("k", [1], "f")]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", [1] * 17, "f"]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", [2**40], "f"]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", [-1], "f"]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", [True], "f"]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k", [1.0], "f"]]}, "task.schema entries must be [key, [dimensions...], dtype]"),
    ({"name": "t", "schema": [["k" * 1025, [1], "f"]]},
     "task.schema key must be a non-empty string of at most 1024 characters"),
    ({"name": "t", "schema": [["k", [1], "d" * 33]]},
     "task.schema dtype must be a non-empty string of at most 32 characters"),
    ({"name": "t", "classes": ["c"] * 20_001}, "task.classes must be a list of at most 20000 strings"),
    ({"name": "t", "classes": ["c" * 129]}, "task.classes[] must be a non-empty string of at most 128 characters"),
    ({"name": "t", "details": [1]}, "task.details must be a JSON object of at most 4096 bytes"),
    ({"name": "t", "details": {"k": "x" * 4088}}, "task.details must be a JSON object of at most 4096 bytes"),
])
def test_a_fingerprint_one_past_a_limit_is_400_naming_it(task, message):
    assert refused(v.task_fingerprint, task) == message


# ----------------------------------------------------------------------------- queries


def query(call, string: str, *args):
    with APP.test_request_context(query_string=string):
        return call(*args)


def test_a_long_poll_waits_0_to_60_seconds():
    assert [query(v.long_poll_wait, s) for s in ("", "wait=0", "wait=60", "wait=2.5")] == [0.0, 0.0, 60.0, 2.5]
    assert refused(query, v.long_poll_wait, "wait=60.5") == "wait must be in [0, 60] seconds, got '60.5'"
    assert refused(query, v.long_poll_wait, "wait=-0.5") == "wait must be in [0, 60] seconds, got '-0.5'"
    assert refused(query, v.long_poll_wait, "wait=soon") == "wait must be a number of seconds, got 'soon'"


def test_a_node_page_is_an_offset_a_limit_up_to_500_and_a_known_status():
    statuses = ("online", "offline")
    assert query(v.node_page_query, "", statuses) == (0, 500, None)
    assert query(v.node_page_query, "offset=1000000000&limit=1&status=offline", statuses) == (10**9, 1, "offline")
    for string, message in (
            ("offset=1000000001", "offset must be an integer in [0, 1000000000], got '1000000001'"),
            ("offset=-1", "offset must be an integer in [0, 1000000000], got '-1'"),
            ("limit=0", "limit must be an integer in [1, 500], got '0'"),
            ("limit=501", "limit must be an integer in [1, 500], got '501'"),
            ("limit=1.5", "limit must be an integer in [1, 500], got '1.5'"),
            ("status=busy", "status must be one of online, offline, got 'busy'")):
        assert refused(query, v.node_page_query, string, statuses) == message


# ----------------------------------------------------------------------------- an update's metadata and size


def test_update_metadata_keeps_num_samples_up_to_the_nodes_and_the_optional_training_figures():
    meta = {"num_samples": 100, "train_loss": 1e12, "train_accuracy": 1.0, "train_seconds": 1e9, "other": "kept out"}
    assert v.parse_update_metadata(json.dumps(meta), node(100)) == {
        "num_samples": 100, "train_loss": 1e12, "train_accuracy": 1.0, "train_seconds": 1e9}
    assert v.parse_update_metadata('{"num_samples": 1, "train_loss": 0, "train_accuracy": null}', node(100)) == {
        "num_samples": 1, "train_loss": 0.0}
    assert v.parse_update_metadata('{"num_samples": 1}', node(0)) == {"num_samples": 1}  # a node of 0 sends 1


@pytest.mark.parametrize("raw, message", [
    (None, "missing form field 'metadata' (JSON)"),
    ("{", "form field 'metadata' is not valid JSON"),
    ("[" * 5000 + "]" * 5000, "form field 'metadata' is not valid JSON"),
    ("[1]", "form field 'metadata' must be a JSON object"),
    ('{"num_samples": 101}', "metadata.num_samples must be an integer in [1, 100], got 101"),
    ('{"num_samples": 1, "train_loss": -0.5}', "metadata.train_loss must be in [0.0, 1000000000000.0], got -0.5"),
    ('{"num_samples": 1, "train_accuracy": 1.01}', "metadata.train_accuracy must be in [0.0, 1.0], got 1.01"),
    ('{"num_samples": 1, "train_seconds": 1.5e9}',
     "metadata.train_seconds must be in [0.0, 1000000000.0], got 1500000000.0"),
])
def test_bad_update_metadata_is_400_naming_the_field(raw, message):
    with pytest.raises(BadUpdateMetadata) as raised:
        v.parse_update_metadata(raw, node(100))
    assert str(raised.value) == message


@pytest.mark.parametrize("with_control, over", [(False, 0), (False, 1), (True, 0), (True, 1)])
def test_the_content_length_may_reach_each_part_at_the_limit_plus_the_slack(with_control, over):
    """Refused before the body is read: Content-Length over (1 or 2 parts) * limit + MULTIPART_SLACK."""
    limit = 4096
    length = (2 if with_control else 1) * limit + MULTIPART_SLACK + over
    with APP.test_request_context(method="POST", content_type="text/plain",
                                  environ_overrides={"CONTENT_LENGTH": str(length)}):
        if over:
            with pytest.raises(UpdateTooLarge):
                v.update_upload(node(), limit, with_control)
        else:  # past the size check: refused next for not being multipart
            assert refused(v.update_upload, node(), limit, with_control, code=415, error="unsupported_media_type")
