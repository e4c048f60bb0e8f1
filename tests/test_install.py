"""How pygeo is installed: a source checkout hiding the installed build is said loudly; missing extras are named."""
import importlib.machinery
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

from pygeo import _backend
from pygeo.cli import main, missing_extra

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


class _FakeFile(type(Path())):
    """A RECORD entry of an installed distribution: a relative path that `locate()`s under site-packages."""

    def locate(self):
        return self.site / self


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A source checkout (pyproject.toml, csrc/, pygeo/ without _C) and an installed pygeo-latent with _C."""
    checkout = tmp_path / "clone"
    (checkout / "csrc").mkdir(parents=True)
    (checkout / "pygeo").mkdir()
    (checkout / "pyproject.toml").write_text("")
    site = tmp_path / "site-packages"
    (site / "pygeo").mkdir(parents=True)
    (site / "pygeo" / f"_C{SUFFIX}").write_bytes(b"")

    class Distribution:
        files = []

    record = _FakeFile(f"pygeo/_C{SUFFIX}")
    record.site = site
    Distribution.files = [record]
    monkeypatch.setattr(_backend, "__file__", str(checkout / "pygeo" / "_backend.py"))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Distribution)
    _backend.shadowed_build.cache_clear()
    yield checkout, site
    _backend.shadowed_build.cache_clear()


def test_source_checkout_hiding_the_installed_build_is_reported(layout):
    checkout, site = layout
    assert _backend.shadowed_build() == str(site.resolve() / "pygeo")
    message = _backend.shadowing_warning()
    assert str(checkout / "pygeo") in message and "fallback" in message and "outside the checkout" in message


def test_no_warning_when_built_in_place_or_not_a_checkout(layout):
    checkout, _ = layout
    (checkout / "pygeo" / f"_C{SUFFIX}").write_bytes(b"")
    assert _backend.shadowed_build() is None
    (checkout / "pygeo" / f"_C{SUFFIX}").unlink()
    (checkout / "pyproject.toml").unlink()
    _backend.shadowed_build.cache_clear()
    assert _backend.shadowed_build() is None


def test_missing_extra_names_the_extra(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlxtend" else real_find_spec(name, *args))
    message = missing_extra("demo")
    assert "[demo]" in message and "mlxtend" in message and 'pip install "pygeo-latent[demo]"' in message
    assert main(["demo", "--quick"]) == 2
    assert "[demo] extra" in capsys.readouterr().err


def test_no_warning_for_an_editable_install_of_this_checkout(layout):
    """`pip install -e .` lists pygeo/_C in its RECORD (in site-packages) while the package is the checkout's."""
    checkout, site = layout
    distribution = importlib.metadata.distribution("pygeo-latent")
    distribution.read_text = staticmethod(
        lambda name: f'{{"url": "file://{checkout}", "dir_info": {{"editable": true}}}}' if name == "direct_url.json" else None)
    assert _backend.shadowed_build() is None
    distribution.read_text = staticmethod(
        lambda name: f'{{"url": "file://{site}", "dir_info": {{"editable": true}}}}' if name == "direct_url.json" else None)
    _backend.shadowed_build.cache_clear()
    assert _backend.shadowed_build() == str(site.resolve() / "pygeo")
