"""`make demo`: the whole product on one CPU, in a few minutes, with nothing downloaded.

1. build a small base model with random weights (and a tokenizer trained on the cheese texts),
2. write the cheese-expert dataset from the committed table,
3. `trainer fit` a LoRA adapter with QLoRA and publish it to an adapter store (cheese@v1),
4. start `hotlora-server` on that store and ask questions without and with the adapter,
5. train and publish cheese@v2 while the server runs; the server serves it with no restart,
6. stop the server with SIGTERM (it drains and exits).

Every step runs the real command-line tools as subprocesses, exactly as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .make_dataset import write as write_dataset

BIN = Path(sys.executable).parent
QUESTIONS = ["Where does Gouda come from?", "What goes well with Roquefort?", "How long is Manchego aged?",
             "What milk is Halloumi made from?"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


class DemoFailed(Exception):
    """A step failed; the message says which and why (the step's own output is above it)."""


def run(*command: str) -> None:
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise DemoFailed(f"`{Path(command[0]).name} {command[1]}` exited with code {code}; its output is above")


def fit(work: Path, data: Path, seed: int, epochs: int, notify: str | None = None) -> None:
    command = [str(BIN / "trainer"), "fit", "--base", str(work / "base"), "--data", str(data), "--name", "cheese",
               "--store", str(work / "store"), "--output-dir", str(work / f"run-seed{seed}"), "--seed", str(seed),
               "--epochs", str(epochs), "--max-seq-len", "128", "--batch-size", "8", "--learning-rate", "5e-3",
               "--eval-every", "25", "--checkpoint-every", "50"]
    if notify:
        command += ["--notify", notify]
    run(*command)


def ask(client, adapter: str) -> list[str]:
    answers = []
    for question in QUESTIONS:
        result = client.generate([{"role": "user", "content": question}], adapter=adapter, max_new_tokens=40,
                                 temperature=0.0)
        answers.append(result.text.strip().replace("\n", " ") or "(nothing)")
    return answers


def show(columns: dict[str, list[str]]) -> None:
    width = 38
    names = list(columns)
    print("".join(f"{'question':<34}") + "".join(f"| {n:<{width}}" for n in names))
    for i, question in enumerate(QUESTIONS):
        cells = [textwrap.wrap(columns[n][i], width, max_lines=3, placeholder=" ...") or [""] for n in names]
        lines = max(len(c) for c in cells)
        for line in range(lines):
            q = question if line == 0 else ""
            print(f"{q:<34}" + "".join(f"| {(c[line] if line < len(c) else ''):<{width}}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-work"))
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    say("1. The dataset: a cheese expert (Pavlos, from the lecture's tutorial), from trainer/demo/cheese_facts.csv")
    data = work / "cheese.jsonl"
    print(f"{write_dataset(data)} instruction/output records in {data}; e.g.\n  {data.read_text().splitlines()[0]}")

    say("2. A base model with RANDOM weights (nothing is downloaded here): its own answers are gibberish")
    corpus = "\n".join(" ".join(json.loads(line).values()) for line in data.read_text().splitlines())
    (work / "corpus.txt").write_text(corpus)
    run(str(BIN / "hotlora-server"), "make-model", str(work / "base"), "--preset", "small", "--seed", "0",
        "--corpus", str(work / "corpus.txt"))

    say("3. trainer fit: QLoRA (NF4 + double quantization, paged AdamW, gradient checkpointing) -> cheese@v1")
    fit(work, data, seed=1, epochs=args.epochs)

    say("4. hotlora-server on the store; the same questions without and with the adapter")
    server = subprocess.Popen([str(BIN / "hotlora-server"), "--model", str(work / "base"), "--adapters", str(work / "store"),
                               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--max-seq-len", "256",
                               "--store-poll-interval", "1", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = None
        for line in server.stdout:
            print(line, end="")
            if match := re.search(r"ready: grpc port (\d+), metrics port (\d+)", line):
                port = match[1]
                break
        if port is None:
            raise DemoFailed(f"hotlora-server did not start (exit code {server.wait(timeout=30)}); its output is above")
        target = f"127.0.0.1:{port}"
        from clients import Client

        with Client(target) as client:
            show({"base model (random weights)": ask(client, ""), "with cheese@v1": ask(client, "cheese")})

            say("5. cheese@v2: a quick run (another seed, a third of the epochs: visibly less trained), published "
                "while the server runs (--notify); new requests get it, no restart")
            fit(work, data, seed=2, epochs=max(3, args.epochs // 3), notify=target)
            version = client.get_adapter("cheese").version
            show({"cheese@v1 (pinned)": ask(client, "cheese@v1"), f"cheese -> now {version}": ask(client, "cheese")})
            print(f"\nno restart: the server (pid {server.pid}) has served v1 and {version}; `hotlora adapters list`:")
            for a in client.list_adapters():
                print(f"  {a.name}@{a.version:<4} current={a.current!s:<5} tier={a.tier:<5} rank={a.rank} hash={a.content_hash[:12]}")

        say("6. SIGTERM: health goes NOT_SERVING, running requests finish, the server exits")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"hotlora-server exited with code {code}")
    finally:
        if server.poll() is None:
            server.kill()
    print(f"\nEverything is in {work}/: base/ (the model), store/ (the adapter store), run-seed*/ (checkpoints, "
          f"TensorBoard logs: tensorboard --logdir {work})")
    return 0


def run_and_report(argv: list[str] | None = None) -> int:
    """main(), ending in one line that says what failed instead of a traceback."""
    from clients import HotloraClientError

    start = time.time()
    try:
        code = main(argv)
    except DemoFailed as exc:
        print(f"\nmake demo failed: {exc}", file=sys.stderr)
        return 1
    except HotloraClientError as exc:
        print(f"\nmake demo failed: the server answered {exc.code.name}: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"\nmake demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmake demo interrupted", file=sys.stderr)
        return 130
    print(f"demo finished in {time.time() - start:.0f}s")
    return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_and_report())
