"""Binary objects (files, images...) with JSON metadata, stored in the database file."""
import os
import tempfile

from beaver import BeaverDB


def main(path):
    with BeaverDB(path) as db:
        attachments = db.blobs("user_uploads")
        file_key = "emails/user123/attachment_01.txt"
        attachments.put(key=file_key, data="The content of a text file.".encode(),
                        metadata={"mimetype": "text/plain", "sender": "alice@example.com"})
        attachments.put("avatar.png", bytes(range(256)), metadata={"mimetype": "image/png"})

        blob = attachments.get(file_key)
        print(f"{blob.key}: {blob.data.decode()!r} {blob.metadata}")
        print("avatar size:", len(attachments.get("avatar.png").data), "bytes")
        print("keys:", list(attachments), "| count:", len(attachments))

        attachments.delete(file_key)
        print("deleted:", file_key not in attachments, "| get:", attachments.get(file_key))
        try:
            attachments.delete(file_key)
        except KeyError:
            print("deleting it again raises KeyError")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "blobs.db"))
