"""The adapter store: versions, the atomic `current` pointer, and publishes that are all or nothing
even when the publishing process is killed halfway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from server.errors import AdapterNotFound, InvalidRequest
from server.model.factory import make_model
from server.adapters.store import AdapterStore, base_fingerprint


def test_publish_numbers_versions_and_moves_current(peft_adapters, tmp_path):
    store = AdapterStore(tmp_path)
    first = store.publish("cheese", peft_adapters["cheese"], manifest={"base_fingerprint": "abc"})
    second = store.publish("cheese", peft_adapters["wine"])
    assert (first.version, second.version) == ("v1", "v2")
    assert store.current("cheese") == "v2" and store.versions("cheese") == ["v1", "v2"]
    assert first.manifest["schema_version"] == 1 and first.manifest["base_fingerprint"] == "abc"
    assert first.manifest["name"] == "cheese" and first.manifest["version"] == "v1" and "created_at" in first.manifest
    assert second.manifest is None  # another tool's adapter: no manifest, still a valid version
    assert sorted(p.name for p in first.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    store.set_current("cheese", "v1")
    assert store.get("cheese").version == "v1" and store.names() == ["cheese"]


def test_store_refuses_bad_names_missing_files_and_rewrites(peft_adapters, tmp_path):
    store = AdapterStore(tmp_path)
    for name in ["../up", "a/b", ".hidden", ""]:
        with pytest.raises(InvalidRequest):
            store.publish(name, peft_adapters["cheese"])
    with pytest.raises(InvalidRequest, match="adapter_model.safetensors"):
        store.publish("x", tmp_path)
    store.publish("cheese", peft_adapters["cheese"], version="prod-1")
    with pytest.raises(InvalidRequest, match="immutable"):
        store.publish("cheese", peft_adapters["wine"], version="prod-1")
    with pytest.raises(AdapterNotFound):
        store.get("cheese", "v7")
    with pytest.raises(AdapterNotFound):
        store.get("nothing")


def test_concurrent_publishers_get_distinct_versions(peft_adapters, tmp_path):
    store = AdapterStore(tmp_path)
    threads = [threading.Thread(target=store.publish, args=("cheese", peft_adapters["cheese"])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.versions("cheese") == [f"v{i}" for i in range(1, 7)]


# Runs a real publish in another process that freezes at a chosen step (fault injection at a
# library boundary: the step announces itself, then sleeps until the test kills the process).
PUBLISH = """
import os, shutil, sys, time
import server.adapters.store as store_module
store_root, source, step = sys.argv[1:]
calls = {"copyfile": 0}
def freeze_at(module, name):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        if name == step.split(":")[0] and calls[name] == int(step.split(":")[1]):
            print("frozen", flush=True)
            time.sleep(3600)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)
freeze_at(shutil, "copyfile")
freeze_at(os, "rename")
freeze_at(os, "replace")
store_module.AdapterStore(store_root).publish("cheese", source)
"""


@pytest.mark.parametrize("step", ["copyfile:2", "rename:1", "replace:1"],
                         ids=["between the two files", "before the version is renamed in", "before current moves"])
def test_a_publish_killed_midway_leaves_the_store_as_it_was(peft_adapters, tmp_path, step):
    store = AdapterStore(tmp_path / "store")
    store.publish("cheese", peft_adapters["cheese"])
    before = snapshot(store)
    process = subprocess.Popen([sys.executable, "-c", PUBLISH, str(store.root), str(peft_adapters["wine"]), step],
                               stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert process.stdout.readline().strip() == "frozen"
    process.send_signal(signal.SIGKILL)
    process.wait()

    after = snapshot(store)
    assert after["cheese"][0] == "v1" and store.get("cheese").version == "v1"  # current never moved
    assert after["cheese"][1]["v1"] == before["cheese"][1]["v1"]  # the old version is untouched
    if step == "replace:1":  # killed after the rename: v2 is complete, just not current yet
        assert sorted(n for n, _ in after["cheese"][1]["v2"]) == ["adapter_config.json", "adapter_model.safetensors"]
    else:
        assert after == before
        assert list((store.root / "cheese").glob(".tmp-*"))  # the leftover is hidden from readers...
        assert store.collect_garbage(min_age_s=0) and not list((store.root / "cheese").glob(".tmp-*"))  # ...and collectable
    assert store.publish("cheese", peft_adapters["wine"]).version in ("v2", "v3")  # the store still works


def snapshot(store):
    return {name: (store.current(name), {v: sorted((p.name, p.read_bytes()) for p in (store.root / name / v).iterdir())
                                         for v in store.versions(name)}) for name in store.names()}


def test_base_fingerprint_tells_checkpoints_apart(tmp_path):
    a = make_model(tmp_path / "a", "tiny", seed=1)
    same = make_model(tmp_path / "same", "tiny", seed=1)
    other = make_model(tmp_path / "other", "tiny", seed=2)
    assert base_fingerprint(a) == base_fingerprint(same) != base_fingerprint(other)
    assert json.loads((a / "config.json").read_text())  # fingerprints read real checkpoint directories


def test_a_publisher_with_a_strict_umask_still_publishes_for_every_reader(peft_adapters, tmp_path):
    """The trainer Job and the servers may be different users on one volume: versions are
    world-readable (not writable) whatever the publisher's umask, and another UID reads them."""
    import shutil
    import stat
    import tempfile

    root = tempfile.mkdtemp()  # in /tmp itself: pytest's tmp_path sits under a 0700 directory
    try:
        os.chmod(root, 0o755)
        store = AdapterStore(root)
        old = os.umask(0o077)
        try:
            stored = store.publish("cheese", peft_adapters["cheese"], manifest={"base_fingerprint": "abc"})
        finally:
            os.umask(old)
        files = [stored.path.parent / "current", *stored.path.iterdir()]
        for path in [stored.path.parent, stored.path, *files]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
        if os.geteuid() == 0:  # as root here (and in CI): read it as another user for real
            read = subprocess.run(["cat", *map(str, files)], capture_output=True, timeout=30, user=65534, group=65534)
            assert read.returncode == 0, read.stderr
            assert len(read.stdout) == sum(p.stat().st_size for p in files)
    finally:
        shutil.rmtree(root)
