"""The bundled harness task's documents: each held-out record of the eval split (data/subset/eval.jsonl, never trained
on) asks its instruction and offers four answers, its own reference and the references of the next three records of
the split (each cut to its first 300 characters), in a position that cycles with the record's index. Right = the
model finds the answer a person wrote for this instruction likelier than answers written for others."""

from __future__ import annotations

from typing import Any

CHOICES = 4
ANSWER_CHARS = 300  # each answer's first characters (a word boundary): enough to tell answers apart, bounded cost


def _question_and_answer(record: dict[str, Any]) -> tuple[str, str]:
    if "messages" in record:  # a conversation: its first user turn and its last answer
        turns = record["messages"]
        user = next(turn["content"] for turn in turns if turn["role"] == "user")
        return user.strip(), turns[-1]["content"].strip()
    question = record["instruction"].strip()
    if record.get("input", "").strip():
        question += "\n\n" + record["input"].strip()
    return question, record["output"].strip()


def _shortened(answer: str) -> str:
    return answer if len(answer) <= ANSWER_CHARS else answer[:ANSWER_CHARS].rsplit(" ", 1)[0]


def process_docs(dataset: Any) -> Any:
    pairs = [(question, _shortened(answer)) for question, answer in map(_question_and_answer, dataset)]
    if len(pairs) < CHOICES:
        raise ValueError(f"held_out_answers needs at least {CHOICES} eval records, the split has {len(pairs)}")
    docs = []
    for index, (question, answer) in enumerate(pairs):
        others = [pairs[(index + step) % len(pairs)][1] for step in range(1, CHOICES)]
        gold = index % CHOICES
        docs.append({"question": question, "choices": [*others[:gold], answer, *others[gold:]], "gold": gold})
    return dataset.from_list(docs)
