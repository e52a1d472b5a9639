"""The memory-mapped store: exact rows, packing plans equal to the plain algorithm, restartable builds, flat memory."""

import bisect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from conftest import REPO
from train.batching.layout import Layout
from train.data import store
from train.data.store import IGNORE_INDEX, Example, PackedStore, TokenStore, TokenTable


def plain_best_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """The same best-fit-decreasing plan computed the plain way (a sorted list of open rows): the reference."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - lengths[index] > 0:
            bisect.insort(free, (room - lengths[index], row))
    return rows


@pytest.mark.parametrize("max_length", [8, 64, 512])
def test_pack_plan_equals_the_plain_algorithm(max_length):
    rng = np.random.default_rng(max_length)
    lengths = np.minimum(rng.lognormal(np.log(max_length / 4), 0.8, 3000).astype(np.int64) + 1, max_length)
    members, row_starts = store.pack_plan(lengths, max_length)
    rows = [members[a:b].tolist() for a, b in zip(row_starts[:-1], row_starts[1:], strict=True)]
    assert rows == plain_best_fit_decreasing(lengths.tolist(), max_length)
    assert sorted(members.tolist()) == list(range(len(lengths)))  # every example exactly once
    assert max(lengths[r].sum() for r in rows) <= max_length


def write_table(folder, kind, columns: dict[str, list], shard_rows: int) -> TokenTable:
    """A complete cache folder holding `columns`, in shards of `shard_rows`, written the way preprocessing does."""
    directory = store.shards_directory(folder)
    directory.mkdir(parents=True)
    n = len(next(iter(columns.values())))
    for index, start in enumerate(range(0, n, shard_rows)):
        part = {name: values[start : start + shard_rows] for name, values in columns.items()}
        table = pa.Table.from_pydict(part, schema=store.schema(kind))
        store.write_shard(directory, index, table, {"rows": table.num_rows})
    store.finish_folder(folder, {"rows": n})
    return TokenTable(folder, kind)


def test_gather_select_and_pack_return_exact_rows(tmp_path):
    ids = [list(range(10 * i, 10 * i + 2 + i % 5)) for i in range(23)]
    labels = [[IGNORE_INDEX] + row[1:] for row in ids]
    table = write_table(tmp_path / "key", "sft", {"input_ids": ids, "labels": labels, "source": [0] * 23}, 5)
    data = TokenStore(table)
    assert len(data) == 23 and data.lengths().tolist() == [len(r) for r in ids]
    assert data.gather([7, 2, 7]) == [Example(ids[i], labels[i]) for i in (7, 2, 7)]
    view = data.select(np.array([22, 0, 5]))
    assert [e.input_ids for e in view] == [ids[22], ids[0], ids[5]] and view[-1].input_ids == ids[5]
    # every store carries the layout its batches are collated in; a view keeps it
    shared = data.with_layout(Layout.SHARED_PROMPT)
    assert data.layout is Layout.PADDED and shared.select(np.array([1])).layout is Layout.SHARED_PROMPT
    with pytest.raises(ValueError, match="pack it"):
        data.with_layout(Layout.PACKED)
    packed = store.pack(data, max_length=12)
    assert packed.layout is Layout.PACKED and packed.examples is data
    assert isinstance(packed, PackedStore) and packed.lengths().sum() == sum(map(len, ids))
    for row, members in zip(packed[:], np.split(packed.members, packed.row_starts[1:-1]), strict=True):
        assert row.input_ids == [t for m in members for t in ids[m]]
        assert row.lengths == [len(ids[m]) for m in members]
    again = store.pack(data, max_length=12)  # read back from the cached plan
    assert again.fingerprint() == packed.fingerprint() and len(list((tmp_path / "key" / "plans").iterdir())) == 1


def test_paired_and_unpaired_rows_and_reference(tmp_path):
    pair = {
        "chosen_input_ids": [[1, 2], [3]],
        "chosen_labels": [[-100, 2], [3]],
        "rejected_input_ids": [[1, 4, 5], [6]],
    }
    pair.update(rejected_labels=[[-100, 4, 5], [6]], margin=[None, 1.5], source=[0, 0])
    data = TokenStore(write_table(tmp_path / "p", "paired", pair, 1))
    assert data.lengths().tolist() == [5, 2]
    data.reference = np.array([[-1.0, -2.0], [-3.0, -4.0]], dtype=np.float32)
    second = data.select(np.array([1]))[0]
    assert (second.chosen.input_ids, second.rejected.labels, second.reference_rejected) == ([3], [6], -4.0)
    assert [p.margin for p in data[:]] == [None, 1.5]
    unpaired = {"input_ids": [[1, 2], [3, 4]], "labels": [[-100, 2], [-100, 4]], "desirable": [True, False]}
    items = TokenStore(write_table(tmp_path / "u", "unpaired", {**unpaired, "source": [0, 1]}, 2))[:]
    assert [(i.example.input_ids, i.desirable) for i in items] == [([1, 2], True), ([3, 4], False)]


def test_fingerprint_reads_no_token_and_sees_the_selection(tmp_path):
    table = write_table(tmp_path / "key", "sft", {"input_ids": [[1], [2]], "labels": [[1], [2]], "source": [0, 0]}, 2)
    data = TokenStore(table)
    expected = data.fingerprint()

    class NoTokens:
        def __getattr__(self, name):
            raise AssertionError(f"the fingerprint read the table ({name})")

    table.table = NoTokens()
    assert data.fingerprint() == expected
    assert data.select(np.array([1, 0])).fingerprint() != expected
    table.key = "another-cache-key"  # a changed file, tokenizer or setting changes the cache key
    assert data.fingerprint() != expected


def test_an_interrupted_build_restarts_from_its_finished_shards(tmp_path):
    shards = [[[i] * 3 for i in range(s * 4, s * 4 + 4)] for s in range(5)]  # 5 shards of 4 rows
    tokenized = []

    def tokenize(rows):
        tokenized.append(rows[0][0])
        if rows[0][0] == 12 and len(tokenized) < 5:
            raise KeyboardInterrupt  # killed while tokenizing shard 3
        return {"input_ids": rows, "labels": rows, "source": [0] * len(rows)}, {"rows": len(rows)}

    folder = tmp_path / "key"
    with pytest.raises(KeyboardInterrupt):
        store.build_folder(folder, iter(shards), tokenize, "sft", num_proc=1, must_stop=lambda report: False)
    assert not store.is_complete(folder)
    reports, read_all = store.build_folder(folder, iter(shards), tokenize, "sft", 1, lambda report: False)
    assert read_all and len(reports) == 5 and tokenized == [0, 4, 8, 12, 12, 16]  # shards 0-2 were not redone
    store.finish_folder(folder, {})
    assert [e.input_ids for e in TokenStore(TokenTable(folder, "sft"))] == [row for s in shards for row in s]


MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import pyarrow as pa
    sys.path.insert(0, REPO)
    from train.batching.plan import BatchPlan
    from train.batching.collate import collate_packed
    from train.data.store import TokenStore, TokenTable, pack

    def private_mb():
        # Anonymous memory: what this process holds for itself. Pages of the memory-mapped shards it reads also
        # count in RSS, but they are the machine's shared, evictable page cache, one copy for every process.
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["RssAnon"].split()[0]) / 1024

    before = private_mb()
    data = TokenStore(TokenTable(Path(sys.argv[1]), "sft"))
    data = data.select(np.random.default_rng(0).permutation(len(data))[: len(data) - 1000])  # a cap
    packed = pack(data, max_length=512)
    plan = BatchPlan(len(packed), batch_size=8, n_processes=2, rank=1, accumulation_steps=2, seed=0,
                     lengths=packed.lengths())
    for step in range(20):
        for positions in plan.micro_batches(step)[1]:
            collate_packed(packed.gather(positions), 0)
    fingerprint = packed.fingerprint()
    print(json.dumps({"private_growth_mb": private_mb() - before, "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
                      "examples": len(data), "rows": len(packed)}))
    """
)


def test_memory_stays_flat_however_large_the_data(tmp_path):
    """30M tokens: as Python lists they would take over 2 GB in every process; the store must stay far below."""
    n_rows, length = 400_000, 75
    rng = np.random.default_rng(0)
    folder = tmp_path / "key"
    directory = store.shards_directory(folder)
    directory.mkdir(parents=True)
    list_type = pa.list_(pa.int32())
    for index in range(n_rows // 50_000):
        tokens = pa.array(rng.integers(0, 49152, 50_000 * length, dtype=np.int32))
        offsets = pa.array(np.arange(0, 50_000 * length + 1, length, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, tokens, type=list_type)
        sources = pa.array(np.zeros(50_000, dtype=np.int32))
        store.write_shard(directory, index, pa.table([column, column, sources], schema=store.schema("sft")), {})
    store.finish_folder(folder, {"rows": n_rows})
    child = MEMORY_CHILD.replace("REPO", repr(str(REPO)))
    result = subprocess.run([sys.executable, "-c", child, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        report["examples"] == n_rows - 1000 and report["rows"] == (n_rows - 1000) // 6
    )  # 6 examples of 75 tokens per 512-token row
    # Tokens as Python lists: over 2,000 MB held; one token column concatenated by Arrow: 115 MB at its peak.
    assert report["private_growth_mb"] < 150 and report["arrow_peak_mb"] < 20, report
