"""Filters, ordering, paging and field indexes on a dict of profiles and a log of requests."""
import os
import random
import tempfile

from beaver import BeaverDB, ValidationError


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
        try:
            users.find({"age": {"$gt": "sixty", "$between": [1, 2]}})
        except ValidationError as e:
            print("a malformed filter:", e)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "queries.db"))
