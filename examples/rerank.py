"""Hybrid search for RAG: combine keyword and vector results with reciprocal rank fusion."""
import os
import tempfile

from beaver import BeaverDB, Document
from beaver.collections import rerank


def main(path):
    db = BeaverDB(path)
    articles = db.collection("articles")

    # Index documents with both text and embeddings
    docs_to_index = [
        Document(
            id="py-fast",
            embedding=[0.1, 0.9, 0.2],  # Vector leans towards "speed"
            body="Python is a great language for fast prototyping.",
        ),
        Document(
            id="py-data",
            embedding=[0.8, 0.2, 0.9],  # Vector leans towards "data science"
            body="The Python ecosystem is ideal for data science.",
        ),
        Document(
            id="js-fast",
            embedding=[0.2, 0.8, 0.1],  # Vector similar to "py-fast"
            body="JavaScript engines are optimized for fast execution.",
        ),
    ]
    for doc in docs_to_index:
        articles.index(doc, fts=True)  # Enable FTS

    # 1. Vector Search for "high-performance code"
    query_vector = [0.15, 0.85, 0.15]  # A vector close to "fast"
    vector_results = [doc for doc, _ in articles.search(vector=query_vector)]

    # 2. Full-Text Search for "python"
    text_results = [doc for doc, _ in articles.match(query="python")]

    # 3. Combine and rerank to get the best context
    best_context = rerank(text_results, vector_results)

    print("--- Final Reranked Results ---")
    for doc in best_context:
        print(f" - {doc.id}: {doc.body}")

    weighted = rerank(vector_results, text_results, weights=[0.6, 0.4])
    print("weighted 0.6 vector / 0.4 text:", [doc.id for doc in weighted])
    db.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(os.path.join(folder, "rag_demo.db"))
