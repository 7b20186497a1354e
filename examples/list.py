"""Persistent lists: push, prepend, indexing, slicing, in-place updates, pop and deque."""
import os
import tempfile

from beaver import BeaverDB


def main(path):
    with BeaverDB(path) as db:
        tasks = db.list("project_tasks")
        tasks.push({"id": "task-002", "desc": "Write documentation"})
        tasks.push({"id": "task-003", "desc": "Deploy to production"})
        tasks.prepend({"id": "task-001", "desc": "Design the feature"})
        for task in tasks:
            print(f"  - {task['id']}: {task['desc']}")
        print("first:", tasks[0]["id"], "| last:", tasks[-1]["id"])
        print("first two:", [t["id"] for t in tasks[0:2]])

        tasks[1] = {"id": "task-002", "desc": "Write and review documentation"}
        del tasks[0]
        print("after update and delete:", [t["desc"] for t in tasks])

        numbers = db.list("numbers")
        numbers.extend(range(10))
        print("every other:", numbers[::2], "| reversed slice:", numbers[7:2:-2])
        numbers[2:5] = ["a", "b"]                     # slice assignment
        del numbers[::3]                              # slice deletion with a step
        numbers.insert(-1, "before last")             # Python's insert semantics
        print("numbers:", list(numbers))
        print("pop:", numbers.pop(), "| deque:", numbers.deque(), "| len:", len(numbers))
        numbers.clear()
        print("pop on empty:", numbers.pop())         # None, like the deque method


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "list.db"))
