"""The importers (Nunchaku v1.0 file, legacy folder, DeepCompressor folder) on hostile input
(tests/fuzz/foreign.py): every case that was a traceback, a hang, a late failure, a NaN model or
a silent wrong load before issue 13's fixes, plus a fixed seeded sample of the rest. The whole
sweep is ``python -m tests.fuzz.foreign``."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("deepcompressor.backend.nunchaku.convert")

from .foreign import GOOD, generate, make_bases, run_case  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning"),
]
TIMEOUT = 60.0
SAMPLE = 24
# the cases that failed before the fix (outcome then)
FIXED = {
    "nunchaku-int4: config a list": "traceback (FileNotFoundError: the JSON text taken as a path)",
    "nunchaku-int4: num_layers 1e6": "hang (a million-block skeleton)",
    "nunchaku-int4: head dim 0": "traceback (ZeroDivisionError)",
    "nunchaku-int4: rope axes wrong sum": "late failure (forward raised)",
    "nunchaku-legacy: random bytes": "traceback (UnicodeDecodeError on config.json)",
    "nunchaku-legacy: shape huge": "traceback (allocation before the size check)",
    "nunchaku-legacy: shape negative": "traceback (negative dimension)",
    "nunchaku-int4: offsets shifted": "silent wrong load (overlapping offsets)",
    "nunchaku-legacy: offsets shifted": "silent wrong load (overlapping offsets)",
    "deepcompressor: model.pt entry NaN": "NaN outputs",
    "deepcompressor: model.pt entry deleted": "silent wrong load (a missing bias read as zero)",
    "deepcompressor: scale.pt entry int8": "traceback (ValueError: NaN to integer)",
    "deepcompressor: scale.pt entry one dim more": "traceback (torch.cat)",
    "deepcompressor: branch.pt entry an int": "traceback (AttributeError)",
    "deepcompressor: branch.pt entry a string": "traceback (AttributeError)",
    "deepcompressor: branch.pt entry NaN": "NaN outputs",
    "deepcompressor: branch.pt entry Inf": "NaN outputs",
    "deepcompressor: smooth.pt entry an int": "traceback (AttributeError)",
    "deepcompressor: smooth.pt entry a string": "traceback (AttributeError)",
    "deepcompressor: smooth.pt entry one dim more": "traceback (torch.cat)",
    "deepcompressor: smooth.pt entry NaN": "NaN outputs",
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    torch.set_num_threads(1)
    return make_bases(tmp_path_factory.mktemp("foreign-bases"))


@pytest.fixture(scope="module")
def cases(bases):
    return generate(bases, seed=0)


def _run(cases, bases, tmp_path):
    results = []
    for i, case in enumerate(cases):
        workdir = tmp_path / f"case-{i}"
        workdir.mkdir()
        results.append(run_case(case, bases[case.base], workdir, TIMEOUT))
    return results


def _defects(results):
    return [f"{r.outcome}: {r.case.cls}: {r.case.name}: {r.detail}" for r in results
            if r.outcome not in GOOD]  # fmt: skip


def test_the_cases_that_failed_before_are_refused(cases, bases, tmp_path):
    chosen = [c for c in cases if c.name in FIXED]
    assert {c.name for c in chosen} == set(FIXED)
    results = _run(chosen, bases, tmp_path)
    # refused, or loaded with the original outputs (a scale tensor with one more unit dimension
    # holds the same values, read in any shape as DeepCompressor's converter does), never
    # loaded with other values: each of these broke something the importer can check
    ok = ("refused", "loaded, equal")
    bad = [f"{r.outcome}: {r.case.name}: {r.detail}" for r in results if r.outcome not in ok]
    assert not bad, "\n".join(bad)


def test_a_fixed_sample_of_every_class(cases, bases, tmp_path):
    rest = [c for c in cases if c.name not in FIXED]
    sample = random.Random(0).sample(rest, SAMPLE)
    assert len({c.cls for c in sample}) >= 6
    bad = _defects(_run(sample, bases, tmp_path))
    assert not bad, "\n".join(bad)
