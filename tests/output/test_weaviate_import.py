"""pipeline/output/weaviate_import.py: shard rows become Weaviate objects (uuid, properties,
vector) that match the declared collection, without a Weaviate server."""

import numpy as np
import pytest

from helpers import finished_output
from pipeline.output.read_back import EmbeddingBatch, stream_embeddings
from pipeline.output.weaviate_import import COLLECTION_PROPERTIES, object_uuid, weaviate_objects

KINDS = {"TEXT": str, "INT": int}


def metadata(path, title, heading_path, start, end, tokens):
    return {"path": path, "title": title, "author": None, "date": "1900-01-02", "source_url": None,
            "language": "en", "front_matter": "{}", "front_matter_error": None, "encoding": "utf-8",
            "heading_path": heading_path, "char_start": start, "char_end": end, "token_count": tokens}


def hand_batch() -> EmbeddingBatch:
    rng = np.random.default_rng(0)
    return EmbeddingBatch(
        doc_ids=["aaaa", "aaaa", "bbbb"],
        chunk_ids=np.array([0, 1, 0], dtype=np.int32),
        vectors=rng.standard_normal((3, 8)).astype(np.float32),
        texts=["# Intro\n\nfirst", "second", "no front matter"],
        metadata=[
            metadata("a.md", "A", ["Intro"], 0, 14, 4),
            metadata("a.md", "A", ["Intro", "More"], 16, 22, 1),
            metadata("b.md", None, [], 0, 15, 3),
        ],
    )


def check(batch: EmbeddingBatch, dimension: int) -> list[dict]:
    """Every property the collection declares and of its kind; vector and text as in the row."""
    objects = weaviate_objects(batch)
    assert len(objects) == len(batch)
    declared = dict(COLLECTION_PROPERTIES)
    for i, obj in enumerate(objects):
        assert obj["uuid"] == object_uuid(batch.doc_ids[i], int(batch.chunk_ids[i]))
        properties = obj["properties"]
        assert properties.keys() <= declared.keys()
        for name, value in properties.items():
            if declared[name] == "TEXT_ARRAY":
                assert isinstance(value, list) and all(isinstance(v, str) for v in value), name
            else:
                assert type(value) is KINDS[declared[name]], name
        assert properties["text"] == batch.texts[i]
        assert (properties["doc_id"], properties["chunk_id"]) == (batch.doc_ids[i], int(batch.chunk_ids[i]))
        assert properties["heading_path"] == batch.metadata[i]["heading_path"]
        assert all(type(v) is float for v in obj["vector"])
        assert len(obj["vector"]) == dimension
        assert np.array_equal(np.asarray(obj["vector"], dtype=np.float32), batch.vectors[i])
    return objects


def test_hand_built_batch():
    batch = hand_batch()
    objects = check(batch, 8)
    assert len({obj["uuid"] for obj in objects}) == 3
    assert objects == weaviate_objects(hand_batch())  # deterministic: a re-import overwrites
    # None values are left out, the rest kept
    assert "title" not in objects[2]["properties"] and "author" not in objects[0]["properties"]
    assert objects[0]["properties"]["title"] == "A" and objects[2]["properties"]["heading_path"] == []
    assert objects[1]["properties"]["char_start"] == 16 and objects[1]["properties"]["language"] == "en"
    assert not {"front_matter", "front_matter_error", "encoding"} & objects[0]["properties"].keys()


def test_uuid_depends_on_doc_and_chunk_only():
    assert object_uuid("aaaa", 1) == object_uuid("aaaa", np.int32(1))
    assert len({object_uuid("aaaa", 0), object_uuid("aaaa", 1), object_uuid("bbbb", 0)}) == 3
    assert object_uuid("aaaa", 0) == "e405dc17-d89e-5790-8c2f-69e84076a89c"  # fixed namespace


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedder):
    return finished_output(tmp_path_factory.mktemp("weaviate"), embedder)


def test_real_output(finished, embedder):
    uuids = []
    for batch in stream_embeddings(str(finished), batch_size=7):
        uuids += [obj["uuid"] for obj in check(batch, 384)]
    assert uuids and len(uuids) == len(set(uuids))
