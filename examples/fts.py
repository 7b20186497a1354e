"""Full-text search: ranked matches, phrases, OR, exclusions, prefixes and field paths."""
import os
import tempfile

from beaver import BeaverDB, Document

ARTICLES = [
    ("sqlite", "SQLite: the embedded database", "SQLite is a small, fast, self-contained SQL "
     "database engine. It is the most used database engine in the world.", ["database", "c"]),
    ("postgres", "PostgreSQL", "PostgreSQL is a powerful open source object-relational "
     "database server.", ["database", "server"]),
    ("python", "Python", "Python is a programming language that lets you work quickly.",
     ["language"]),
    ("fts5", "FTS5 full-text search", "FTS5 is an SQLite virtual table module that provides "
     "full-text search functionality to database applications.", ["sqlite", "search"]),
]


def show(label, results):
    print(f"{label:38} -> {[(doc.id, round(score, 3)) for doc, score in results]}")


def main(path):
    with BeaverDB(path) as db:
        articles = db.collection("articles")
        articles.index_many(Document(id=key, body={"title": title, "text": text,
                                                   "meta": {"tags": tags}})
                            for key, title, text, tags in ARTICLES)

        show("database", articles.match("database"))
        show("database -server", articles.match("database -server"))
        show('"database engine"', articles.match('"database engine"'))
        show("python OR postgresql", articles.match("python OR postgresql"))
        show("prog* (prefix)", articles.match("prog*"))
        show("sqlite on title only", articles.match("sqlite", on=["title"]))
        show("search in meta.tags", articles.match("search", on=["meta.tags"]))
        show('user text "sqlite-001" AND (', articles.match('"sqlite-001" AND ('))  # never raises
        show("raw FTS5: NEAR(database engine)",
             articles.match("NEAR(database engine)", raw=True))
        for doc, score, snippet in articles.match("database server", highlight=True):
            print(f"  {doc.id}: {' '.join(snippet.split())}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "fts.db"))
