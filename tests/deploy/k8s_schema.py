"""The schema check both k8s test modules use (no cluster in the tests): every generated document
goes through the official ``kubernetes`` client's models (required fields, field types) and a
walk over their ``attribute_map`` that rejects unknown fields, which the models alone silently
drop (a misspelt ``volumeMount`` would otherwise pass).

Import it after ``pytest.importorskip("kubernetes")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client import models as k8s_models

_LIST = re.compile(r"^(?:List\[|list\[)(.*)\]$")
_DICT = re.compile(r"^(?:Dict\[str, |dict\(str, )(.*)[\])]$")


class SchemaError(ValueError):
    """A document has a field the Kubernetes API does not know, or a value of the wrong type."""


def _check_fields(value: Any, type_name: str, path: str) -> None:
    """Walk ``value`` along the model's declared types; unknown keys and wrong types fail."""
    if (m := _LIST.match(type_name)) is not None:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {value!r}")
        for i, item in enumerate(value):
            _check_fields(item, m.group(1), f"{path}[{i}]")
        return
    if (m := _DICT.match(type_name)) is not None:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a mapping, got {value!r}")
        for key, item in value.items():
            _check_fields(item, m.group(1), f"{path}.{key}")
        return
    primitive = {"str": str, "int": int, "float": (int, float), "bool": bool, "datetime": str}
    if type_name == "object":  # IntOrString and friends: the model checks them
        return
    if type_name in primitive:
        ok = isinstance(value, primitive[type_name]) and not (
            type_name in {"int", "float"} and isinstance(value, bool)
        )
        if not ok:
            raise SchemaError(f"{path}: expected {type_name}, got {value!r}")
        return
    model = getattr(k8s_models, type_name)
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: expected a {type_name} mapping, got {value!r}")
    by_json_key = {json_key: attr for attr, json_key in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json_key:
            raise SchemaError(f"{path}: {type_name} has no field {key!r}")
        _check_fields(item, model.openapi_types[by_json_key[key]], f"{path}.{key}")


def validator(models: dict[tuple[str, str], str]) -> Callable[[dict[str, Any]], Any]:
    """A ``validate(doc)`` accepting only the ``(apiVersion, kind)`` pairs of ``models``
    (mapped to client model names); it returns the client model object.

    ``validate`` raises SchemaError (unknown kind, unknown field or wrong type) or ValueError
    (the model rejects it: a required field missing, a wrong type).
    """

    def validate(doc: dict[str, Any]) -> Any:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in models:
            raise SchemaError(f"unknown apiVersion/kind {key}")
        model_name = models[key]  # type: ignore[index]
        _check_fields(doc, model_name, str(doc["kind"]))
        obj = ApiClient()._ApiClient__deserialize(doc, model_name)
        assert type(obj).__name__ == model_name
        return obj

    return validate
