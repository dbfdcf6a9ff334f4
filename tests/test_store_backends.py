"""The adapter store's contract, the same tests on both backends: a directory, and S3 served by a
real S3-protocol server on loopback (moto's standalone server). Then what only an object store
does: a read-through cache checked against the manifest, conditional reads, and staying useful when
the bucket cannot be reached."""

from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path

import pytest

from server.adapters.cache import CorruptObject
from server.adapters.store import ADAPTER_FILES, ObjectStoreOptions, open_store
from server.errors import AdapterNotFound, InvalidRequest, StoreUnavailable

boto3 = pytest.importorskip("boto3")


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    """An empty store of each kind."""
    if request.param == "directory":
        return open_store(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    bucket = s3.bucket()
    return open_store(f"s3://{bucket}/team/adapters", ObjectStoreOptions(endpoint_url=s3.endpoint,
                                                                         cache_dir=tmp_path / "cache"))


def adapter(directory: Path, fill: bytes) -> Path:
    """A stand-in PEFT directory (the store moves files; the reader validates them)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text('{"r": 4}')
    (directory / "adapter_model.safetensors").write_bytes(fill * 4096)
    return directory


def files_of(path: Path) -> dict[str, bytes]:
    return {f: (Path(path) / f).read_bytes() for f in ADAPTER_FILES}


# ---------------------------------------------------------------- the contract, on both backends


def test_publish_makes_a_current_version_whose_files_read_back(store, tmp_path):
    source = adapter(tmp_path / "a", b"A")
    published = store.publish("cheese", source, manifest={"note": "first"})
    assert published.version == "v1" and store.current("cheese") == "v1" and store.versions("cheese") == ["v1"]
    assert store.names() == ["cheese"]
    got = store.get("cheese")
    assert (got.name, got.version) == ("cheese", "v1") and files_of(got.path) == files_of(source)
    assert got.manifest["note"] == "first" and got.manifest["version"] == "v1"


def test_versions_pins_and_unloads(store, tmp_path):
    store.publish("wine", adapter(tmp_path / "a", b"A"))
    store.publish("wine", adapter(tmp_path / "b", b"B"))
    assert store.versions("wine") == ["v1", "v2"] and store.current("wine") == "v2"
    store.set_current("wine", "v1")  # a pin
    assert store.current("wine") == "v1" and files_of(store.get("wine").path) == files_of(tmp_path / "a")
    assert files_of(store.get("wine", "v2").path) == files_of(tmp_path / "b")
    with pytest.raises(AdapterNotFound):
        store.set_current("wine", "v9")
    with pytest.raises(AdapterNotFound):
        store.get("wine", "v9")
    with pytest.raises(AdapterNotFound):
        store.get("nothing")
    with pytest.raises(InvalidRequest, match="immutable"):
        store.publish("wine", tmp_path / "a", version="v2")
    assert store.unload_token("wine") is None
    token = store.request_unload("wine")
    assert store.unload_token("wine") == token
    with pytest.raises(AdapterNotFound):
        store.request_unload("nothing")


def test_concurrent_publishers_get_their_own_versions_and_none_is_broken(store, tmp_path):
    sources = [adapter(tmp_path / f"s{i}", bytes([65 + i])) for i in range(4)]
    results, errors = {}, []

    def publish(i):
        try:
            results[i] = store.publish("bread", sources[i]).version
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results.values()) == ["v1", "v2", "v3", "v4"]
    for i, version in results.items():  # each version holds exactly its publisher's files
        assert files_of(store.get("bread", version).path) == files_of(sources[i])
    assert store.current("bread") in results.values()


def test_a_publish_killed_halfway_is_never_listed_and_is_collected_after_the_grace_period(store, tmp_path, capsys):
    from trainer.cli import main as trainer

    store.publish("brie", adapter(tmp_path / "a", b"A"))
    killed_halfway(store, "brie", tmp_path)
    assert store.versions("brie") == ["v1"] and store.current("brie") == "v1"
    assert store.collect_garbage(min_age_s=3600) == []  # it may be a publish still running
    location = str(store.root) if hasattr(store, "root") else store.url
    endpoint = [] if hasattr(store, "root") else ["--s3-endpoint-url", store._client.meta.endpoint_url]
    assert trainer(["gc", "--store", location, "--min-age", "0", *endpoint]) == 0
    assert "1 leftovers of killed publishes removed" in capsys.readouterr().out
    assert store.versions("brie") == ["v1"] and files_of(store.get("brie").path) == files_of(tmp_path / "a")
    assert store.publish("brie", adapter(tmp_path / "b", b"B")).version in ("v2", "v3")


def killed_halfway(store, name: str, tmp_path: Path) -> None:
    """What a publisher killed after its first file leaves behind."""
    if hasattr(store, "root"):
        leftover = store.root / name / ".tmp-killed"
        leftover.mkdir()
        (leftover / "adapter_config.json").write_text("{}")
        return
    client, bucket = store._client, store.location.bucket
    client.put_object(Bucket=bucket, Key=store.location.key(name, "v2", ".claim"), Body=b"killed")
    client.put_object(Bucket=bucket, Key=store.location.key(name, "v2", "adapter_config.json"), Body=b"{}")


@pytest.mark.parametrize("location", ["gs://bucket/x", "http://example.com/store", "s3://", "file:///tmp/x",
                                      "s3:/bucket-mangled-by-a-path"])
def test_a_location_of_another_kind_is_refused_never_made_a_directory(location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidRequest, match="give a directory or s3://"):
        open_store(location)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what only the object store does


@pytest.fixture
def bucket_store(s3, tmp_path):
    bucket = s3.bucket()
    options = ObjectStoreOptions(endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache")
    return open_store(f"s3://{bucket}/p", options), bucket, options


def test_a_version_is_downloaded_once_and_served_from_the_cache_after(s3, bucket_store, tmp_path):
    store, bucket, options = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    first = store.get("cheese", "v1")
    calls = []
    again = open_store(store.url, options)  # a restarted replica with the same cache
    for client in (store._client, store._failing_fast, again._client, again._failing_fast):
        client.meta.events.register("before-call.s3.GetObject", lambda **kw: calls.append(kw))
    assert again.get("cheese", "v1").path == first.path and store.get("cheese", "v1").path == first.path
    assert calls == []  # immutable versions: nothing fetched again


def test_an_unchanged_current_is_not_downloaded_again(bucket_store, tmp_path):
    store, _, _ = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    statuses = []
    for client in {store._client, store._failing_fast}:  # a poll is one attempt, on the client without retries
        client.meta.events.register("after-call.s3.GetObject",
                                    lambda http_response, **kw: statuses.append(http_response.status_code))
    for _ in range(3):
        assert store.current("cheese") == "v1"
    assert statuses == [200, 304, 304]  # read once; each poll since costs a 304


@pytest.mark.parametrize("damage", ["truncated", "same size, other bytes", "size beyond the model's largest"])
def test_a_damaged_object_is_refused_and_nothing_is_cached(bucket_store, tmp_path, damage):
    store, bucket, options = bucket_store
    source = adapter(tmp_path / "a", b"A")
    store.publish("cheese", source)
    key = store.location.key("cheese", "v1", "adapter_model.safetensors")
    data = (source / "adapter_model.safetensors").read_bytes()
    reader = open_store(store.url, ObjectStoreOptions(endpoint_url=options.endpoint_url, cache_dir=tmp_path / "other",
                                                      max_object_bytes=len(data) - 1 if "beyond" in damage else None))
    if damage == "truncated":
        store._client.put_object(Bucket=bucket, Key=key, Body=data[:-100])
    elif damage.startswith("same size"):
        store._client.put_object(Bucket=bucket, Key=key, Body=b"B" * len(data))
    with pytest.raises(CorruptObject):
        reader.get("cheese", "v1")
    assert not (tmp_path / "other" / "cheese" / "v1").exists()


def test_an_object_that_changes_while_it_is_read_is_refused(bucket_store, tmp_path):
    store, bucket, _ = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    key = store.location.key("cheese", "v1", "adapter_model.safetensors")

    head = store._client.head_object

    def replace_after_head(**kwargs):  # the ETag HEAD saw is no longer the object's when it is read
        reply = head(**kwargs)
        if kwargs["Key"] == key:
            boto3.client("s3", endpoint_url=store._client.meta.endpoint_url).put_object(Bucket=bucket, Key=key,
                                                                                       Body=b"C" * 4096)
        return reply

    store._client.head_object = replace_after_head
    with pytest.raises((StoreUnavailable, CorruptObject)):
        store.get("cheese", "v1")
    assert not (Path(store.cache.root) / "cheese" / "v1").exists()


def test_a_server_stopped_mid_download_costs_nothing_and_the_next_try_succeeds(s3, bucket_store, tmp_path, caplog):
    store, _, _ = bucket_store
    source = adapter(tmp_path / "a", b"A")
    store.publish("cheese", source)
    download = store._download
    stopped = []

    def stop_after_first_file(key, destination, expected):
        download(key, destination, expected)
        if not stopped:
            stopped.append(key)
            s3.stop()

    assert store.current("cheese") == "v1"  # what a replica reads first
    store._download = stop_after_first_file
    try:
        with caplog.at_level(logging.WARNING):
            with pytest.raises(StoreUnavailable):
                store.get("cheese", "v1")
            assert store.unreachable is not None and not (store.cache.root / "cheese" / "v1").exists()
            assert store.current("cheese") == "v1"  # the last current read, while the bucket is away
            with pytest.raises(StoreUnavailable):
                store.unload_token("cheese")
        assert caplog.text.count("cannot be reached") == 1  # said once per change, not per call
    finally:
        s3.start()
    assert files_of(store.get("cheese", "v1").path) == files_of(source) and store.unreachable is None


def test_a_bucket_deleted_under_a_reader_leaves_its_cached_versions_serving(s3, bucket_store, tmp_path):
    store, bucket, _ = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    path = store.get("cheese").path
    client = s3.client()
    for item in client.list_objects_v2(Bucket=bucket)["Contents"]:
        client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)
    assert store.current("cheese") == "v1" and store.get("cheese", "v1").path == path
    assert "NoSuchBucket" in store.unreachable
    with pytest.raises(StoreUnavailable):
        store.publish("cheese", tmp_path / "a")


def test_the_cache_keeps_to_its_bytes_least_recently_used_first(s3, tmp_path):
    bucket = s3.bucket()
    one_version = len(b"A" * 4096) + len('{"r": 4}')
    store = open_store(f"s3://{bucket}", ObjectStoreOptions(endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache",
                                                            cache_bytes=int(2.5 * (one_version + 600))))
    for i in range(4):
        store.publish("cheese", adapter(tmp_path / f"s{i}", bytes([65 + i])))
    store.get("cheese", "v1"), store.get("cheese", "v2")
    store.get("cheese", "v1")  # v1 used again: v2 is now the least recently used
    store.get("cheese", "v3")
    cached = sorted(p.name for p in (tmp_path / "cache" / "cheese").iterdir() if p.is_dir())
    assert cached == ["v1", "v3"]
    shutil.rmtree(tmp_path / "cache" / "cheese" / "v3" )
    assert files_of(store.get("cheese", "v3").path) == files_of(tmp_path / "s2")  # fetched again when needed


def test_the_commands_refuse_a_store_url_they_cannot_open_before_any_work(tmp_path, monkeypatch, capsys, llama_dir):
    from server.serving.main import parse_args
    from trainer.cli import main as trainer

    monkeypatch.chdir(tmp_path)
    source = adapter(tmp_path / "a", b"A")
    assert trainer(["publish", str(source), "--name", "cheese", "--store", "gs://bucket/x"]) == 2
    assert "give a directory or s3://" in capsys.readouterr().err
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    assert trainer(["fit", "--base", str(llama_dir), "--data", str(data), "--name", "cheese",
                    "--store", "http://example.com/store"]) == 2
    assert "--store http://example.com/store: not a store location" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        parse_args(["--adapters", "gs://bucket/x"], environ={})
    assert info.value.code == 2 and "give a directory or s3://" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "data.jsonl"]  # no "gs:" or "http:" directory
    config = parse_args(["--adapters", "s3://bucket/team", "--s3-endpoint-url", "http://minio:9000",
                         "--adapter-cache-dir", str(tmp_path / "cache")], environ={})
    assert config.adapters.store == "s3://bucket/team" and config.adapters.s3_endpoint_url == "http://minio:9000"


def test_wrong_credentials_keep_the_cached_versions_serving_and_a_publish_publishes_nothing(
        s3, bucket_store, tmp_path, monkeypatch, capsys, llama_dir, peft_adapters):
    import moto.settings

    from trainer.cli import main as trainer

    store, bucket, _ = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    assert store.current("cheese") == "v1"
    path = store.get("cheese").path
    before = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from now on moto checks every key
    assert store.current("cheese") == "v1" and store.get("cheese", "v1").path == path
    assert "InvalidAccessKeyId" in store.unreachable
    assert trainer(["publish", str(peft_adapters["cheese"]), "--base", str(llama_dir), "--name", "cheese",
                    "--store", store.url, "--s3-endpoint-url", s3.endpoint, "--prompt", "Brie"]) == 2
    assert "cannot be reached (InvalidAccessKeyId" in capsys.readouterr().err
    monkeypatch.undo()
    assert sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]) == before
    assert store.current("cheese") == "v1" and store.unreachable is None


def test_a_publish_that_fails_midway_leaves_current_and_the_versions_as_they_were(bucket_store, tmp_path):
    store, _, _ = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    upload = store._upload

    def fail_on_the_weights(path, key, expected):
        if key.endswith("adapter_model.safetensors"):
            raise StoreUnavailable("the connection dropped")
        upload(path, key, expected)

    store._upload = fail_on_the_weights
    with pytest.raises(StoreUnavailable):
        store.publish("cheese", adapter(tmp_path / "b", b"B"))
    assert store.current("cheese") == "v1" and store.versions("cheese") == ["v1"]
    assert files_of(store.get("cheese").path) == files_of(tmp_path / "a")


def test_a_watcher_poll_costs_requests_per_served_name_not_per_file(s3, tmp_path, caplog):
    """200 adapters in the bucket, all served: one poll is two conditional GETs a name (current,
    unload), counted at the S3 server, whatever the number of files and versions."""
    from types import SimpleNamespace

    from server.adapters.watcher import StoreWatcher

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    bucket = s3.bucket()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]  # the server's own state: filled without 2,000 PUTs
    names = [f"adapter-{i:03d}" for i in range(200)]
    for name in names:  # as publishes leave them: three versions of three files each, and current
        for version in ("v1", "v2", "v3"):
            for file in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
                backend.put_object(bucket, f"p/{name}/{version}/{file}", b"{}")
        backend.put_object(bucket, f"p/{name}/current", b"v3\n")
    store = open_store(f"s3://{bucket}/p", ObjectStoreOptions(endpoint_url=s3.endpoint, cache_dir=tmp_path / "cache"))
    manager = SimpleNamespace(serves=lambda name: True, load=lambda ref: pytest.fail(f"loaded {ref}"))
    watcher = StoreWatcher(store, manager, poll_interval_s=3600)
    for name in names:
        watcher.first_use(name, store.current(name), store.unload_token(name))
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        watcher.poll()
    requests = [re.search(r"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1.1\S*\" (\d+)", r.getMessage())
                for r in caplog.records if r.name == "werkzeug"]
    requests = [r.groups() for r in requests if r]
    assert len(requests) == 2 * len(names)
    assert all(method == "GET" and path.rsplit("/", 1)[1] in ("current", "unload") for method, path, _ in requests)
    assert sum(status == "304" for *_, status in requests) == len(names)  # current unchanged; no unload (404)


def test_the_endpoint_can_come_from_the_standard_aws_environment(s3, tmp_path, monkeypatch):
    bucket = s3.bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # no --s3-endpoint-url: boto3's chain finds it
    store = open_store(f"s3://{bucket}/team", ObjectStoreOptions(cache_dir=tmp_path / "cache"))
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    assert files_of(store.get("cheese").path) == files_of(tmp_path / "a")
    assert "team/cheese/current" in [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]


def test_a_version_missing_a_file_is_refused_once_then_without_a_download_and_current_never_goes_back(
        bucket_store, tmp_path):
    store, bucket, _ = bucket_store
    store.publish("cheese", adapter(tmp_path / "a", b"A"))
    store.publish("cheese", adapter(tmp_path / "b", b"B"))
    store._client.delete_object(Bucket=bucket, Key=store.location.key("cheese", "v2", "adapter_model.safetensors"))
    with pytest.raises(CorruptObject, match="missing"):
        store.get("cheese", "v2")
    heads = []
    store._client.meta.events.register("before-call.s3.HeadObject", lambda **kw: heads.append(kw))
    with pytest.raises(CorruptObject):
        store.get("cheese", "v2")  # the same manifest: refused without touching the files again
    assert heads == []
    store._advance_current("cheese", "v1")  # a slower publisher of an older number
    assert store.current("cheese") == "v2"
    with pytest.raises(InvalidRequest, match="pointer"):
        store.publish("cheese", tmp_path / "a", version="current")
