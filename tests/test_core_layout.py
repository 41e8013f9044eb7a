"""The extension's Python surface matches its type stub: stochdepth/_core.pyi names every
function, class, enum member, Array attribute and build_info key that `_core` has, with the same
parameter names, order and defaults, and nothing that `_core` lacks; the stub and py.typed ship
next to the installed extension."""

from __future__ import annotations

import ast
import pathlib

import pytest

import stochdepth
from stochdepth import _core

PACKAGE = pathlib.Path(stochdepth.__file__).parent
STUB_PATH = PACKAGE / "_core.pyi"


def _stub():
    return ast.parse(STUB_PATH.read_text(), filename=str(STUB_PATH))


STUB = _stub() if STUB_PATH.exists() else None
STUB_DEFS = {} if STUB is None else {
    node.name: node
    for node in STUB.body
    if isinstance(node, (ast.FunctionDef, ast.ClassDef))
}


def _split_top_level(text):
    """Splits a parameter list on the commas that are not inside brackets or quotes."""
    parts, current, depth, quote = [], "", 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def runtime_params(func, name):
    """[(name, default or None, keyword-only)] from the signature line pybind11 writes."""
    line = func.__doc__.lstrip().splitlines()[0]
    assert line.startswith(name + "("), line
    params, kw_only = [], False
    for part in _split_top_level(line[len(name) + 1 : line.rindex(") -> ")]):
        if part == "*":
            kw_only = True
            continue
        head, _, default = part.partition(" = ")
        pname = head.split(":")[0].strip()
        if pname != "self":
            params.append((pname, ast.literal_eval(default) if default else None, kw_only))
    return params


def stub_params(node):
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = [(arg.arg, d, False) for arg, d in zip(positional, defaults)]
    params += [(arg.arg, d, True) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    return [
        (name, None if d is None else ast.literal_eval(d), kw)
        for name, d, kw in params
        if name != "self"
    ]


def public(names):
    return {n for n in names if not n.startswith("_")}


def class_members(node):
    """Names a stub class defines: methods, properties and annotated class attributes."""
    names = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
    return names


def test_stub_and_py_typed_ship_with_the_extension():
    assert STUB_PATH.is_file(), STUB_PATH
    assert (PACKAGE / "py.typed").is_file()
    assert pathlib.Path(_core.__file__).parent == PACKAGE


def test_stub_names_exactly_the_module_names():
    assert public(STUB_DEFS) == public(dir(_core))


FUNCTIONS = sorted(n for n in public(dir(_core)) if callable(getattr(_core, n))
                   and not isinstance(getattr(_core, n), type))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_parameters_match(name):
    node = STUB_DEFS[name]
    assert isinstance(node, ast.FunctionDef), name
    assert stub_params(node) == runtime_params(getattr(_core, name), name)


def test_array_attributes_match():
    node = STUB_DEFS["Array"]
    stub = class_members(node)
    assert public(stub) == public(vars(_core.Array))
    methods = {item.name: item for item in node.body if isinstance(item, ast.FunctionDef)}
    for name in ("__dlpack__", "__dlpack_device__", "__array__", "numpy"):
        assert stub_params(methods[name]) == runtime_params(getattr(_core.Array, name), name)
    properties = {n for n, v in vars(_core.Array).items() if isinstance(v, property)}
    stub_properties = {
        name for name, item in methods.items()
        if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
    }
    assert stub_properties == properties


@pytest.mark.parametrize("enum_name", ["DType", "Scaling"])
def test_enum_members_match(enum_name):
    node = STUB_DEFS[enum_name]
    members = {
        item.target.id
        for item in node.body
        if isinstance(item, ast.AnnAssign) and "ClassVar" in ast.unparse(item.annotation)
        and item.target.id != "__members__"
    }
    assert members == set(getattr(_core, enum_name).__members__)


def test_build_info_keys_and_types_match():
    node = next(n for n in STUB.body if isinstance(n, ast.ClassDef) and n.name == "_BuildInfo")
    fields = {item.target.id: ast.unparse(item.annotation) for item in node.body
              if isinstance(item, ast.AnnAssign)}
    info = _core.build_info()
    assert set(fields) == set(info)
    python_types = {"str": str, "bool": bool, "int": int}
    for key, annotation in fields.items():
        if annotation == "List[str]":
            assert isinstance(info[key], list) and all(isinstance(x, str) for x in info[key]), key
        else:
            assert type(info[key]) is python_types[annotation], (key, info[key])
