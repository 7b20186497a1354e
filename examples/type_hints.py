"""Typed structures with beaver.Model (zero dependencies; pydantic models work the same)."""
import os
import tempfile
from typing import List, Optional

from beaver import BeaverDB, Model


class Address(Model):
    city: str
    country: str = "EC"


class User(Model):
    name: str
    email: str
    roles: List[str] = []
    address: Optional[Address] = None


def main(path):
    with BeaverDB(path) as db:
        users = db.dict("users", model=User)
        users["alice"] = User(name="Alice", email="alice@example.com",
                              address=Address(city="Quito"))
        users["bob"] = {"name": "Bob", "email": "bob@example.com"}   # validated too
        alice = users["alice"]                      # a User again, nested Address included
        print(f"{alice.name} lives in {alice.address.city}; roles={alice.roles}")

        try:
            users["eve"] = {"name": "Eve"}          # missing email
        except ValueError as e:
            print("rejected:", e)
        print("stored users:", sorted(users))

        inbox = db.queue("inbox", model=User)
        inbox.put(users["bob"], priority=1)
        print("queued:", inbox.get().data)

        team = db.list("team", model=User)
        team.extend([alice, users["bob"]])
        print("team:", [member.name for member in team])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "type_hints.db"))
