"""Tests of beaver, in the order of beaver.py's sections."""
import subprocess
import sys

import pytest

import beaver
from beaver import BeaverDB


@pytest.fixture
def db(tmp_path):
    database = BeaverDB(tmp_path / "test.db")
    yield database
    database.close()


def test_import_without_site_packages():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import beaver; print(beaver.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code, str(__import__("pathlib").Path(beaver.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == beaver.__version__


def test_dict_round_trip(db):
    config = db.dict("app_config")
    config["theme"] = "dark"
    assert config["theme"] == "dark"
    assert len(config) == 1


# ---- collections ----

import json
import multiprocessing
import threading

from beaver import Document, FeatureUnavailable, ValidationError, rerank


@pytest.fixture
def docs(db):
    return db.collection("docs")


def test_collection_quickstart_string_body(db):
    articles = db.collection("articles")
    doc = Document(id="sqlite-001",
                   body="SQLite is a powerful embedded database ideal for local apps.")
    articles.index(doc, fts=True, fuzzy=True)
    top_doc, rank = articles.match(query="datbase", fuzziness=1)[0]
    assert top_doc == doc and top_doc.body == doc.body and rank >= 0


def test_collection_old_readme_quickstart(db):
    articles = db.collection("articles")
    articles.index(Document(id="sqlite-001",
                            content="SQLite is a powerful embedded database ideal for local apps."))
    top_doc, _ = articles.match(query="database")[0]
    assert top_doc.content.startswith("SQLite is")
    assert top_doc.to_dict() == {"id": "sqlite-001", "embedding": None,
                                 "body": {"content": top_doc.content}}


def test_collection_rag_example(db):
    from beaver.collections import rerank as rerank_alias
    assert rerank_alias is rerank
    articles = db.collection("articles")
    for doc in [
        Document(id="py-fast", embedding=[0.1, 0.9, 0.2],
                 body="Python is a great language for fast prototyping."),
        Document(id="py-data", embedding=[0.8, 0.2, 0.9],
                 body="The Python ecosystem is ideal for data science."),
        Document(id="js-fast", embedding=[0.2, 0.8, 0.1],
                 body="JavaScript engines are optimized for fast execution."),
    ]:
        articles.index(doc, fts=True)
    vector_results = [doc for doc, _ in articles.search(vector=[0.15, 0.85, 0.15])]
    text_results = [doc for doc, _ in articles.match(query="python")]
    assert [d.id for d in vector_results][:2] in (["py-fast", "js-fast"], ["js-fast", "py-fast"])
    assert {d.id for d in text_results} == {"py-fast", "py-data"}
    best = rerank(text_results, vector_results)
    assert best[0].id == "py-fast" and {d.id for d in best} == {"py-fast", "py-data", "js-fast"}
    weighted = rerank(vector_results, text_results, weights=[0.6, 0.4])
    assert weighted[0].id == "py-fast"


def _social(db):
    net = db.collection("social_network")
    people = {name: Document(id=name, body={"name": name.title()})
              for name in ("alice", "bob", "charlie", "diana")}
    for doc in people.values():
        net.index(doc)
    for a, b in [("alice", "bob"), ("alice", "charlie"), ("bob", "diana"), ("charlie", "bob")]:
        net.connect(people[a], people[b], label="FOLLOWS")
    return net, people


def test_collection_graph_example(db):
    net, p = _social(db)
    assert [d.id for d in net.neighbors(p["alice"], label="FOLLOWS")] == ["bob", "charlie"]
    foaf = net.walk(source=p["alice"], labels=["FOLLOWS"], depth=2)
    assert [d.id for d in foaf] == ["bob", "charlie", "diana"]
    assert [d.id for d in net.neighbors("bob", direction="incoming")] == ["alice", "charlie"]
    assert [d.id for d in net.neighbors("bob", direction="both")] == ["alice", "charlie", "diana"]
    assert net.neighbors("alice", label="LIKES") == []
    net.connect("diana", "alice", "LIKES", metadata={"since": 2020})
    assert net.edges("diana") == [beaver.Edge("diana", "alice", "LIKES", {"since": 2020})]
    net.disconnect("alice", "bob")
    assert [d.id for d in net.neighbors("alice")] == ["charlie"]
    with pytest.raises(KeyError):
        net.connect("alice", "nobody", "FOLLOWS")


def test_collection_walk_on_cycle(db):
    ring = db.collection("ring")
    n = 50
    for i in range(n):
        ring.index(Document(id=f"n{i}"))
    for i in range(n):
        ring.connect(f"n{i}", f"n{(i + 1) % n}", "next")
        ring.connect(f"n{i}", f"n{(i + 7) % n}", "skip")
    reached = ring.walk("n0", depth=1000)
    assert len(reached) == n - 1 and "n0" not in {d.id for d in reached}
    assert [d.id for d in ring.walk("n0", labels="next", depth=3)] == ["n1", "n2", "n3"]
    assert {d.id for d in ring.walk("n0", direction="incoming", depth=1)} == {"n49", "n43"}


def test_collection_drop_removes_edges(db):
    net, _ = _social(db)
    net.drop("bob")
    assert "bob" not in net and len(net) == 3
    assert net.edges("alice") == [beaver.Edge("alice", "charlie", "FOLLOWS", None)]
    assert net.edges("charlie") == []
    with pytest.raises(KeyError):
        net.drop("bob")


def test_collection_document_basics():
    doc = Document(content="hi", tags=["a"])
    assert len(doc.id) == 36 and doc.content == "hi" and doc.tags == ["a"]
    assert Document(id="x", body={"a": 1}, b=2).body == {"a": 1, "b": 2}
    assert Document(id="x", embedding=(1, 2)).embedding == [1.0, 2.0]
    assert Document(id="x", embedding=[0.1]) == Document(id="x", embedding=[0.1])
    assert "x" in repr(Document(id="x", body="text"))
    with pytest.raises(AttributeError):
        Document(id="x").missing
    with pytest.raises(TypeError):
        Document(id="x", body="text", extra=1)
    with pytest.raises(ValueError):
        Document(embedding=[float("nan")])
    np = pytest.importorskip("numpy")
    assert Document(id="x", embedding=np.array([1.5, 2.0])).embedding == [1.5, 2.0]


def test_collection_mapping_protocol(docs):
    docs.index(Document(id="b", body={"t": "beta"}))
    docs.index(Document(id="a", body={"t": "alpha"}, embedding=[1.0, 0.0]))
    assert len(docs) == 2 and "a" in docs and Document(id="b") in docs and "z" not in docs
    assert [d.id for d in docs] == ["a", "b"]
    assert docs["a"].embedding == [1.0, 0.0] and docs.get("z") is None
    with pytest.raises(KeyError):
        docs["z"]
    docs.clear()
    assert len(docs) == 0 and docs.match("alpha") == [] and docs.search([1.0, 0.0]) == []


INJECTIONS = ['"', '""', "'", "-", "--", ":", "*", "(", ")", "()", "AND", "OR", "NOT", "NEAR",
              "NEAR(a b)", '"sqlite-001"', "sqlite-001", "a AND", "OR b", "title:sqlite",
              "col:", "^start", "a*b", "-sqlite", "NOT sqlite", "sqlite NOT", "{a b}:c",
              "a + b", "[x]", '"unclosed phrase', "\\", "%_", "a OR OR b", "* sqlite", ""]


def test_collection_fts_injection_never_raises(docs):
    docs.index(Document(id="sqlite-001", body="SQLite is a powerful embedded database."))
    docs.index(Document(id="pg", body="PostgreSQL is a database server. AND OR NOT NEAR"))
    for query in INJECTIONS:
        for fuzziness in (0, 1):
            assert isinstance(docs.match(query, fuzziness=fuzziness), list), query
    assert [d.id for d, _ in docs.match("database -server")] == ["sqlite-001"]
    assert [d.id for d, _ in docs.match("database NOT server")] == ["sqlite-001"]
    assert {d.id for d, _ in docs.match("sqlite OR postgresql")} == {"sqlite-001", "pg"}
    assert [d.id for d, _ in docs.match('"embedded database"')] == ["sqlite-001"]
    assert [d.id for d, _ in docs.match("embed*")] == ["sqlite-001"]
    assert docs.match('"database embedded"') == []
    assert [d.id for d, _ in docs.match("NEAR")] == ["pg"]
    with pytest.raises(ValueError):
        docs.match("(", raw=True)
    assert [d.id for d, _ in docs.match("NEAR(sqlite database, 5)", raw=True)] == ["sqlite-001"]


def test_collection_isolation_and_names_not_searchable(db):
    first, second = db.collection("first"), db.collection("second")
    first.index(Document(id="same", body={"title": "apple pie", "meta": {"tag": "fruit"}}))
    second.index(Document(id="same", body={"title": "banana bread"}))
    assert [d.body["title"] for d, _ in first.match("apple")] == ["apple pie"]
    assert second.match("apple") == [] and first.match("banana") == []
    for name in ("first", "second", "title", "meta", "tag", "meta.tag", "docs", "collection"):
        assert first.match(name) == [] and second.match(name) == [], name
    first.drop("same")
    assert [d.id for d, _ in second.match("banana")] == ["same"]


def test_collection_multi_field_dedup_and_on(docs):
    docs.index(Document(id="a", body={"title": "python", "text": "python python",
                                      "tags": ["python", "code"], "meta": {"lang": "python"}}))
    docs.index(Document(id="b", body={"title": "rust", "text": "about python"}))
    hits = docs.match("python")
    assert [d.id for d, _ in hits] == ["a", "b"] and hits[0][1] > hits[1][1] > 0
    assert [d.id for d, _ in docs.match("python", on=["title"])] == ["a"]
    assert [d.id for d, _ in docs.match("python", on=["meta"])] == ["a"]
    assert [d.id for d, _ in docs.match("code", on="tags")] == ["a"]
    assert docs.match("code", on=["title", "text"]) == []
    assert len(docs.match("python", top_k=1)) == 1
    docs.index(Document(id="c", body={"title": "python", "secret": "hidden"}), fts=["title"])
    assert docs.match("hidden") == []
    assert {d.id for d, _ in docs.match("python", on="title")} == {"a", "c"}
    doc, score, snippet = docs.match("rust", highlight=True)[0]
    assert doc.id == "b" and "[rust]" in snippet


def test_collection_upsert_replaces_text(docs):
    docs.index(Document(id="a", body="old words"))
    docs.index(Document(id="a", body="new words"))
    assert docs.match("old") == [] and [d.id for d, _ in docs.match("new")] == ["a"]
    assert len(docs) == 1


@pytest.mark.parametrize("query,fuzziness,expected", [
    ("datbase", 1, "database"), ("databse", 1, "database"), ("dtaabase", 1, "database"),
    ("pyton", 1, "python"), ("cat", 1, "cat"), ("cta", 1, "cat"), ("ct", 1, None),
    ("dgo", 1, "dog"), ("sqlit", 1, "sqlite"), ("datbsae", 2, "database"),
    ("prgramming", 1, "programming"), ("progrmaming", 2, "programming"),
    ("prgoramimng", 2, "programming"), ("databaes", 2, "database"), ("pyton", 2, "python"),
])
def test_collection_fuzzy(docs, query, fuzziness, expected):
    texts = {"database": "an embedded database", "python": "python is a language",
             "cat": "the cat sat", "dog": "a dog barked", "sqlite": "sqlite rocks",
             "programming": "functional programming ideas", "other": "unrelated words here"}
    for key, text in texts.items():
        docs.index(Document(id=key, body=text))
    hits = [d.id for d, _ in docs.match(query, fuzziness=fuzziness)]
    if expected is None:
        assert "cat" not in hits
    else:
        assert hits and hits[0] == expected, hits
    assert docs.match(query) == [] or query == "cat"


def test_collection_fuzzy_ranks_by_distance(docs):
    docs.index(Document(id="exact", body="database"))
    docs.index(Document(id="one", body="databse"))
    docs.index(Document(id="two", body="dtabse"))
    assert [d.id for d, _ in docs.match("database", fuzziness=2)] == ["exact", "one", "two"]
    assert [d.id for d, _ in docs.match("database", fuzziness=1)] == ["exact", "one"]
    assert [d.id for d, _ in docs.match("colour database", fuzziness=1)] == []


def test_collection_vectors_metrics_and_where(db):
    l2, cos, ip = (db.collection(n, metric=m) for n, m in
                   (("l2", None), ("cos", "cosine"), ("ip", "ip")))
    vectors = {"x": [1.0, 0.0], "y": [0.0, 2.0], "xy": [3.0, 3.0]}
    for coll in (l2, cos, ip):
        for key, vec in vectors.items():
            coll.index(Document(id=key, embedding=vec, body={"k": key, "g": {"even": key != "y"}}))
    got = l2.search([1.0, 0.0], top_k=3)
    assert [d.id for d, _ in got] == ["x", "y", "xy"]
    assert got[0][1] == pytest.approx(0.0) and got[1][1] == pytest.approx(5 ** 0.5)
    got = cos.search([1.0, 1.0])
    assert got[0][0].id == "xy" and got[0][1] == pytest.approx(0.0, abs=1e-6)
    assert got[1][1] == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    got = ip.search([1.0, 1.0])
    assert [d.id for d, _ in got] == ["xy", "y", "x"] and got[0][1] == pytest.approx(-6.0)
    assert [d.id for d, _ in l2.search([1.0, 0.0], where={"k": "y"})] == ["y"]
    assert [d.id for d, _ in l2.search([1.0, 0.0], where={"g.even": True})] == ["x", "xy"]
    assert [d.id for d, _ in l2.search([1.0, 0.0], where={"k": ["xy", "y"]})] == ["y", "xy"]
    assert l2.search([1.0, 0.0], where={"k": "nope"}) == []
    with pytest.raises(ValidationError):
        l2.search([1.0, 0.0, 0.0])
    with pytest.raises(ValidationError):
        l2.index(Document(id="bad", embedding=[1.0, 2.0, 3.0]))
    assert "bad" not in l2
    with pytest.raises(ValueError):
        db.collection("cos", metric="l2")


def test_collection_vector_upsert_moves_and_reopen(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAVER_VECTOR_BACKEND", "exact")
    path = tmp_path / "v.db"
    with BeaverDB(path) as db:
        docs = db.collection("v")
        docs.index(Document(id="a", embedding=[0.0, 0.0]))
        docs.index(Document(id="b", embedding=[10.0, 10.0]))
        assert docs.search([0.0, 0.0], top_k=1)[0][0].id == "a"
        docs.index(Document(id="a", embedding=[20.0, 20.0]))
        assert [d.id for d, _ in docs.search([0.0, 0.0])] == ["b", "a"]
        docs.index(Document(id="a", body="no vector now"))
        assert [d.id for d, _ in docs.search([0.0, 0.0])] == ["b"]
        docs.drop("b")
        assert docs.search([0.0, 0.0]) == []
        docs.index(Document(id="b", embedding=[1.0, 1.0], body="back again"))
    with BeaverDB(path) as db:
        docs = db.collection("v")
        hits = docs.search([0.0, 0.0])
        assert [(d.id, d.body) for d, _ in hits] == [("b", "back again")]
        assert [d.id for d, _ in docs.match("again")] == ["b"]


def test_collection_vectors_pure_python(docs, monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)
    for i in range(20):
        docs.index(Document(id=f"d{i}", embedding=[float(i), 1.0]))
    hits = docs.search([4.2, 1.0], top_k=3)
    assert [d.id for d, _ in hits] == ["d4", "d5", "d3"]
    assert hits[0][1] == pytest.approx(0.2, abs=1e-5)
    assert docs._vectors.np is None


def test_collection_dump_load_with_edges(db):
    net, _ = _social(db)
    net.index(Document(id="v", embedding=[1.0, 2.0], body={"text": "vector doc"}))
    data = net.dump()
    assert data["metadata"]["count"] == 5 and len(data["edges"]) == 4
    copy = db.collection("copy")
    copy.load(json.dumps(data))
    assert [d.id for d in copy] == [d.id for d in net]
    assert copy["v"].embedding == [1.0, 2.0]
    assert [d.id for d in copy.walk("alice", depth=2)] == ["bob", "charlie", "diana"]
    assert [d.id for d, _ in copy.match("vector")] == ["v"]


def test_collection_events_and_model(db):
    seen = []
    done = threading.Event()
    coll = db.collection("ev")
    coll.on("*", lambda p: (seen.append(p["event"]), p["event"] == "drop" and done.set()))
    coll.index(Document(id="a"))
    coll.index(Document(id="b"))
    coll.connect("a", "b", "x")
    coll.drop("a")
    assert done.wait(5)
    assert seen == ["index", "index", "connect", "drop"]

    class Article(beaver.Model):
        title: str
        views: int = 0

    typed = db.collection("typed", model=Article)
    typed.index(Document(id="t", body=Article(title="Typed search")))
    doc, _ = typed.match("typed")[0]
    assert isinstance(doc.body, Article) and doc.title == "Typed search"
    with pytest.raises((TypeError, ValueError)):
        typed.index(Document(id="u", body=["not", "an", "article"]))


def test_collection_rerank_shapes():
    a, b, c = Document(id="a"), Document(id="b"), Document(id="c")
    assert rerank([a, b, c], [c, b]) == [b, c, a] or rerank([a, b, c], [c, b])[0] in (b, c)
    assert [d.id for d in rerank([(a, 0.1), (b, 0.2)], [b])] == ["b", "a"]
    assert rerank() == [] and rerank([]) == []
    with pytest.raises(ValueError):
        rerank([a], [b], weights=[1.0])


def _collection_writer(path):
    with BeaverDB(path) as db:
        db.collection("shared").index(Document(id="remote", embedding=[0.5, 0.5],
                                               body="written by another process"))


def test_collection_visible_across_processes(tmp_path):
    path = str(tmp_path / "x.db")
    with BeaverDB(path) as db:
        coll = db.collection("shared")
        coll.index(Document(id="local", embedding=[9.0, 9.0], body="local text"))
        assert [d.id for d, _ in coll.search([0.5, 0.5])] == ["local"]
        proc = multiprocessing.get_context("spawn").Process(target=_collection_writer,
                                                             args=(path,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert [d.id for d, _ in coll.match("another")] == ["remote"]
        assert [d.id for d, _ in coll.search([0.5, 0.5])] == ["remote", "local"]
        assert [d.id for d, _ in coll.match("anotehr", fuzziness=1)] == ["remote"]


def test_collection_index_many(docs):
    assert docs.index_many(Document(id=f"d{i}", body=f"text number {i}", embedding=[i, 1.0])
                           for i in range(30)) == 30
    assert len(docs) == 30 and [d.id for d, _ in docs.match("text", top_k=50)].__len__() == 30
    with pytest.raises(ValidationError):
        docs.index_many([Document(id="x", embedding=[1.0]), Document(id="y", embedding=[1, 2])])
    with pytest.raises(ValidationError):
        docs.index_many([Document(id="x", embedding=[1.0, 2.0, 3.0])])
    assert "x" not in docs and "y" not in docs
