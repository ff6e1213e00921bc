"""``later_copies`` decides, for a whole manifest at once and with Arrow, what
``first_copies`` decides shard by shard walking rows in Python: the two must agree on
every manifest, generations (superseded rows, moved documents) included."""

import random

import pyarrow as pa

from pipeline.core.generations import first_copies, later_copies, with_generations

SCHEMA = pa.schema([("doc_id", pa.string()), ("path", pa.string()), ("content_hash", pa.string()), ("shard", pa.int32()),
                    ("superseded_in", pa.int32()), ("embedded_doc_id", pa.string())])


def random_manifest(seed: int) -> pa.Table:
    """Documents of few distinct contents, some superseded, some of those moved (a
    re-keyed row in the holder's shard)."""
    rng = random.Random(seed)
    rows = [dict(doc_id=f"d{i}", path=f"p{i}", content_hash=f"h{rng.randint(0, 6)}", shard=i // 4,
                 superseded_in=rng.choice([None, None, 1]), embedded_doc_id=None) for i in range(rng.randint(1, 40))]
    for row in list(rows):
        if row["superseded_in"] is not None and rng.random() < 0.4:
            rows.append(dict(doc_id=f"moved-{row['doc_id']}", path=f"new/{row['path']}", content_hash=row["content_hash"],
                             shard=row["shard"], superseded_in=None, embedded_doc_id=row["doc_id"]))
    return with_generations(pa.Table.from_pylist(rows, schema=SCHEMA))


def test_later_copies_agrees_with_first_copies_on_every_shard():
    for seed in range(300):
        manifest = random_manifest(seed)
        copies = later_copies(manifest)
        found = list(zip(copies["shard"].to_pylist(), copies["doc_id"].to_pylist(), copies["holder"].to_pylist()))
        for shard in set(manifest["shard"].to_pylist()):
            assert {doc: holder for s, doc, holder in found if s == shard} == first_copies(manifest, shard)[1], seed


def test_a_shard_reads_its_duplicates_from_one_decision_per_process_and_manifest_version(tmp_path, monkeypatch):
    """The decision reads only the rows whose content repeats (two passes, a key per row),
    once; each shard then takes its own copies. A manifest rewritten is decided again."""
    import pyarrow.parquet as pq

    from pipeline.core import corpus

    manifest = random_manifest(7)
    path = tmp_path / "manifest.parquet"
    pq.write_table(manifest, path, row_group_size=5)
    decided = []
    real = corpus.later_copies
    monkeypatch.setattr(corpus, "later_copies", lambda rows: decided.append(rows.num_rows) or real(rows))
    shards = sorted(set(manifest["shard"].to_pylist()))
    for shard in shards:
        assert corpus.duplicates_in_shard(str(path), shard) == first_copies(manifest, shard)[1]
    assert len(decided) == 1 and decided[0] <= manifest.num_rows
    pq.write_table(random_manifest(8), path, row_group_size=5)
    for shard in sorted(set(random_manifest(8)["shard"].to_pylist())):
        assert corpus.duplicates_in_shard(str(path), shard) == first_copies(random_manifest(8), shard)[1]
    assert len(decided) == 2
