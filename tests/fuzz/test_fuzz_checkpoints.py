"""The hostile-checkpoint fuzz suite (tests/fuzz/checkpoints.py) and property tests over header
and metadata mutations: every malformed file is refused with a one-line error naming the
problem, or loads with outputs equal to the original's; never a silent wrong load, a traceback,
a hang, or a disagreement between ``inspect`` and ``load_quantized``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .checkpoints import CLASSES, GOOD, Case, generate, make_bases, run_case
from .mutate import Checkpoint, header_span
from .report import summary

pytestmark = pytest.mark.slow
TIMEOUT = 60.0  # per case (a CI machine may be slow; the cases take well under a second)
PER_CLASS = 6  # cases per class in CI (the whole sweep is the command)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    torch.set_num_threads(1)
    return make_bases(tmp_path_factory.mktemp("bases"))


def _run(cases, bases, tmp_path):
    results = []
    for i, case in enumerate(cases):
        workdir = tmp_path / f"case-{i}"
        workdir.mkdir()
        results.append(run_case(case, bases[case.base], workdir, TIMEOUT))
    return results


@pytest.mark.parametrize("cls", list(CLASSES))
def test_a_fixed_sample_of_each_class_is_refused_cleanly_or_loads_equal(cls, bases, tmp_path):
    """CI runs a fixed sample (the same cases every run) of each class; the whole sweep of
    every case is ``python -m tests.fuzz.checkpoints`` (docs/FORMAT.md quotes its table)."""
    (tmp_path / "scratch").mkdir()
    cases = generate(bases, seed=0, scratch=tmp_path / "scratch", classes=[cls])
    assert len(cases) >= 20
    sample = random.Random(0).sample(cases, PER_CLASS)
    results = _run(sample, bases, tmp_path)
    bad = [f"{r.outcome}: {r.case.name}: {r.detail}" for r in results if r.outcome not in GOOD]
    assert not bad, "\n".join(bad)
    row = summary(results)[0]
    assert row["cases"] == PER_CLASS and row.get("refused", 0) > 0


def test_the_suite_has_at_least_300_cases_over_int4_nvfp4_single_and_sharded(bases, tmp_path):
    cases = generate(bases, seed=0, scratch=tmp_path)
    assert len(cases) >= 300
    assert {c.base for c in cases} == {"int4-single", "int4-sharded", "nvfp4-single",
                                       "nvfp4-sharded"}  # fmt: skip


# --------------------------------------------------------------------------------------------
# property tests (hypothesis, derandomized: the same examples every run)

PROPERTY = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=6,
)


def _leaves(value, path=()):
    """Every (path, value) inside a decoded metadata value, containers included."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


def _replace(value, path, new):
    if not path:
        return new
    value[path[0]] = _replace(value[path[0]], path[1:], new)
    return value


def _same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and type(a) is type(b)


def _kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _mutation_case(bases, data, reseal: bool) -> Case:
    base = bases[data.draw(st.sampled_from(sorted(bases)), label="base")]
    raw = Checkpoint(base.path).raw_meta()
    key = data.draw(st.sampled_from(sorted(k for k in raw if k != "format")), label="key")
    leaves = list(_leaves(json.loads(raw[key])))
    path, old = leaves[data.draw(st.integers(0, len(leaves) - 1), label="leaf")]
    if reseal:
        # a resealed edit is a wrong writer's: a value of another JSON kind (the schema's job);
        # a same-kind edit of a semantic field is indistinguishable from a real model's value
        new = data.draw(JSON.filter(lambda v: _kind(v) != _kind(old)), label="value")
    else:
        new = data.draw(JSON, label="value")

    def edit(ck: Checkpoint) -> None:
        meta = ck.raw_meta()
        meta[key] = json.dumps(_replace(json.loads(meta[key]), path, new))
        ck.set_raw_meta(meta)
        if reseal:
            ck.reseal()

    expect = () if reseal or _same_json(old, new) else ("edited", "integrity", "metadata")
    return Case("property", f"{key}{list(path)} = {new!r}", base.name, edit, expect)


@PROPERTY
@given(data=st.data())
def test_any_unsealed_metadata_edit_is_caught_or_harmless(bases, tmp_path_factory, data):
    case = _mutation_case(bases, data, reseal=False)
    result = run_case(case, bases[case.base], tmp_path_factory.mktemp("p"), TIMEOUT)
    assert result.outcome in GOOD, f"{result.outcome}: {case.name}: {result.detail}"


@PROPERTY
@given(data=st.data())
def test_any_resealed_metadata_type_error_is_refused_or_harmless(bases, tmp_path_factory, data):
    case = _mutation_case(bases, data, reseal=True)
    result = run_case(case, bases[case.base], tmp_path_factory.mktemp("p"), TIMEOUT)
    assert result.outcome in GOOD, f"{result.outcome}: {case.name}: {result.detail}"


@PROPERTY
@given(data=st.data())
def test_any_header_byte_edit_is_caught_or_harmless(bases, tmp_path_factory, data):
    base = bases[data.draw(st.sampled_from(["int4-single", "nvfp4-single"]), label="base")]
    lo, hi = header_span(base.path)
    offset = data.draw(st.integers(lo, hi - 1), label="offset")
    byte = data.draw(st.integers(0, 255), label="byte")

    def edit(ck: Checkpoint) -> None:
        blob = bytearray(ck.path.read_bytes())
        blob[offset] = byte
        ck.path.write_bytes(bytes(blob))

    case = Case("property", f"header byte {offset} = {byte}", base.name, edit)
    result = run_case(case, base, tmp_path_factory.mktemp("p"), TIMEOUT)
    assert result.outcome in GOOD, f"{result.outcome}: {case.name}: {result.detail}"


SAFETENSORS_NAMES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                     "I64", "U64", "F8_E4M3", "F8_E5M2", "F4", "x"]  # fmt: skip


@PROPERTY
@given(data=st.data())
def test_any_tensor_table_edit_is_caught_or_harmless(bases, tmp_path_factory, data):
    base = bases[data.draw(st.sampled_from(sorted(bases)), label="base")]
    name = data.draw(st.sampled_from(Checkpoint(base.path).tensor_names()), label="tensor")
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
    if field == "dtype":
        value = data.draw(st.sampled_from(SAFETENSORS_NAMES), label="value")
    else:
        value = data.draw(st.lists(st.integers(-4, 1 << 20), max_size=4), label="value")
    reseal = data.draw(st.booleans(), label="reseal")

    def edit(ck: Checkpoint) -> None:
        ck.edit_header(name, lambda e: e.update({field: value}))
        if reseal:
            ck.reseal()

    case = Case("property", f"{name}.{field} = {value} (reseal={reseal})", base.name, edit)
    result = run_case(case, base, tmp_path_factory.mktemp("p"), TIMEOUT)
    assert result.outcome in GOOD, f"{result.outcome}: {case.name}: {result.detail}"
