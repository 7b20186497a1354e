"""Vector search: nearest documents by embedding, exact, with metrics and filters."""
import os
import random
import tempfile

from beaver import BeaverDB, Document


def main(path):
    rng = random.Random(7)
    with BeaverDB(path) as db:
        images = db.collection("images", metric="cosine")     # 'l2' (default), 'cosine', 'ip'
        images.index_many(
            Document(id=f"img-{i}", embedding=[rng.gauss(0, 1) for _ in range(16)],
                     body={"label": rng.choice(["cat", "dog"]), "size": {"w": 64 * (i % 3 + 1)}})
            for i in range(500))
        query = images["img-42"].embedding
        for doc, distance in images.search(query, top_k=3):
            print(f"{doc.id:8} {doc.body['label']:4} distance={distance:.4f}")
        cats = images.search(query, top_k=3, where={"label": "cat", "size.w": [64, 128]})
        print("cats 64 or 128 wide:", [(d.id, d.body["label"], d.body["size"]["w"]) for d, _ in cats])

        images.index(Document(id="img-42", embedding=[-x for x in query], body={"label": "cat"}))
        print("after moving img-42, nearest to its old place:",
              [d.id for d, _ in images.search(query, top_k=2)])
        images.drop("img-7")
        print("img-7 still searchable:", "img-7" in {d.id for d, _ in images.search(query, 500)})


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "vectors.db"))
