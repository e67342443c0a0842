"""DeepCompressor's Nunchaku converter as a test oracle (``deepcompressor-toolkit==0.1.0``,
installed with ``--no-deps`` by the README's test command; its converter needs only torch,
safetensors and tqdm). Tests import it from here; its code is never copied into ours."""

from __future__ import annotations

import contextlib
import io

import pytest

INSTALL_HINT = "pip install --no-deps deepcompressor-toolkit==0.1.0 (the README's test command)"


def deepcompressor():
    """(nunchaku.utils, nunchaku.convert, tinychat.utils) modules, or skip with the install hint
    (``test_oracle_is_installed`` fails in that case, so CI never skips silently)."""
    utils = pytest.importorskip("deepcompressor.backend.nunchaku.utils", reason=INSTALL_HINT)
    convert = pytest.importorskip("deepcompressor.backend.nunchaku.convert", reason=INSTALL_HINT)
    tinychat = pytest.importorskip("deepcompressor.backend.tinychat.utils", reason=INSTALL_HINT)
    return utils, convert, tinychat


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with its progress prints and bars silenced."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)
