"""Planning sources into shards with deterministic ids, and bounded row reads from sources."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.fileserver import FileServer

from facecaption.core.errors import is_permanent
from facecaption.core.pipeline import Pipeline, PlanError
from facecaption.plan.sources import SourceChangedError, iter_rows
from facecaption.settings import Settings
from facecaption.state import UnknownShardError


def write_rows(path: Path, num_rows: int, *, tag: str = "a", **columns: str) -> Path:
    """A parquet of `num_rows` rows; `columns` maps role -> column name (url/caption/sample_id)."""
    names = {"url": "url", "caption": "caption", "sample_id": "id", **columns}
    data = {}
    if names["url"]:
        data[names["url"]] = [f"http://example.test/{tag}/{i}.jpg" for i in range(num_rows)]
    if names["caption"]:
        data[names["caption"]] = [f"caption {tag} {i}" for i in range(num_rows)]
    if names["sample_id"]:
        data[names["sample_id"]] = [f"{tag}-{i}" for i in range(num_rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data), path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_ids(path: Path, ranges: list[tuple[int, int]]) -> list[str]:
    digest = sha256_of(path)[:12]
    return [f"{digest}_{start:09d}_{end:09d}" for start, end in ranges]


@pytest.fixture
def small(settings: Settings) -> Settings:
    return settings.model_copy(update={"shard_size": 10})


def test_shard_ids_are_content_hash_and_row_range(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 25)
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(source)])
        assert report.errors == {}
        assert report.new_shards == 3
        [planned] = report.sources
        assert planned.source_id == sha256_of(source)
        assert planned.num_rows == 25
        assert planned.uri == str(source)
        ranges = [(0, 10), (10, 20), (20, 25)]
        assert report.shard_ids == expected_ids(source, ranges)
        shards = [pipeline.state.get_shard(shard_id) for shard_id in report.shard_ids]
        assert [(s.row_start, s.row_end) for s in shards] == ranges
        assert [s.shard_index for s in shards] == [0, 1, 2]
        assert [s.num_rows for s in shards] == [10, 10, 5]
        assert {s.source_uri for s in shards} == {str(source)}
        assert shards[0].columns == {"url": "url", "caption": "caption", "sample_id": "id"}
        source_row = pipeline.state.find_source(planned.source_id)
        assert source_row is not None
        assert (source_row.num_rows, source_row.shard_size, source_row.name) == (
            25,
            10,
            "a.parquet",
        )
        assert source_row.size_bytes == source.stat().st_size


def test_exact_multiple_has_no_empty_shard(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 20)
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(source)])
    assert report.shard_ids == expected_ids(source, [(0, 10), (10, 20)])


def test_empty_source_has_no_shards(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "empty.parquet", 0)
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(source)])
        assert report.errors == {}
        assert report.shard_ids == [] and report.new_shards == 0
        assert pipeline.state.find_source(sha256_of(source)) is not None


def test_planning_again_registers_nothing(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 25)
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(source)])
        second = pipeline.plan([str(source)])
        assert first.new_shards == 3
        assert second.new_shards == 0
        assert second.shard_ids == first.shard_ids
        assert len(pipeline.state.list_shards()) == 3
    # A fresh connection (another process, later) sees the same thing.
    with Pipeline.open(small) as pipeline:
        assert pipeline.plan([str(source)]).new_shards == 0
        assert pipeline.select_shards() == first.shard_ids


def test_copied_file_is_the_same_source(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 25)
    copy = tmp_path / "elsewhere" / "renamed.parquet"
    copy.parent.mkdir()
    shutil.copyfile(source, copy)
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(source)])
        again = pipeline.plan([str(copy)])
        assert again.errors == {}
        assert again.new_shards == 0
        assert again.shard_ids == first.shard_ids
        assert len(pipeline.state.list_shards()) == 3
        # The source follows the file to where it was last planned from.
        assert pipeline.state.get_shard(first.shard_ids[0]).source_uri == str(copy)


def test_file_changed_in_place_is_refused_and_its_shards_are_not_read(
    tmp_path: Path, small: Settings
) -> None:
    source = write_rows(tmp_path / "a.parquet", 25)
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(source)])
        write_rows(source, 25, tag="edited")
        again = pipeline.plan([str(source)])
        assert again.sources == [] and list(again.errors) == [str(source)]
        assert "changed after it was planned as source" in again.errors[str(source)]
        assert [s.shard_id for s in pipeline.state.list_shards()] == first.shard_ids
        # the fetch stage does not read the old shard ids' rows from the new content
        with pytest.raises(SourceChangedError, match="changed after it was planned") as error:
            pipeline.run("fetch", first.shard_ids[0])
        assert is_permanent(error.value)
        assert pipeline.state.get_stage(first.shard_ids[0], "fetch").status == "failed"
        # the new content under a new name is a new source; the old shards stay unreadable
        renamed = source.rename(tmp_path / "a-v2.parquet")
        second = pipeline.plan([str(renamed)])
        assert second.errors == {} and second.new_shards == 3
        assert set(first.shard_ids).isdisjoint(second.shard_ids)
        with pytest.raises(SourceChangedError, match="not found"):
            pipeline.run("fetch", first.shard_ids[1])


def test_same_size_edit_with_its_mtime_put_back_is_still_caught(
    tmp_path: Path, small: Settings
) -> None:
    source = write_rows(tmp_path / "a.parquet", 25, tag="a")
    before = source.stat()
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(source)])
        write_rows(source, 25, tag="b")  # same length of every value: same size
        assert source.stat().st_size == before.st_size
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert "changed after it was planned" in pipeline.plan([str(source)]).errors[str(source)]
        with pytest.raises(SourceChangedError):
            pipeline.run("fetch", first.shard_ids[0])


def test_a_touched_but_unchanged_file_is_the_same_source(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 25)
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(source)])
        os.utime(source, ns=(1, 1))
        again = pipeline.plan([str(source)])
        assert again.errors == {} and again.shard_ids == first.shard_ids
        assert again.new_shards == 0
        # its new version is recorded: the shards read it without hashing it again
        shard = pipeline.state.get_shard(first.shard_ids[0])
        assert shard.source_version is not None and "mtime_ns=1;" in shard.source_version.modified
        assert pipeline.run("fetch", shard.shard_id).status == "done"


def test_replanning_an_unchanged_remote_file_reads_none_of_its_bytes(
    tmp_path: Path, small: Settings
) -> None:
    """Over HTTP as the Hub and object stores serve parquet (ETag, ranges): a HEAD tells the
    version; only a new or changed version is read."""
    data = write_rows(tmp_path / "a.parquet", 25, tag="a").read_bytes()
    with FileServer({"part-0.parquet": data}) as server, Pipeline.open(small) as pipeline:
        url = server.url("part-0.parquet")
        first = pipeline.plan([url])
        assert first.errors == {} and first.sources[0].source_id == hashlib.sha256(data).hexdigest()
        reads = server.reads()
        assert reads > 0
        again = pipeline.plan([url])
        assert again.errors == {} and again.shard_ids == first.shard_ids
        assert server.reads() == reads, "an unchanged file is planned from its HEAD alone"
        # the same size, other content: the ETag changes and the content hash settles it
        server.files["part-0.parquet"] = write_rows(
            tmp_path / "b.parquet", 25, tag="b"
        ).read_bytes()
        assert len(server.files["part-0.parquet"]) == len(data)
        changed = pipeline.plan([url])
        assert "changed after it was planned" in changed.errors[url]
        with pytest.raises(SourceChangedError):
            pipeline.run("fetch", first.shard_ids[0])
        server.files["part-0.parquet"] = data  # put back: readable again
        assert pipeline.plan([url]).errors == {}
        assert pipeline.run("fetch", first.shard_ids[0]).status == "done"


def test_second_file_adds_only_its_own_shards(tmp_path: Path, small: Settings) -> None:
    a = write_rows(tmp_path / "a.parquet", 25, tag="a")
    b = write_rows(tmp_path / "b.parquet", 12, tag="b")
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(a)])
        both = pipeline.plan([str(a), str(b)])
        assert both.errors == {}
        assert [s.new_shards for s in both.sources] == [0, 2]
        assert both.new_shards == 2
        assert both.shard_ids == first.shard_ids + expected_ids(b, [(0, 10), (10, 12)])
        assert len(pipeline.state.list_shards()) == 5
        assert pipeline.select_shards() == both.shard_ids


def test_missing_url_column_is_reported_and_other_files_still_planned(
    tmp_path: Path, small: Settings
) -> None:
    bad = write_rows(tmp_path / "bad.parquet", 5, url="link", caption="blurb")
    good = write_rows(tmp_path / "good.parquet", 15)
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(bad), str(good)])
        assert list(report.errors) == [str(bad)]
        message = report.errors[str(bad)]
        assert "url" in message and "URL" in message  # what it looked for
        assert "link" in message and "blurb" in message  # what the file has
        assert "FACECAPTION_COLUMNS__URL" in message
        assert [s.uri for s in report.sources] == [str(good)]
        assert report.shard_ids == expected_ids(good, [(0, 10), (10, 15)])
        assert pipeline.state.find_source(sha256_of(bad)) is None
        assert len(pipeline.state.list_shards()) == 2


def test_configured_url_column_is_used(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 5, url="link")
    custom = small.model_copy(
        update={"columns": small.columns.model_copy(update={"url": ["link"]})}
    )
    with Pipeline.open(custom) as pipeline:
        report = pipeline.plan([str(source)])
        assert report.errors == {}
        assert pipeline.state.get_shard(report.shard_ids[0]).columns["url"] == "link"


def test_laion_style_upper_case_columns_resolve(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 5, url="URL", caption="TEXT", sample_id="SAMPLE_ID")
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(source)])
        shard = pipeline.state.get_shard(report.shard_ids[0])
    assert shard.columns == {"url": "URL", "caption": "TEXT", "sample_id": "SAMPLE_ID"}


def test_optional_columns_may_be_absent(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 5, caption="", sample_id="")
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(source)])
        shard = pipeline.state.get_shard(report.shard_ids[0])
    assert shard.columns == {"url": "url", "caption": None, "sample_id": None}


def test_garbage_and_missing_files_are_errors_not_exceptions(
    tmp_path: Path, small: Settings
) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all\n" * 100)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    missing = tmp_path / "missing.parquet"
    good = write_rows(tmp_path / "good.parquet", 3)
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(garbage), str(missing), str(text), str(good)])
        assert set(report.errors) == {str(garbage), str(missing), str(text)}
        assert "not a readable parquet file" in report.errors[str(garbage)]
        assert "not a readable parquet file" in report.errors[str(text)]
        assert "not found" in report.errors[str(missing)]
        assert [s.uri for s in report.sources] == [str(good)]
        assert len(pipeline.state.list_shards()) == 1
        with pytest.raises(PlanError, match="not found"):
            pipeline.select_shards([str(missing)])


def test_folder_plans_every_parquet_in_it(tmp_path: Path, small: Settings) -> None:
    folder = tmp_path / "drop"
    b = write_rows(folder / "b.parquet", 12, tag="b")
    a = write_rows(folder / "a.parquet", 25, tag="a")
    (folder / "README.txt").write_text("not a source")
    write_rows(folder / "nested" / "c.parquet", 4, tag="c")
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(folder)])
        assert report.errors == {}
        assert [Path(s.uri).name for s in report.sources] == ["a.parquet", "b.parquet"]
        assert report.shard_ids == expected_ids(a, [(0, 10), (10, 20), (20, 25)]) + expected_ids(
            b, [(0, 10), (10, 12)]
        )
        assert report.new_shards == 5
        # A file and its folder name the same source.
        assert pipeline.plan([str(a)]).new_shards == 0


def test_glob_plans_matching_files(tmp_path: Path, small: Settings) -> None:
    write_rows(tmp_path / "part-1.parquet", 3, tag="1")
    write_rows(tmp_path / "part-2.parquet", 3, tag="2")
    write_rows(tmp_path / "other.parquet", 3, tag="o")
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(tmp_path / "part-*.parquet")])
    assert [Path(s.uri).name for s in report.sources] == ["part-1.parquet", "part-2.parquet"]


def test_empty_folder_is_an_error(tmp_path: Path, small: Settings) -> None:
    (tmp_path / "empty").mkdir()
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(tmp_path / "empty")])
    assert report.sources == []
    assert any("no parquet files" in error for error in report.errors.values())


def test_planned_source_keeps_its_shard_size(tmp_path: Path, small: Settings) -> None:
    a = write_rows(tmp_path / "a.parquet", 25, tag="a")
    b = write_rows(tmp_path / "b.parquet", 25, tag="b")
    with Pipeline.open(small) as pipeline:
        first = pipeline.plan([str(a)])
    bigger = small.model_copy(update={"shard_size": 7})
    with Pipeline.open(bigger) as pipeline:
        again = pipeline.plan([str(a), str(b)])
        assert again.errors == {}
        assert again.sources[0].shard_ids == first.shard_ids
        assert again.sources[0].new_shards == 0
        assert pipeline.state.find_source(sha256_of(a)).shard_size == 10
        # A new source is cut with the current setting.
        assert again.sources[1].shard_ids == expected_ids(b, [(0, 7), (7, 14), (14, 21), (21, 25)])
        assert pipeline.state.find_source(sha256_of(b)).shard_size == 7
        assert len(pipeline.state.list_shards()) == 7


def test_select_shards(tmp_path: Path, small: Settings) -> None:
    a = write_rows(tmp_path / "a.parquet", 25, tag="a")
    b = write_rows(tmp_path / "b.parquet", 5, tag="b")
    with Pipeline.open(small) as pipeline:
        assert pipeline.select_shards() == []
        ids_a = pipeline.select_shards([str(a)])
        ids_b = pipeline.select_shards([str(b)])
        assert len(ids_a) == 3 and len(ids_b) == 1
        assert pipeline.select_shards() == ids_a + ids_b
        assert pipeline.select_shards(shard_ids=[ids_b[0], ids_a[1], ids_b[0]]) == [
            ids_b[0],
            ids_a[1],
        ]
        with pytest.raises(UnknownShardError):
            pipeline.select_shards(shard_ids=[ids_a[0], "nope_000000000_000000010"])


def test_shards_cover_the_source_exactly(tmp_path: Path, small: Settings) -> None:
    source = write_rows(tmp_path / "a.parquet", 25, url="URL", caption="TEXT")
    with Pipeline.open(small) as pipeline:
        shards = [pipeline.state.get_shard(i) for i in pipeline.select_shards([str(source)])]
    urls = []
    for shard in shards:
        batches = list(iter_rows(shard.source_uri, shard.columns, shard.row_start, shard.row_end))
        table = pa.Table.from_batches(batches)
        assert table.num_rows == shard.num_rows
        urls += table.column("url").to_pylist()
    assert urls == pq.read_table(source).column("URL").to_pylist()


# -- iter_rows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same 5000 rows written with several row group sizes."""
    folder = tmp_path_factory.mktemp("grouped")
    table = pa.table(
        {
            "URL": [f"http://example.test/{i}.jpg" for i in range(5000)],
            "TEXT": [f"caption {i}" for i in range(5000)],
            "other": list(range(5000)),
        }
    )
    paths = {}
    for size in (100, 333, 5000):
        paths[size] = folder / f"rg{size}.parquet"
        pq.write_table(table, paths[size], row_group_size=size)
    return paths


COLUMNS = {"url": "URL", "caption": "TEXT", "sample_id": None}


def read_range(path: Path, start: int, end: int, columns: dict = COLUMNS) -> pa.Table:
    batches = list(iter_rows(str(path), columns, start, end))
    if not batches:
        return pa.table({role: pa.array([], pa.string()) for role in columns})
    return pa.Table.from_batches(batches)


def test_many_small_row_groups_file_really_has_them(grouped: dict[int, Path]) -> None:
    assert pq.ParquetFile(grouped[100]).metadata.num_row_groups == 50


def test_iter_rows_returns_exact_range_renamed_to_roles(grouped: dict[int, Path]) -> None:
    table = read_range(grouped[100], 1234, 1300)
    assert set(table.column_names) == {"url", "caption", "sample_id"}
    assert table.num_rows == 66
    assert table.column("url").to_pylist() == [
        f"http://example.test/{i}.jpg" for i in range(1234, 1300)
    ]
    assert table.column("caption").to_pylist() == [f"caption {i}" for i in range(1234, 1300)]
    assert table.column("sample_id").null_count == 66
    assert table.column("sample_id").type == pa.string()


@pytest.mark.parametrize("group_size", [100, 333, 5000])
@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, 1),
        (1234, 1300),
        (99, 101),  # one row either side of a boundary
        (100, 200),  # exactly one row group
        (95, 4205),  # many groups and more than one read batch
        (0, 5000),
        (4990, 5000),
        (4990, 6000),  # past the end: what exists
        (777, 777),  # empty
    ],
)
def test_iter_rows_ranges_across_row_groups(
    grouped: dict[int, Path], group_size: int, start: int, end: int
) -> None:
    table = read_range(grouped[group_size], start, end)
    stop = min(end, 5000)
    assert table.num_rows == stop - start
    assert table.column("url").to_pylist() == [
        f"http://example.test/{i}.jpg" for i in range(start, stop)
    ]
    assert table.column("caption").to_pylist() == [f"caption {i}" for i in range(start, stop)]


def test_iter_rows_past_the_end_yields_nothing(grouped: dict[int, Path]) -> None:
    assert list(iter_rows(str(grouped[100]), COLUMNS, 5000, 5100)) == []


def test_iter_rows_reads_only_wanted_columns(grouped: dict[int, Path]) -> None:
    table = read_range(grouped[333], 10, 20, {"url": "URL", "sample_id": "other"})
    assert set(table.column_names) == {"url", "sample_id"}
    assert table.column("sample_id").to_pylist() == list(range(10, 20))


def test_empty_folder_does_not_stop_other_sources(tmp_path: Path, small: Settings) -> None:
    good = write_rows(tmp_path / "good.parquet", 3)
    (tmp_path / "empty").mkdir()
    with Pipeline.open(small) as pipeline:
        report = pipeline.plan([str(good), str(tmp_path / "empty")])
    assert [s.uri for s in report.sources] == [str(good)]
    assert list(report.errors) == [str(tmp_path / "empty")]
