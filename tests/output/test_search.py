"""pipeline/output/search.py and ``python -m pipeline search``: on six documents about clearly
different things, a question about one finds that one first; queries get the model's
query prefix."""

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.core.profiles import PROFILES
from pipeline.core.corpus import write_manifest
from pipeline.output.search import embed_query, format_results, query_embedder, search
from pipeline.core.shard_job import ShardJob, run_shard

TOPICS = {
    "beekeeping": ("Keeping Honey Bees", [
        "A colony of honey bees lives in a hive of wooden frames, each holding a sheet of wax comb. "
        "The queen lays eggs in the cells while thousands of worker bees tend the brood.",
        "Forager bees visit flowers to collect nectar and pollen. Back at the hive they pass the nectar "
        "to house bees, who add enzymes and fan it with their wings until the water evaporates and it "
        "becomes honey, which they seal under a cap of beeswax.",
        "The beekeeper wears a veil and uses a smoker to calm the bees before lifting the frames. In late "
        "summer the capped honey is extracted with a centrifuge, leaving enough stores for the winter.",
    ]),
    "volcanoes": ("Volcanoes and Eruptions", [
        "A volcano forms where molten rock, called magma, rises from the mantle through cracks in the "
        "Earth's crust. When magma reaches the surface it is called lava.",
        "Explosive eruptions throw ash, pumice and volcanic bombs high into the atmosphere, while "
        "effusive eruptions pour rivers of basalt lava down the slopes of shield volcanoes.",
        "Volcanologists watch for earthquakes, ground swelling and sulphur dioxide gas to forecast an "
        "eruption. Pyroclastic flows of hot gas and rock are the deadliest hazard near a crater.",
    ]),
    "chess": ("Chess Openings", [
        "The opening is the first phase of a chess game, when players develop their knights and bishops, "
        "fight for the centre of the board and castle their king to safety.",
        "The Ruy Lopez begins 1.e4 e5 2.Nf3 Nc6 3.Bb5, putting pressure on the knight that defends the "
        "e5 pawn. The Sicilian Defence, 1.e4 c5, is Black's most popular answer to the king's pawn.",
        "In the Queen's Gambit White offers a pawn with 1.d4 d5 2.c4 to lure Black's pawn away from the "
        "centre. Grandmasters memorise long lines of opening theory.",
    ]),
    "sourdough": ("Baking Sourdough Bread", [
        "Sourdough bread is leavened by a starter, a culture of wild yeast and lactic acid bacteria kept "
        "alive by regular feedings of flour and water.",
        "Mix the starter with flour, water and salt, then stretch and fold the dough every half hour "
        "during the bulk fermentation until it is airy and has risen by half.",
        "Shape the loaf, let it proof overnight in the fridge in a floured basket, then bake it in a "
        "preheated Dutch oven so the steam gives a crisp, blistered crust and an open crumb.",
    ]),
    "tides": ("Ocean Tides", [
        "Tides are the regular rise and fall of sea level caused by the gravitational pull of the Moon "
        "and the Sun on the Earth's oceans.",
        "Most coasts see two high tides and two low tides each lunar day. Spring tides, with the largest "
        "range, happen at new and full moon when the Sun and Moon line up.",
        "Neap tides occur at the quarter moons. In funnel-shaped bays such as the Bay of Fundy the tidal "
        "range can exceed fifteen metres, and tidal currents race through narrow straits.",
    ]),
    "railways": ("The History of Railways", [
        "The first public railway to carry passengers behind steam locomotives opened between Stockton "
        "and Darlington in 1825. Soon iron rails linked mines, ports and cities.",
        "Standard gauge track, 1,435 millimetres between the rails, spread across Britain, Europe and "
        "North America. Signal boxes, timetables and railway time followed.",
        "Diesel and electric trains replaced steam in the twentieth century, and high-speed lines such "
        "as the Japanese Shinkansen carry passengers at over three hundred kilometres an hour.",
    ]),
}


@pytest.fixture(scope="module")
def topics_output(tmp_path_factory, embedder):
    """Six documents, one per topic, in three shards of two."""
    root = tmp_path_factory.mktemp("search")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, (title, paragraphs) in TOPICS.items():
        body = "\n\n".join(paragraphs)
        (corpus / f"{name}.md").write_text(f"---\ntitle: {title}\n---\n\n# {title}\n\n{body}\n", encoding="utf-8")
    output = root / "out"
    manifest = str(output / "manifest.parquet")
    assert write_manifest(str(corpus), "*.md", 2, manifest) == 6
    for shard in range(3):
        run_shard(ShardJob(str(corpus), manifest, str(output), 3), shard, embedder)
    return output


def test_a_question_about_bees_finds_the_beekeeping_document_first(topics_output, embedder):
    results = search(str(topics_output), "how do bees make honey", k=5, embedder=embedder)
    assert len(results) == 5
    assert results[0]["path"] == "beekeeping.md" and results[0]["title"] == "Keeping Honey Bees"
    assert set(results[0]) == {"score", "doc_id", "chunk_id", "title", "path", "text"}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1


def test_a_question_about_volcanoes_finds_the_volcano_document_first(topics_output, embedder):
    results = search(str(topics_output), "lava and ash from an erupting volcano", k=3, embedder=embedder)
    assert results[0]["path"] == "volcanoes.md"


def test_the_scores_are_the_exact_cosines_whatever_the_batch_size(topics_output, embedder):
    """The running top-k over small batches is the top-k of every chunk's cosine."""
    from pipeline.output.read_back import stream_embeddings

    query = "stretch and fold the dough"
    vector = embed_query(embedder, query)
    everything = [(float(v @ vector), d, int(c)) for b in stream_embeddings(str(topics_output))
                  for v, d, c in zip(b.vectors, b.doc_ids, b.chunk_ids)]
    everything.sort(key=lambda item: -item[0])
    for batch_size in (1, 2, 1000):
        results = search(str(topics_output), query, k=4, embedder=embedder, batch_size=batch_size)
        assert [(r["doc_id"], r["chunk_id"]) for r in results] == [(d, c) for _, d, c in everything[:4]]
        assert np.allclose([r["score"] for r in results], [s for s, _, _ in everything[:4]], atol=1e-6)
    assert search(str(topics_output), query, k=100, embedder=embedder)[0]["path"] == "sourdough.md"
    assert len(search(str(topics_output), query, k=100, embedder=embedder)) == len(everything)


def test_queries_get_the_profiles_query_prefix(embedder):
    assert PROFILES["nomic"].query_prefix == "search_query: " and PROFILES["nomic"].prefix == "search_document: "
    assert PROFILES["minilm"].query_prefix == ""
    # A prefix goes through the same framing as chunks: the vector is the model's own for prefix + text.
    text = "how do bees make honey"
    prefixed = embedder.embed_texts([text], prefix="search_query: ")[0]
    theirs = embedder.model.encode(["search_query: " + text], normalize_embeddings=True)[0]
    assert np.abs(prefixed - theirs).max() < 1e-5
    assert not np.allclose(prefixed, embedder.embed_texts([text])[0], atol=1e-3)
    # Without a prefix, as before: the document prefix (none for minilm).
    plain = embedder.model.encode([text], normalize_embeddings=True)[0]
    assert np.abs(embedder.embed_texts([text])[0] - plain).max() < 1e-5
    assert np.array_equal(embed_query(embedder, text), embedder.embed_texts([text], prefix="")[0])


def test_the_command_prints_the_expected_title_first_and_exits_0(topics_output, capsys):
    """The command loads the model named in the output's first shard, by itself."""
    assert query_embedder(str(topics_output)).profile.name == "minilm"
    assert main(["search", str(topics_output), "how do bees make honey", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(" 1. ") and "Keeping Honey Bees" in lines[0] and "[beekeeping.md #" in lines[0]
    assert len(lines) == 6 and lines[1].startswith("    ") and len(lines[1]) <= 104

    assert main(["search", str(topics_output), "magma rising through the crust", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 5 and results[0]["title"] == "Volcanoes and Eruptions"


def test_format_results_without_hits():
    assert format_results([]).startswith("no results")


@pytest.fixture(scope="module")
def topics_with_binary(tmp_path_factory, topics_output):
    """The same output stored as float16 with a binary column (compact, no embedding again)."""
    from pipeline.output.compact import compact_output
    from pipeline.core.vector_format import VectorFormat
    from pipeline.output.summary import publish_summary, run_summary

    publish_summary(str(topics_output), run_summary(str(topics_output), 3, {}))  # compact takes a finished output
    small = tmp_path_factory.mktemp("search-binary") / "out"
    assert compact_output(str(topics_output), str(small), vector_format=VectorFormat("float16", ("binary",))).ok
    return small


def test_binary_candidates_rescored_find_what_the_exact_search_finds(topics_output, topics_with_binary, embedder):
    query = "stretch and fold the dough"
    exact = search(str(topics_output), query, k=3, embedder=embedder)
    rescored = search(str(topics_with_binary), query, k=3, embedder=embedder, binary_candidates=6)
    assert [(r["doc_id"], r["chunk_id"]) for r in rescored] == [(r["doc_id"], r["chunk_id"]) for r in exact]
    assert np.allclose([r["score"] for r in rescored], [r["score"] for r in exact], atol=2e-3)  # float16 vectors
    # Never fewer candidates than k.
    assert len(search(str(topics_with_binary), query, k=3, embedder=embedder, binary_candidates=1)) == 3  # k at least
    with pytest.raises(PipelineError, match="has no binary column to take candidates from"):
        search(str(topics_output), query, k=3, embedder=embedder, binary_candidates=10)


def test_the_command_searches_on_binary_candidates(topics_with_binary, capsys):
    assert main(["search", str(topics_with_binary), "how do bees make honey", "-k", "2", "--binary-candidates", "20"]) == 0
    assert "Keeping Honey Bees" in capsys.readouterr().out.splitlines()[0]
