"""A collection as a graph: connect documents, then neighbors() and multi-hop walk()."""
import os
import tempfile

from beaver import BeaverDB, Document


def main(path):
    db = BeaverDB(path)
    net = db.collection("social_network")

    # 1. Create Documents (nodes)
    alice = Document(id="alice", body={"name": "Alice"})
    bob = Document(id="bob", body={"name": "Bob"})
    charlie = Document(id="charlie", body={"name": "Charlie"})
    diana = Document(id="diana", body={"name": "Diana"})
    net.index(alice); net.index(bob); net.index(charlie); net.index(diana)

    # 2. Create Edges (relationships)
    net.connect(alice, bob, label="FOLLOWS")
    net.connect(alice, charlie, label="FOLLOWS")
    net.connect(bob, diana, label="FOLLOWS")
    net.connect(charlie, bob, label="FOLLOWS")
    net.connect(diana, alice, label="LIKES", metadata={"since": 2021})   # a cycle

    # 3. Find 1-hop neighbors
    print("--- Testing `neighbors` (1-hop) ---")
    following = net.neighbors(alice, label="FOLLOWS")
    print(f"Alice follows: {[p.id for p in following]}")
    print(f"Bob is followed by: {[p.id for p in net.neighbors(bob, direction='incoming')]}")

    # 4. Find multi-hop connections (e.g., "friends of friends")
    print("\n--- Testing `walk` (multi-hop) ---")
    foaf = net.walk(source=alice, labels=["FOLLOWS"], depth=2)
    print(f"Alice's extended network (friends of friends): {[p.id for p in foaf]}")
    everyone = net.walk(alice, depth=10)            # cycles are visited once
    print(f"Reachable from Alice through any edge: {[p.id for p in everyone]}")
    print("Edges of Diana:", net.edges(diana, direction="both"))

    net.drop(bob)                                   # dropping a node removes its edges
    print(f"After dropping Bob, Alice follows: {[p.id for p in net.neighbors(alice)]}")
    db.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "graph_demo.db"))
