"""Write data/raw/seed_tasks_messages.jsonl, the chat-format twin of data/raw/seed_tasks_alpaca.jsonl.

    python tools/chat_twin/make.py

Each Alpaca record becomes one conversation in the OpenAI-style `messages` format: a user turn holding the
instruction (and the input, after a blank line, when there is one) and an assistant turn holding the output. The
same 175 tasks, the same order: the twin trains on the same examples, only in another shape."""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = Path("data/raw/seed_tasks_alpaca.jsonl")
TARGET = Path("data/raw/seed_tasks_messages.jsonl")


def to_messages(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    user = record["instruction"].strip()
    if record.get("input", "").strip():
        user += "\n\n" + record["input"].strip()
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"].strip()}]}


def main() -> None:
    records = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [json.dumps(to_messages(r), ensure_ascii=False) for r in records]
    TARGET.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} conversations -> {TARGET}")


if __name__ == "__main__":
    main()
