"""Typo-tolerant search: match(query, fuzziness=1 or 2) finds words a few edits away."""
import os
import tempfile

from beaver import BeaverDB, Document

TEXTS = {
    "db": "SQLite is a powerful embedded database ideal for local apps.",
    "py": "Python is a programming language that lets you work quickly.",
    "cat": "The cat sat on the mat.",
    "js": "JavaScript engines are optimized for fast execution.",
}


def main(path):
    with BeaverDB(path) as db:
        notes = db.collection("notes")
        for key, text in TEXTS.items():
            notes.index(Document(id=key, body=text), fuzzy=True)

        for query, fuzziness in [("datbase", 1), ("pyton", 1), ("cta", 1), ("sqlit", 1),
                                 ("progrmaming", 2), ("javascirpt engnes", 1),
                                 ("datbase", 0)]:
            hits = [doc.id for doc, _ in notes.match(query, fuzziness=fuzziness)]
            print(f"{query!r:20} fuzziness={fuzziness}: {hits}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "fuzzy.db"))
