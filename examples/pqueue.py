"""A persistent priority queue: lower numbers first, first-in first-out among equals."""
import os
import tempfile

from beaver import BeaverDB, QueueEmpty


def main(path):
    with BeaverDB(path) as db:
        tasks = db.queue("agent_tasks")
        tasks.put({"action": "summarize_news", "topic": "AI"}, priority=10)
        tasks.put({"action": "respond_to_user", "user_id": "alice"}, priority=1)
        tasks.put({"action": "run_backup", "target": "all"}, priority=20)
        tasks.put({"action": "send_alert", "message": "CPU at 90%"}, priority=1)

        print(f"{len(tasks)} tasks; next up: {tasks.peek().data['action']}")
        print("in order:", [item.data["action"] for item in tasks])   # nothing removed

        while True:
            try:
                item = tasks.get(block=False)
            except QueueEmpty:                         # also an IndexError
                break
            print(f"  priority {item.priority}: {item.data['action']}")

        try:
            tasks.get(timeout=0.1)                     # blocks, then gives up
        except TimeoutError:
            print("no task arrived within 0.1s")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "pqueue.db"))
