"""The .proto files are the source of truth: the committed stubs are what protoc generates from
them, every message, field, enum value, service and method carries a comment, and every enum's
zero value is *_UNSPECIFIED."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos/hotlora/v1").glob("*.proto"))


def protoc(*args):
    from grpc_tools import protoc as grpc_protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    code = grpc_protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", *args, *[str(p.relative_to(ROOT)) for p in PROTOS]])
    assert code == 0


def test_committed_stubs_are_up_to_date(tmp_path):
    protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    generated = sorted((tmp_path / "protos/hotlora/v1").iterdir())
    assert generated
    for file in generated:
        committed = ROOT / "protos/hotlora/v1" / file.name
        assert committed.read_text() == file.read_text(), f"{committed.name} is stale: run `make protos`"


def test_the_stubs_need_no_newer_runtime_than_the_project_requires():
    """Generated stubs refuse to import under an older grpcio / protobuf than their generator's
    (GRPC_GENERATED_VERSION, ValidateProtobufRuntimeVersion), so the generator is pinned to the
    runtime floors: a newer grpcio-tools would write stubs that break installs the project allows."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]

    def pinned(name: str, operator: str) -> str:
        found = [r for r in requirements if re.match(rf"{name}\s*{operator}", r)]
        assert len(found) == 1, f"{name}{operator}... in pyproject.toml"
        return re.match(rf"{name}\s*{operator}\s*([\d.]+)", found[0]).group(1)

    grpc_floor, protobuf_floor = pinned("grpcio", ">="), pinned("protobuf", ">=")
    assert pinned("grpcio-tools", "==") == grpc_floor
    for stub in (ROOT / "protos/hotlora/v1").glob("*_pb2_grpc.py"):
        assert f"GRPC_GENERATED_VERSION = '{grpc_floor}'" in stub.read_text(), stub.name
    for stub in (ROOT / "protos/hotlora/v1").glob("*_pb2.py"):
        version = re.search(r"Domain.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", stub.read_text()).groups()
        assert ".".join(version) == protobuf_floor, stub.name


def test_every_element_is_documented_and_enums_start_unspecified(tmp_path):
    from google.protobuf import descriptor_pb2

    protoc(f"--descriptor_set_out={tmp_path / 'set.pb'}", "--include_source_info")
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes()).file
    undocumented = []
    for file in files:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}

        def check(path, name):
            if not comments.get(tuple(path)):
                undocumented.append(f"{file.name}: {name}")

        for i, message in enumerate(file.message_type):
            check([4, i], message.name)
            for j, field in enumerate(message.field):
                check([4, i, 2, j], f"{message.name}.{field.name}")
        for i, enum in enumerate(file.enum_type):
            check([5, i], enum.name)
            assert enum.value[0].number == 0 and enum.value[0].name.endswith("_UNSPECIFIED"), enum.name
            for j, value in enumerate(enum.value):
                check([5, i, 2, j], value.name)
        for i, service in enumerate(file.service):
            check([6, i], service.name)
            for j, method in enumerate(service.method):
                check([6, i, 2, j], f"{service.name}.{method.name}")
    assert not undocumented, undocumented


@pytest.mark.parametrize("service", ["Generation", "Adapters"])
def test_stubs_import_as_a_package_with_a_stub_and_servicer_per_service(service):
    import importlib

    module = importlib.import_module(f"protos.hotlora.v1.{service.lower()}_pb2_grpc")
    messages = importlib.import_module(f"protos.hotlora.v1.{service.lower()}_pb2")
    methods = [m.name for m in messages.DESCRIPTOR.services_by_name[service].methods]
    assert methods and all(callable(getattr(getattr(module, f"{service}Servicer"), m)) for m in methods)
    assert callable(getattr(module, f"add_{service}Servicer_to_server")) and isinstance(getattr(module, f"{service}Stub"), type)
