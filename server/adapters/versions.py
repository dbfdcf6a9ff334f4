"""What the adapter layer names and knows: a reference a request gives ("name" or "name@version"),
parsed once where the request comes in, and the versions the server knows about."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest
from ..lora.peft_files import validate_adapter_name


def version_key(name: str, version: str) -> str:
    """How a version is registered in the engine: "name@version"."""
    return f"{name}@{version}"


@dataclass(frozen=True)
class AdapterRef:
    """An adapter a caller names: its current version (version None) or one version. Made from a
    caller's text by parse() or of(), which validate both parts."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        """'name' -> its current version; 'name@version' -> that version."""
        name, at, version = text.partition("@")
        return cls(validate_adapter_name(name), validate_adapter_name(version) if at else None)

    @classmethod
    def of(cls, name: str, version: str | None = None) -> "AdapterRef":
        """From separate fields (the admin calls' name and version)."""
        return cls(validate_adapter_name(name), validate_adapter_name(version) if version else None)

    def at(self, version: str) -> str:
        """The engine key of `version` of this name."""
        return version_key(self.name, version)

    def __str__(self) -> str:
        return self.name if self.version is None else version_key(self.name, self.version)


@dataclass(frozen=True)
class AdapterVersion:
    """One version the server knows about (in memory or only in the store)."""

    name: str
    version: str
    source: Path | str  # a directory, or an object store's URL for a version not downloaded here
    from_store: bool
    content_hash: str = ""
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    # The chat template it was trained with, from its manifest; None: the base model's. A manifest
    # that records only the template's hash keeps it here, so chat is refused when it is not the base's.
    chat_template: str | None = None
    chat_template_sha256: str | None = None

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)

    def chat_template_for(self, base_template: str | None) -> str | None:
        """The template its chat requests are rendered with: its own, else the base model's when
        that is the one it was trained with. InvalidRequest when that cannot be known (the
        manifest holds only the hash of another template): its prompts are still served."""
        if self.chat_template:
            return self.chat_template
        base_hash = hashlib.sha256((base_template or "").encode()).hexdigest()
        if self.chat_template_sha256 and self.chat_template_sha256 != base_hash:
            raise InvalidRequest(f"{self.key} was trained with a chat template other than the base model's, and its "
                                 "manifest does not hold it: send `prompt` text or `prompt_token_ids` instead")
        return base_template


@dataclass(frozen=True)
class AdapterStatus:
    """A row of ListAdapters."""

    version: AdapterVersion
    current: bool
    tier: str  # "device" (in a LoRA slot) | "host" (validated, in memory) | "store"
    in_flight: int
    last_used: float
