"""The extension's JIT build (20-50 s on first use) says on stderr when it starts and how it ended, and a
quick load from a warm cache says nothing. The build is mocked: no compiler runs here."""
import sys
import time

import pytest

from reversible import _extension


@pytest.fixture
def fresh(monkeypatch):
    """A never-tried loader state, no installed ``reversible._C``, JIT allowed, a short notice delay;
    ``registered`` flips to True when the mocked build succeeds."""
    monkeypatch.setattr(_extension, "_state", dict(tried=False, loaded=False, source=None, reason="", devices=(),
                                                   build_seconds=None, warned=False))
    monkeypatch.setitem(sys.modules, "reversible._C", None)  # import raises ImportError
    monkeypatch.setenv("REVERSIBLE_EXTENSION_JIT", "1")
    monkeypatch.setattr(_extension, "_NOTICE_AFTER_S", 0.05, raising=False)
    monkeypatch.setattr(_extension, "_kernel_devices", lambda: ("cpu",))
    registered = {"ok": False}
    monkeypatch.setattr(_extension, "_registered", lambda: registered["ok"])

    def build(seconds, fail=False):
        def jit():
            time.sleep(seconds)
            if fail:
                raise RuntimeError("Error building extension 'revkern_cpu'")
            registered["ok"] = True
            return "cpu"
        monkeypatch.setattr(_extension, "_jit_build", jit)
    return build


def _lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("reversible:")]


def test_slow_build_announces_start_and_end(fresh, capsys):
    fresh(0.5)
    assert _extension.load()
    lines = _lines(capsys)
    assert len(lines) == 2, lines
    assert "building the C++ extension" in lines[0]
    assert "built in" in lines[1]


def test_failed_build_announces_the_pytorch_path(fresh, capsys):
    fresh(0.5, fail=True)
    assert not _extension.load()
    lines = _lines(capsys)
    assert len(lines) == 2, lines
    assert "building the C++ extension" in lines[0]
    assert "failed" in lines[1] and "Error building extension" in lines[1] and "PyTorch path" in lines[1]
    assert "JIT build failed" in _extension.extension_info(load_now=False)["reason"]


def test_quick_load_from_the_cache_is_silent(fresh, capsys):
    fresh(0.0)
    assert _extension.load()
    assert _lines(capsys) == []


@pytest.mark.parametrize("value, builds", [("0", False), ("No", False), (" FALSE ", False), ("off", False),
                                           ("1", True), ("yes", True)])
def test_jit_switch_reads_the_words_of_reversible_extension(fresh, monkeypatch, capsys, value, builds):
    """REVERSIBLE_EXTENSION_JIT takes the off-words REVERSIBLE_EXTENSION takes, in any case (it took only
    '0'/'off'/'false' exactly: 'No' or 'FALSE' built anyway), and a skipped build is named in the reason."""
    fresh(0.0)
    monkeypatch.setenv("REVERSIBLE_EXTENSION_JIT", value)
    assert _extension.load() is builds
    if not builds:
        assert f"no JIT build (REVERSIBLE_EXTENSION_JIT={value!r})" in _extension._state["reason"]
