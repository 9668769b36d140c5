"""Issue 36, item 8: errors that name the key, file or URL they are about — a full disk, an
unusable model cache — instead of a bare errno."""
from __future__ import annotations

import errno

import pytest

from ensemble_core.config import ConfigError


class _FullDisk:
    """An fsspec file system whose writes fail as on a full disk."""

    protocol = ("file", "local")

    def makedirs(self, path, exist_ok=False):
        pass

    def open(self, path, mode="rb"):
        raise OSError(errno.ENOSPC, "No space left on device")

    def rm(self, path):
        pass


def test_a_full_disk_names_the_file(monkeypatch, tmp_path):
    from ensemble_core import storage

    url = str(tmp_path / "run" / "metrics.json")
    monkeypatch.setattr(storage, "fs_and_path", lambda u: (_FullDisk(), u))
    with pytest.raises(OSError) as info:
        storage.atomic_write_bytes(url, b"{}")
    assert info.value.errno == errno.ENOSPC
    assert f"cannot write {url}: No space left on device" in str(info.value)
    assert "the disk is full" in str(info.value)


def test_an_unusable_cache_dir_is_named_at_once(tmp_path, monkeypatch):
    from flows.cli import check_cache_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"cache_dir {blocker}/models \(the model cache\) "
                                          r"is not usable"):
        check_cache_dir(str(blocker / "models"))
    monkeypatch.setenv("ENSEMBLE_LORA_CACHE", str(blocker / "cache"))
    with pytest.raises(ConfigError, match=r"^ENSEMBLE_LORA_CACHE .* is not usable"):
        check_cache_dir(None)
    check_cache_dir(str(tmp_path / "fine"))  # created and writable
    assert (tmp_path / "fine").is_dir()
