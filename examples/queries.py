"""Filters, ordering, paging and field indexes on a dict of profiles, a log of requests and a
collection of notes (filtered text and vector search)."""
import os
import random
import tempfile

from beaver import BeaverDB, Document, ValidationError


def main(path):
    rng = random.Random(1)
    with BeaverDB(path) as db:
        users = db.dict("users")
        with db.transaction():
            for i in range(2000):
                users[f"user-{i:04d}"] = {
                    "name": f"User {i}", "age": rng.randrange(18, 90),
                    "address": {"city": rng.choice(["Lima", "Quito", "Oslo", "Porto"])},
                    "tags": rng.sample(["admin", "beta", "staff", "guest"], 2)}
        where = {"address.city": "Oslo", "age": {"$gte": 60}, "tags": {"$contains": "admin"}}
        print("before an index:", users.explain(where=where)["plan"])
        users.create_index("address.city")
        print("with an index on", users.indexes(), ":", users.explain(where=where)["plan"])
        oldest = users.find(where, order_by=["-age", "name"], limit=3)
        for key, user in oldest:
            print(f"  {key}: {user['name']}, {user['age']}, {user['tags']}")
        print("page 2 of the Porto users:",
              [key for key, _ in users.find({"address.city": "Porto"}, limit=5, offset=5)])

        requests = db.log("requests")
        for i in range(500):
            requests.log({"status": rng.choice([200, 200, 404, 500]), "ms": rng.randrange(900)},
                         timestamp=1_700_000_000 + i)
        requests.create_index("status")
        slow_errors = requests.range(where={"status": 500, "ms": {"$gt": 800}}, order="desc",
                                     limit=3)
        print("the last slow errors:", [(e.timestamp.isoformat(), e.data) for e in slow_errors])

        notes = db.collection("notes")
        notes.index_many(Document(id=f"note-{i:03d}", embedding=[rng.random(), rng.random()],
                                  body={"user": f"u{i % 7}", "year": 2020 + i % 6,
                                        "tags": rng.sample(["work", "home", "ai"], 2),
                                        "text": rng.choice(["meeting notes", "grocery list",
                                                            "paper notes"])})
                         for i in range(300))
        notes.create_index("user")
        mine = {"user": "u3", "year": {"$gte": 2024}, "tags": {"$contains": "work"}}
        print("u3's recent work notes:", notes.count(mine), "uses index",
              notes.explain(where=mine)["index"])
        print("  the nearest:", [(d.id, round(distance, 3)) for d, distance in
                                 notes.search([0.5, 0.5], top_k=3, where=mine)])
        print("  about meetings:", [d.id for d, _ in notes.match("meeting", where=mine)][:3])
        try:
            users.find({"age": {"$gt": "sixty", "$between": [1, 2]}})
        except ValidationError as e:
            print("a malformed filter:", e)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "queries.db"))
