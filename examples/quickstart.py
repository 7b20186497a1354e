"""The guide's quickstart: a dict, a list and a fuzzy-searchable collection in one file."""
import os
import tempfile

from beaver import BeaverDB, Document


def main(path):
    # This creates a single file "my_data.db" if it doesn't exist
    # and sets it up for safe, concurrent access.
    db = BeaverDB(path)

    # This is perfect for storing app configuration or user settings.
    config = db.dict("app_config")
    config["theme"] = "dark"
    config["user_id"] = 123
    print(f"App theme is: {config['theme']}")

    # This is great for a to-do list, a job queue, or a chat history.
    tasks = db.list("daily_tasks")
    tasks.push({"id": "task-001", "desc": "Write project report"})
    tasks.push({"id": "task-002", "desc": "Deploy new feature"})
    print(f"First task is: {tasks[0]['desc']}")

    # This is the most powerful feature, combining data and search.
    articles = db.collection("articles")
    doc = Document(
        id="sqlite-001",
        body="SQLite is a powerful embedded database ideal for local apps."
    )
    articles.index(doc, fts=True, fuzzy=True)

    # Note the typo in "datbase"
    results = articles.match(query="datbase", fuzziness=1)
    top_doc, rank = results[0]
    print(f"Search found: '{top_doc.body}' (Score: {rank:.2f})")
    db.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "my_data.db"))
