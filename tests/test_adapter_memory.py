"""An invalid adapter costs the server nothing to refuse, whatever size it claims: its file is
judged by its size and safetensors header before any tensor is read (server/lora/peft_files.py).
A real server in a subprocess is asked for invalid adapters (sparse files: they cost the test no
disk) — one at a time, 8 at once, through the store and LoadAdapter(path=) — and its peak RSS
(VmHWM) barely moves. Half are 800 MB, beyond the largest LoRA the server could take; the other
half are 68 MB, within it at the server's --max-rank 4096, and refused by their header alone."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from clients import Client
from clients.client import FailedPrecondition
from server.adapters.store import AdapterStore

HUGE = 200_000_000  # float32s: 800 MB, beyond any LoRA of the tiny model at rank <= 4096 (74 MB)
LARGE = 17_000_000  # float32s: 68 MB, within that bound


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_sparse(path: Path, header: dict, data: bytes, total_data: int) -> None:
    """A safetensors file whose data region is `data` then a hole up to `total_data` bytes."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)
        f.truncate(8 + len(encoded) + total_data)


def bad_adapter(good: Path, out: Path, how: str) -> Path:
    """`extra`: the good adapter's tensors plus one 68 MB tensor no LoRA module takes; `padded`: its
    tensors, then 800 MB of nothing after them."""
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    header, data = safetensors_parts(good / "adapter_model.safetensors")
    header.pop("__metadata__", None)
    floats = LARGE if how == "extra" else HUGE
    if how == "extra":
        header["base_model.model.lm_head.extra.weight"] = {"dtype": "F32", "shape": [floats],
                                                           "data_offsets": [len(data), len(data) + 4 * floats]}
    write_sparse(out / "adapter_model.safetensors", header, data, len(data) + 4 * floats)
    assert (out / "adapter_model.safetensors").stat().st_size > 4 * floats
    return out


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_refusing_huge_adapters_costs_no_memory(llama_dir, peft_adapters, tmp_path):
    store = AdapterStore(tmp_path / "store")
    good = peft_adapters["cheese"]
    store.publish("cheese", good)
    for i in range(16):  # published small, then replaced in place: as another tool might write a version
        version = store.publish(f"bad{i}", good)
        bad = bad_adapter(good, tmp_path / f"bad{i}", "extra" if i % 2 else "padded")
        os.replace(bad / "adapter_model.safetensors", version.path / "adapter_model.safetensors")
    by_path = bad_adapter(good, tmp_path / "allowed" / "by-path", "padded")
    token = tmp_path / "token"
    token.write_text("tok\n")
    server = subprocess.Popen(
        [f"{os.path.dirname(sys.executable)}/hotlora-server", "--model", str(llama_dir), "--adapters", str(store.root),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--max-seq-len", "64", "--max-rank", "4096", "--max-adapters", "1",
         "--admin-token-file", str(token), "--adapter-path-allow", str(tmp_path / "allowed"), "--grace-period", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if match := re.search(r"ready: grpc port (\d+)", line):
                break
        with Client(f"127.0.0.1:{match[1]}", admin_token="tok") as client:
            client.generate([1, 2, 3], "cheese", max_new_tokens=2)  # a good adapter read and served first
            baseline = peak_rss_mb(server.pid)

            def refused(name: str) -> None:
                with pytest.raises(FailedPrecondition, match="not read|no supported LoRA module"):
                    client.generate([1, 2, 3], name, max_new_tokens=2)

            for i in range(8):
                refused(f"bad{i}")
            one_at_a_time = peak_rss_mb(server.pid)
            errors = []
            threads = [threading.Thread(target=lambda i=i: _collect(errors, refused, f"bad{i}")) for i in range(8, 16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not errors, errors
            with pytest.raises(FailedPrecondition, match="not read"):
                client.load_adapter("by-path", path=str(by_path))
            at_once = peak_rss_mb(server.pid)
            assert client.generate([1, 2, 3], "cheese", max_new_tokens=2).usage.completion_tokens == 2  # still serving
    finally:
        server.kill()
        server.wait(30)
    print(f"peak RSS: {baseline:.0f} MB after a good adapter, {one_at_a_time:.0f} MB after 8 refused 68-800 MB "
          f"adapters one at a time, {at_once:.0f} MB after 8 at once and one by path")
    assert one_at_a_time - baseline < 50 and at_once - baseline < 50


def _collect(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001  reported by the test thread
        errors.append(repr(exc))
