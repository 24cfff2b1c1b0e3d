"""Small parts of the scale work: the distinct-count sketch the report merges across shards,
and URL normalisation for takedown matching (hostile inputs included)."""

from __future__ import annotations

import pytest

from facecaption.core.urls import normalise_url
from facecaption.release.stats import DistinctSketch


def sketch_of(items) -> DistinctSketch:
    sketch = DistinctSketch()
    sketch.update(items)
    return sketch


@pytest.mark.parametrize("count", [0, 1, 10, 500, 5_000, 60_000])
def test_sketch_estimates_distinct_counts_closely(count):
    estimate = sketch_of(f"gram {i}" for i in range(count)).estimate()
    assert abs(estimate - count) <= max(1, 0.05 * count), (estimate, count)


def test_sketches_of_parts_merge_into_the_sketch_of_the_whole():
    items = [f"w{i % 7000} w{i % 13}" for i in range(30_000)]  # repeats within and across
    whole = sketch_of(items)
    first, second = sketch_of(items[:12_000]), sketch_of(items[12_000:])
    first.merge(second)
    assert (first.registers == whole.registers).all()
    assert first.estimate() == whole.estimate()


def test_sketch_survives_its_text_form():
    sketch = sketch_of(str(i) for i in range(3000))
    again = DistinctSketch.from_text(sketch.to_text())
    assert (again.registers == sketch.registers).all() and again.estimate() == sketch.estimate()
    assert len(sketch.to_text()) < 6000  # a few KB per shard and kind in the state DB


def test_sketches_merged_from_their_text_form_in_batches_are_merged_one_by_one(monkeypatch):
    """The report merges each shard's sketch texts in numpy batches (a batch size that does
    not divide their number here): the same registers as merging them one by one."""
    monkeypatch.setattr(DistinctSketch, "MERGE_BATCH", 3)
    texts = [sketch_of(f"w{i} {part}" for i in range(part * 40)).to_text() for part in range(8)]
    one_by_one = sketch_of(["already there"])
    for text in texts:
        one_by_one.merge(DistinctSketch.from_text(text))
    batched = sketch_of(["already there"])
    batched.merge_texts(iter(texts))
    assert (batched.registers == one_by_one.registers).all()
    empty = DistinctSketch()
    empty.merge_texts([])
    assert empty.estimate() == 0


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTP://Example.COM:80/a%2fb?x=%7e#frag", "http://example.com/a%2Fb?x=%7E"),
        ("https://example.com", "https://example.com/"),
        ("https://example.com:443/p", "https://example.com/p"),
        ("https://example.com:8443/p", "https://example.com:8443/p"),
        ("https://bücher.de/Bild.JPG", "https://xn--bcher-kva.de/Bild.JPG"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("  http://example.com/a  ", "http://example.com/a"),
    ],
)
def test_urls_are_normalised_only_where_the_resource_cannot_change(url, normal):
    assert normalise_url(url) == normal


@pytest.mark.parametrize(
    "bad",
    [None, 7, b"http://example.com/", ["http://x/"], "", "no scheme", "http://",
     "http://example.com:99999/", "http://[::1/", "http://exa\x00mple.com/"],
)  # fmt: skip
def test_what_is_not_an_absolute_url_normalises_to_none(bad):
    assert normalise_url(bad) is None
