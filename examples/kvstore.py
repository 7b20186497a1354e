"""Namespaced key-value dictionaries: a persistent dict per name, in one file."""
import os
import tempfile

from beaver import BeaverDB


def main(path):
    with BeaverDB(path) as db:
        config = db.dict("app_config")
        config["theme"] = "dark"                      # saved at once
        config["retries"] = 3
        config.set("user_ids", [101, 205, 301])
        config.update({"language": "en", "beta": False})
        print(f"config has {len(config)} items: {sorted(config)}")
        print("theme:", config["theme"], "| missing:", config.get("missing", "default"))

        for key, value in config.items():              # in key order
            print(f"  {key} = {value!r}")

        del config["retries"]
        print("popped:", config.pop("beta"), "| setdefault:", config.setdefault("font", "mono"))

        users = db.dict("users")                       # another namespace, same file
        users["alice"] = {"email": "alice@example.com", "roles": ["admin"]}
        print("alice:", users["alice"], "| 'theme' in users:", "theme" in users)

    with BeaverDB(path) as db:                          # everything is still there
        print("after reopening:", dict(db.dict("app_config")))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "kvstore.db"))
