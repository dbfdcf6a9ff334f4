"""From a trained (or foreign) PEFT adapter to a published store version: acceptance check,
manifest, atomic publish (server.adapters.store), and optionally asking running servers to load it."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path

import torch

from server.adapters.store import ObjectStoreOptions, StoredVersion, base_fingerprint, open_store

from . import acceptance

log = logging.getLogger(__name__)


def manifest(base_dir: Path, tokenizer, compute_dtype: torch.dtype, report: acceptance.AcceptanceReport,
             extra: dict) -> dict:
    """hotlora's contract for a version (the store format: server/adapters/store.py, docs/ARCHITECTURE.md); `extra` adds training facts."""
    template = tokenizer.chat_template or ""
    return {
        "base_model": str(base_dir),
        "base_fingerprint": base_fingerprint(base_dir),
        "quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                         "compute_dtype": str(compute_dtype).removeprefix("torch.")},
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        # the template itself: servers render this adapter's chats with it, whatever the base has
        "chat_template": template,
        "eos_token_ids": [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [],
        "stop_strings": [tokenizer.eos_token] if tokenizer.eos_token else [],
        "acceptance": report.as_dict(),
        **extra,
    }


def store_of(store: str | Path, endpoint_url: str | None = None):
    """The store at `store`: a directory or s3://bucket/prefix (server/adapters/store.py)."""
    return open_store(store, ObjectStoreOptions(endpoint_url=endpoint_url))


def publish(store: str | Path, name: str, adapter_dir: Path, record: dict, endpoint_url: str | None = None) -> StoredVersion:
    """Publish into the store at `store`: a version, then `current`."""
    stored = store_of(store, endpoint_url).publish(name, adapter_dir, manifest=record)
    log.info("published %s@%s to %s", name, stored.version, store)
    return stored


def endpoints(target: str, resolve=socket.getaddrinfo) -> list[str]:
    """host:port for every address the target's host resolves to: a Kubernetes headless Service
    resolves to each ready pod, so a notify reaches every replica, not one."""
    host, _, port = target.rpartition(":")
    try:
        found = resolve(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return [target]  # let the client report what is wrong with it
    addresses = dict.fromkeys(info[4][0] for info in found)
    if any(":" not in a for a in addresses):  # IPv4 and IPv6 of one host ("localhost") are one server
        addresses = {a: None for a in addresses if ":" not in a}
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses] or [target]


def notify(targets: tuple[str, ...], name: str, version: str, admin_token: str | None,
           resolve=socket.getaddrinfo, tls: bool = False, ca_cert: bytes | None = None) -> list[str]:
    """Ask every server behind each target (every address its name resolves to) to load the
    version now; they would also find it at their next store poll. Returns the endpoints that
    failed; a failure is a warning, never a failed publish. With TLS (tls, or a CA certificate)
    each address must show a certificate for the name it was resolved from."""
    from clients import Client, HotloraClientError

    failed = []
    for given in targets:
        host = given.rpartition(":")[0].strip("[]")
        for target in endpoints(given, resolve):
            try:
                with Client(target, admin_token=admin_token, tls=tls, root_certificates=ca_cert, server_name=host,
                            timeout=60) as client:
                    # the name's current version, not a pin to `version`: a late notify must not
                    # move `current` back past a newer publish
                    loaded = client.load_adapter(name)
                log.info("%s now serves %s@%s (%s)", target, name, loaded.version, loaded.tier)
            except HotloraClientError as exc:
                log.warning("could not notify %s: %s: %s", target, exc.code.name, exc)
                failed.append(target)
    return failed


def check_foreign_adapter(base_dir: Path, adapter_dir: Path, prompts_text: list[str]) -> tuple[acceptance.AcceptanceReport, object]:
    """`trainer publish`: load a PEFT adapter made elsewhere on the NF4 base with transformers +
    peft and run the same acceptance check on a few prompts."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    from server.serving.text import chat_prompt_ids

    from .data import ensure_chat_template
    from .fit import device_and_dtype, load_base

    if not Path(base_dir).is_dir():
        raise acceptance.AcceptanceError(f"--base {base_dir}: no such directory (a Hugging Face checkpoint directory)")
    device, dtype = device_and_dtype()
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    own_template = tokenizer.chat_template  # what the manifest records: this adapter's own is not known here
    ensure_chat_template(tokenizer)  # the acceptance prompts need one
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise acceptance.AcceptanceError(f"{adapter_dir} has no adapter_model.safetensors (pickle adapters are refused)")
    model = PeftModel.from_pretrained(load_base(base_dir, dtype, device), adapter_dir).eval()
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in prompts_text]
    rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
    ranks = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("rank_pattern") or {}
    report = acceptance.check(base_dir, adapter_dir, model, prompts, max([rank, *ranks.values()]))
    tokenizer.chat_template = own_template
    return report, tokenizer
