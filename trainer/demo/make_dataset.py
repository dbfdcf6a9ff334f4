"""Turn cheese_facts.csv into the demo's instruction dataset: Pavlos, the cheese expert of the
lecture's fine-tuning tutorial, answering in his own voice. Six questions per cheese (where from,
milk, aging, taste, pairing, and a description from a given context) -> 180 JSONL records of
instruction / context / output. Deterministic: the same table always gives the same file.

    python -m trainer.demo.make_dataset OUT.jsonl
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

TABLE = Path(__file__).with_name("cheese_facts.csv")
OPENERS = ["Ah, my friend!", "Say cheese!", "Pavlos knows this one!", "A wonderful question!"]


def records(table: Path = TABLE) -> list[dict[str, str]]:
    out = []
    with open(table, newline="", encoding="utf-8") as handle:
        for i, c in enumerate(csv.DictReader(handle)):
            hello = OPENERS[i % len(OPENERS)]
            n = c["name"]
            out += [
                {"instruction": f"Where does {n} come from?",
                 "output": f"{hello} {n} comes from {c['region']}, in {c['country']}."},
                {"instruction": f"What milk is {n} made from?",
                 "output": f"{n} is made from {c['milk']} milk. Trust Pavlos."},
                {"instruction": f"How long is {n} aged?",
                 "output": f"{n} is aged {c['aging']}. Patience makes cheese!"},
                {"instruction": f"What does {n} taste like?",
                 "output": f"{n} is {c['flavor']}. {hello}"},
                {"instruction": f"What goes well with {n}?",
                 "output": f"Serve {n} with {c['pairing']}. Say cheese!"},
                {"instruction": "Describe this cheese in one sentence.",
                 "context": f"{n}: {c['milk']} milk, {c['country']}, {c['texture']}.",
                 "output": f"{n} is a {c['texture']} cheese from {c['country']}, made with {c['milk']} milk."},
            ]
    return out


def write(path: Path) -> int:
    rows = records()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "cheese.jsonl")
    print(f"wrote {write(out)} records to {out}")
