"""The docs cannot drift from the code: in every Markdown file of the repository, each `--flag`
written after `hotlora-server`, `trainer` or `hotlora` (in a code block or a code span) exists in
that command's parser, each `hotlora_*` metric exists in a running server's registry, and each
relative link resolves."""

from __future__ import annotations

import argparse
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = re.compile(r"(?:^|[\s/(`])(hotlora-server|trainer|hotlora)(?=\s|$)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
METRIC = re.compile(r"\bhotlora_[a-z0-9_]*[a-z0-9]")


def markdown_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).exists()]


def code_segments(text: str) -> list[str]:
    """Fenced and indented code lines (comments cut, backslash continuations joined), then the
    code spans of the prose; each split where one shell command ends and another begins."""
    segments, fenced, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            line = pending + re.sub(r"\s#\s.*$", "", line)
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            segments.append(line)
        else:
            segments.extend(re.findall(r"`([^`]+)`", line))
    return [part for segment in segments for part in re.split(r"&&|;|\s&\s|\s&$|\s\|\s(?!--)", segment)]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand under `parser`, at any depth, by name."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update(subcommands(sub))
    return found


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    from clients.cli import _parser as client_parser
    from server.model.factory import build_parser as make_model_parser
    from server.serving.main import build_parser as server_parser
    from trainer.cli import build_parser as trainer_parser

    server = server_parser({})
    server.add_subparsers().add_parser("make-model", parents=[make_model_parser()], add_help=False)
    return {"hotlora-server": server, "trainer": trainer_parser(), "hotlora": client_parser()}


def flags_named(segment: str, parsers: dict[str, argparse.ArgumentParser]) -> list[tuple[str, str, set[str]]]:
    """(program, flag, the flags that program takes there) for each flag after a program's name:
    the program's own, and those of every subcommand the segment names."""
    found = []
    for match in PROGRAM.finditer(segment):
        program, rest = match.group(1), segment[match.end():]
        words = rest.split()
        if not words:
            continue
        parser = parsers[program]
        tree = subcommands(parser)
        if program != "hotlora-server" and words[0] not in tree and not words[0].startswith("-"):
            continue  # prose that happens to say "trainer" or "hotlora"
        valid = set(parser._option_string_actions)
        for word in words:
            if word.strip("[]()|") in tree:
                valid |= set(tree[word.strip("[]()|")]._option_string_actions)
        rest = PROGRAM.split(rest, maxsplit=1)[0]  # up to the next program's name
        found.extend((program, flag, valid) for flag in FLAG.findall(rest))
    return found


def test_every_flag_the_docs_give_a_command_exists_in_its_parser():
    parsers = command_parsers()
    unknown, checked = [], 0
    for path in markdown_files():
        for segment in code_segments(path.read_text()):
            for program, flag, valid in flags_named(segment, parsers):
                checked += 1
                if flag not in valid:
                    unknown.append(f"{path.relative_to(ROOT)}: {program} ... {flag}")
    assert checked > 50  # the docs do name flags: the scan found them (100 today)
    assert not unknown, "\n".join(unknown)


def test_a_renamed_flag_is_caught():
    parsers = command_parsers()
    segments = code_segments("Serve it:\n\n    hotlora-server --adapters s --max-seq-length 256\n\n"
                             "then `trainer fit --data d.jsonl --lr-schedule cosine` and `hotlora adapters load x --versoin v1`")
    named = [(program, flag) for segment in segments for program, flag, valid in flags_named(segment, parsers)
             if flag not in valid]
    assert named == [("hotlora-server", "--max-seq-length"), ("trainer", "--lr-schedule"), ("hotlora", "--versoin")]


@pytest.fixture(scope="module")
def exposed_metrics(llama_dir) -> set[str]:
    """Every name a running server exposes on /metrics: families, their samples' names, and the
    suffixes Prometheus gives them."""
    from server.config import EngineConfig, ServerConfig
    from tests.helpers import RunningServer

    config = ServerConfig(model_dir=llama_dir, host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0,
                          http_port=0, engine=EngineConfig(max_batch_size=2, max_seq_len=64))
    with RunningServer(config) as running:
        with urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
    names = set(METRIC.findall(text))
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}.get(kind, ())
        names |= {family + suffix for suffix in suffixes}
    return names


def test_every_metric_the_docs_name_exists(exposed_metrics):
    assert {"hotlora_requests_total", "hotlora_engine_info"} <= exposed_metrics
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in markdown_files()
               for name in sorted(set(METRIC.findall(path.read_text()))) if name not in exposed_metrics]
    assert not missing, "\n".join(missing)
    assert "hotlora_request_duration" not in exposed_metrics  # a shortened name would be caught


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for path in markdown_files():
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page
            checked += 1
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert checked > 5
    assert not broken, "\n".join(broken)
