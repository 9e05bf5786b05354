"""Adapter registry: loading on demand, LRU eviction (count, bytes), pinning, reload on change, unload,
path safety, corrupt files, thread safety with requests in flight, and classifier heads of different sizes."""

import concurrent.futures
import json
import os
import random
import shutil
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.serve.registry import AdapterNotFound, AdapterRegistry, BadAdapter  # noqa: E402
from tests import serve_models as sm  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model_dir = sm.bert_dir(root)
    adapters = root / "adapters"
    for i, name in enumerate("abcdef"):
        sm.make_adapter(model_dir, adapters / name, seed=i, r=2 + i)
    return model_dir, adapters


def _registry(bert, tmp_path, **kw):
    model_dir, adapters = bert
    local = tmp_path / "adapters"
    shutil.copytree(adapters, local)
    return AdapterRegistry(sm.load(model_dir), local, **kw), local


def _attached(reg):
    return set(lorafit.adapter_configs(reg.model))


def _logits(reg, entry, ids):
    with reg.model_lock, torch.no_grad(), lorafit.adapter_per_row(reg.model, [entry.internal] * len(ids)):
        return reg.model(input_ids=ids).logits


def test_lru_eviction_by_count_and_pinning(bert, tmp_path):
    reg, _ = _registry(bert, tmp_path, max_adapters=2)
    for name in "abc":
        reg.release(reg.acquire(name))
    assert [e.name for e in reg.loaded()] == ["b", "c"]
    assert len(_attached(reg)) == 2 and reg.stats["evictions"] == 1
    reg.release(reg.acquire("b"))  # b is now the most recently used: d evicts c
    reg.release(reg.acquire("d"))
    assert [e.name for e in reg.loaded()] == ["b", "d"]
    reg.load("a", pin=True)
    for name in "cef":
        reg.release(reg.acquire(name))
    names = [e.name for e in reg.loaded()]
    assert "a" in names and len(names) == 2 and names[-1] == "f"
    rows = {r["name"]: r for r in reg.describe()}
    assert rows["a"]["pinned"] and rows["a"]["loaded"] and rows["b"]["hits"] == 2 and not rows["c"]["loaded"]
    assert rows["d"]["rank"] == 5 and rows["d"]["size_bytes"] > 0


def test_eviction_by_bytes(bert, tmp_path):
    reg, _ = _registry(bert, tmp_path)
    size = reg.load("f").nbytes  # the largest (r=7)
    reg.unload("f")
    reg.max_bytes = size + 1
    reg.load("a")
    reg.load("b")
    assert reg.bytes_loaded() <= size + 1
    reg.load("f")
    assert [e.name for e in reg.loaded()] == ["f"]


def test_reload_on_change_keeps_in_flight_version(bert, tmp_path):
    reg, local = _registry(bert, tmp_path)
    ids = torch.randint(4, 30, (2, 6))
    first = reg.acquire("a")
    before = _logits(reg, first, ids)
    assert reg.acquire("a") is first  # unchanged files: same version, no reload
    reg.release(first)
    # replace a's files by b's: a different content hash
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(local / "b" / f, local / "a" / f)
        os.utime(local / "a" / f, ns=(1, 1))
    second = reg.acquire("a")
    assert second is not first and second.digest != first.digest and reg.stats["reloads"] == 1
    assert first.internal in _attached(reg)  # still in flight: kept
    torch.testing.assert_close(_logits(reg, first, ids), before)
    expected = _logits(reg, reg.acquire("b"), ids)
    torch.testing.assert_close(_logits(reg, second, ids), expected)
    reg.release(first)
    assert first.internal not in _attached(reg)
    # touched but identical content: no reload
    os.utime(local / "a" / "adapter_model.safetensors", ns=(2, 2))
    assert reg.acquire("a") is second


def test_unload_waits_for_requests_in_flight(bert, tmp_path):
    reg, _ = _registry(bert, tmp_path)
    entry = reg.acquire("c")
    assert reg.unload("c") and not reg.unload("c")
    assert entry.internal in _attached(reg) and "c" not in [e.name for e in reg.loaded()]
    reg.release(entry)
    assert entry.internal not in _attached(reg)
    again = reg.acquire("c")  # the files are still there: loads again on the next request
    assert again is not entry and again.internal in _attached(reg)


@pytest.mark.parametrize("name", ["../../etc", "..", ".", "a/b", "", "a b", "a\\b", "%2e%2e", "x" * 201])
def test_names_outside_the_directory_are_refused(bert, tmp_path, name):
    reg, _ = _registry(bert, tmp_path)
    with pytest.raises((ValueError, AdapterNotFound)):
        reg.acquire(name)
    assert not _attached(reg)


def test_symlink_out_of_the_directory_is_refused(bert, tmp_path):
    reg, local = _registry(bert, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(local / "a", outside)
    (local / "escape").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        reg.acquire("escape")
    assert "escape" not in reg.available()


def test_missing_and_corrupt_adapters(bert, tmp_path):
    reg, local = _registry(bert, tmp_path)
    with pytest.raises(AdapterNotFound):
        reg.acquire("nope")
    bad = local / "bad"
    shutil.copytree(local / "a", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BadAdapter, match="safetensors"):
        reg.acquire("bad")
    wrong = local / "wrong"
    shutil.copytree(local / "a", wrong)
    from safetensors.torch import load_file, save_file
    tensors = load_file(wrong / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(BadAdapter, match="shape"):
        reg.acquire("wrong")
    assert not _attached(reg)  # nothing half-attached
    for field, value in (("target_parameters", ["mlp.experts.gate_up_proj"]), ("layer_replication", [[0, 1], [0, 1]]),
                         ("kasa_config", {"beta": 1e-4, "gamma": 1e-3})):
        unsupported = local / field
        shutil.copytree(local / "a", unsupported)
        config = json.loads((unsupported / "adapter_config.json").read_text())
        config.update({field: value, "lora_dropout": 0.0})
        (unsupported / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(BadAdapter, match=f"{field}, which lorafit serve does not support"):
            reg.acquire(field)
        assert not _attached(reg)
    rewrites = local / "pissa"  # loading it would rewrite the base weights under every other adapter
    shutil.copytree(local / "a", rewrites)
    config = json.loads((rewrites / "adapter_config.json").read_text())
    (rewrites / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    weights = {n: p.clone() for n, p in reg.model.named_parameters()}
    with pytest.raises(BadAdapter, match="init_lora_weights='pissa' rewrites the base weights when loaded"):
        reg.acquire("pissa")
    assert all(torch.equal(weights[n], p) for n, p in reg.model.named_parameters())
    reg.release(reg.acquire("a"))  # and the registry keeps working


def test_thread_safety_under_load_unload_and_eviction(bert, tmp_path):
    """Eight threads run forwards on random adapters while another loads and unloads; every output is right."""
    reg, _ = _registry(bert, tmp_path, max_adapters=3)
    ids = torch.randint(4, 30, (1, 5))
    reference = {}
    for name in "abcdef":
        entry = reg.acquire(name)
        reference[name] = _logits(reg, entry, ids)
        reg.release(entry)
    errors, checked = [], [0]
    stop = threading.Event()

    def worker(seed):
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                names = [rnd.choice("abcdef") for _ in range(3)]
                entries = [reg.acquire(n) for n in names]
                try:
                    with reg.model_lock, torch.no_grad(), lorafit.adapter_per_row(
                            reg.model, [e.internal for e in entries]):
                        out = reg.model(input_ids=ids.expand(3, -1)).logits
                finally:
                    for e in entries:
                        reg.release(e)
                for row, name in enumerate(names):
                    torch.testing.assert_close(out[row:row + 1], reference[name], atol=1e-5, rtol=1e-5)
                checked[0] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def churn():
        rnd = random.Random(99)
        try:
            while not stop.is_set():
                name = rnd.choice("abcdef")
                if rnd.random() < 0.5:
                    reg.unload(name)
                else:
                    reg.load(name, pin=rnd.random() < 0.2)
                    reg.load(name, pin=False)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    stop.wait(4.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert checked[0] > 20
    # afterwards: nothing in flight, so exactly the loaded versions are attached
    assert _attached(reg) == {e.internal for e in reg.loaded()}
    assert len(reg.loaded()) <= 3


def test_heads_of_different_sizes_share_the_server_not_a_batch(bert, tmp_path):
    """2- and 4-class heads on a 3-class base: each batched forward holds one head shape; every
    result has its adapter's number of classes and equals that adapter alone."""
    from lorafit.serve.engine import Batcher, ClassifyRow, Job, classify_batch

    model_dir, _ = bert
    adapters = tmp_path / "adapters"
    for name, k in (("two", 2), ("four", 4), ("four-b", 4)):
        sm.make_adapter(model_dir, adapters / name, seed=k + len(name), num_labels=k,
                        labels=["neg", "pos"] if k == 2 else None)
    reg = AdapterRegistry(sm.load(model_dir), adapters)
    tok = sm.tokenizer(causal=False)
    texts = {"two": ["great fun", "bad"], "four": ["the plot"], None: ["it was boring", "loved it"],
             "four-b": ["music and story", "hello", "what"]}
    order = ["two", "four", None, "four-b", "two", "four"]
    entries = [reg.acquire(n) if n else None for n in order]
    assert entries[0].head and entries[1].head == entries[3].head != entries[0].head and entries[2] is None
    jobs = [Job(rows=len(texts[n]), payload=[ClassifyRow(t) for t in texts[n]], entry=e)
            for n, e in zip(order, entries)]
    name_of = {id(job): n for job, n in zip(jobs, order)}
    batches = []

    def run(batch):
        batches.append([name_of[id(job)] for job in batch])
        return classify_batch(reg.model, tok, reg.model_lock, 32, batch)

    batcher = Batcher(run, reg, max_wait=1.0)  # every job is queued before the first batch is taken
    results = [f.result(timeout=60) for f in [batcher.submit(job) for job in jobs]]
    batcher.close()
    assert batches == [["two", "two"], ["four", "four-b", "four"], [None]]  # grouped, each in arrival order
    for name, rows in zip(order, results):
        model = sm.load(model_dir)
        if name:
            lorafit.load_adapter(model, adapters / name)
        with torch.no_grad():
            expected = model(**tok(texts[name], padding=True, return_tensors="pt")).logits.softmax(-1)
        got = torch.tensor([list(r["probabilities"].values()) for r in rows])
        assert got.shape == expected.shape == (len(texts[name]), {"two": 2, None: 3}.get(name, 4))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert set(rows[0]["probabilities"]) == ({"neg", "pos"} if name == "two" else
                                                 {f"LABEL_{i}" for i in range(got.shape[1])})


def _write_in_place(path, data, how):
    """Rewrite ``path`` keeping its inode, as `cp` does: truncate then write in pieces, only truncate,
    or overwrite the start without truncating."""
    if how == "truncate":
        os.truncate(path, len(data) // 3)
        return
    with open(path, "r+b" if how == "partial" else "wb") as fh:
        for i in range(0, len(data) // 2 if how == "partial" else len(data), 997):
            fh.write(data[i:i + 997])
            fh.flush()


def test_a_job_cancelled_while_queued_gives_its_adapter_back_at_once(bert, tmp_path):
    """While the worker is busy, a queued job that is cancelled leaves the queue and releases its adapter
    reference right away (so an unload or eviction need not wait for the batcher); it never runs."""
    from lorafit.serve.engine import Batcher, Job

    model_dir, adapters = bert
    reg = AdapterRegistry(sm.load(model_dir), adapters)
    busy, go, ran = threading.Event(), threading.Event(), []

    def run(batch):
        ran.extend(batch)
        busy.set()
        go.wait(30)
        return [None] * len(batch)

    batcher = Batcher(run, reg, max_wait=0.0)
    first = Job(rows=1, payload=None, entry=None)
    batcher.submit(first)
    assert busy.wait(30)
    entry = reg.acquire(sorted(p.name for p in adapters.iterdir())[0])
    queued = Job(rows=3, payload=None, entry=entry)
    future = batcher.submit(queued)
    assert batcher.pending() == 1 and entry.refs == 1
    batcher.cancel(queued)
    assert batcher.pending() == 0 and entry.refs == 0 and future.cancelled()
    batcher.cancel(queued)  # again: nothing more to give back
    assert entry.refs == 0
    go.set()
    batcher.close(30)
    assert ran == [first]
    batcher.cancel(first)  # done: a no-op
    assert first.future.result() is None


def test_the_batcher_survives_its_queue_emptied_by_cancels_while_it_waits(bert):
    """The worker waits max_wait for more rows; cancelling every queued job meanwhile leaves it nothing to
    take, and it must go back to waiting, not fail, so that a later job still runs."""
    from lorafit.serve.engine import Batcher, Job

    model_dir, adapters = bert
    reg = AdapterRegistry(sm.load(model_dir), adapters)
    batcher = Batcher(lambda batch: [len(batch)] * len(batch), reg, max_wait=0.3)
    for _ in range(3):
        job = Job(rows=1, payload=None, entry=None)
        batcher.submit(job)
        time.sleep(0.05)  # the worker is inside its max_wait
        batcher.cancel(job)
        assert batcher.pending() == 0
    time.sleep(0.4)  # past the deadline of the cancelled jobs
    later = Job(rows=1, payload=None, entry=None)
    assert batcher.submit(later).result(timeout=10) == 1
    batcher.close(10)


def test_a_running_batch_takes_in_queued_jobs_of_its_head_in_arrival_order(bert):
    """take_more (continuous batching) takes the jobs at the front of the queue with the batch's head, within
    the room; it stops at a job of another head, which goes next; the jobs it took are answered by the batch
    (or get its error), and their adapter references are given back with the batch's."""
    from lorafit.serve.engine import Batcher, Job

    model_dir, adapters = bert
    reg = AdapterRegistry(sm.load(model_dir), adapters)
    started, go, took = threading.Event(), threading.Event(), []

    class Headed(Job):
        def __init__(self, head, rows=1, entry=None):
            super().__init__(rows=rows, payload=None, entry=entry)
            self._head = head

        @property
        def head(self):
            return self._head

    def run(batch):
        if not started.is_set():  # the first batch
            started.set()
            go.wait(30)
            took.extend(batcher.take_more(("x",), 3))
            for job in took[:-1]:
                job.future.set_result("joined")  # the last one is left unanswered by this run
        return ["own"] * len(batch)

    batcher = Batcher(run, reg, max_wait=0.0)
    first = batcher.submit(Headed(("x",)))
    assert started.wait(30)
    entry = reg.acquire(sorted(p.name for p in adapters.iterdir())[0])
    queued = [Headed(("x",), entry=entry), Headed(("x",), rows=2), Headed(("x",)), Headed(("y",)), Headed(("x",))]
    for job in queued:
        batcher.submit(job)
    go.set()
    assert first.result(10) == "own"
    assert took == queued[:2]  # 3 rows of room: the third x job would make 4
    assert queued[0].future.result(10) == "joined" and entry.refs == 0
    with pytest.raises(RuntimeError, match="ended without it"):
        queued[1].future.result(10)
    assert [j.future.result(10) for j in queued[2:]] == ["own"] * 3  # x's next batch stopped at y, y, then x
    batcher.close(10)


def test_files_rewritten_in_place_under_requests(bert, tmp_path):
    """One thread rewrites a's files in place (copy, truncate, partial write) between the contents of
    a (r=2) and b (r=3) while others run forwards: no crash and no error; every output is a's or b's;
    once writing stops the last written version is served."""
    reg, local = _registry(bert, tmp_path)
    ids = torch.randint(4, 30, (1, 5))
    contents = {n: {f: (local / n / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
                for n in "ab"}
    reference = {}
    for name in "ab":
        entry = reg.acquire(name)
        reference[name] = _logits(reg, entry, ids)
        reg.release(entry)
    reg.unload("b")
    errors, seen = [], {"a": 0, "b": 0}
    stop = threading.Event()

    def requests():
        try:
            while not stop.is_set():
                entry = reg.acquire("a")
                try:
                    out = _logits(reg, entry, ids)
                finally:
                    reg.release(entry)
                match = [n for n in "ab" if torch.allclose(out, reference[n], atol=1e-5, rtol=1e-5)]
                assert match, "an output that is neither a's nor b's"
                seen[match[0]] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=requests) for _ in range(4)]
    for t in threads:
        t.start()
    rnd = random.Random(0)
    last = "a"
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        last = rnd.choice("ab")
        how = rnd.choice(["copy", "truncate", "partial"])
        for f, data in contents[last].items():
            _write_in_place(local / "a" / f, data, how)
        if how != "copy":  # finish the copy, as the next `cp` would
            for f, data in contents[last].items():
                _write_in_place(local / "a" / f, data, "copy")
        time.sleep(rnd.random() * 0.01)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert seen["a"] + seen["b"] > 20 and reg.stats["load_failures"] > 0
    entry = reg.acquire("a")
    torch.testing.assert_close(_logits(reg, entry, ids), reference[last], atol=1e-5, rtol=1e-5)
    reg.release(entry)


def test_a_version_is_hashed_and_parsed_from_the_same_bytes(bert, tmp_path, monkeypatch):
    """Files replaced right after they were read (while they are parsed): the version loaded is the bytes
    read (with their hash), and the next change check loads the new files instead of keeping the old weights."""
    reg, local = _registry(bert, tmp_path)
    ids = torch.randint(4, 30, (1, 5))
    expected_b = _logits(reg, reg.acquire("b"), ids)
    parse = lorafit.parse_adapter

    def replace_then_parse(config, weights, source="adapter"):
        if source == "a":
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(local / "b" / f, local / "a" / f)
        return parse(config, weights, source=source)

    monkeypatch.setattr(lorafit, "parse_adapter", replace_then_parse)
    first = reg.acquire("a")
    reg.release(first)
    monkeypatch.undo()
    model = sm.load(bert[0])
    lorafit.load_adapter(model, bert[1] / "a")
    with torch.no_grad():
        torch.testing.assert_close(_logits(reg, first, ids), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    second = reg.acquire("a")
    assert second is not first and second.digest != first.digest
    torch.testing.assert_close(_logits(reg, second, ids), expected_b, atol=1e-5, rtol=1e-5)
    assert reg.load("a") is second  # an explicit reload finds nothing new


def test_failed_reload_keeps_the_last_good_version(bert, tmp_path, caplog):
    reg, local = _registry(bert, tmp_path)
    ids = torch.randint(4, 30, (1, 5))
    first = reg.acquire("a")
    reg.release(first)
    weights = local / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a copy in progress
    with caplog.at_level("WARNING", logger="lorafit.serve"):
        assert reg.acquire("a") is first
    reg.release(first)
    assert reg.stats["load_failures"] == 1 and "safetensors" in caplog.text
    with pytest.raises(BadAdapter, match="safetensors"):  # asked for explicitly: the failure is the answer
        reg.load("a")
    assert [e.name for e in reg.loaded()] == ["a"] and first.internal in _attached(reg)
    shutil.copy(local / "b" / "adapter_config.json", local / "a" / "adapter_config.json")
    shutil.copy(local / "b" / "adapter_model.safetensors", weights)  # the copy has finished: retried
    second = reg.acquire("a")
    assert second is not first
    torch.testing.assert_close(_logits(reg, second, ids), _logits(reg, reg.acquire("b"), ids))


def test_labels_json_is_checked_and_part_of_the_change_check(bert, tmp_path):
    model_dir, _ = bert
    adapters = tmp_path / "adapters"
    sm.make_adapter(model_dir, adapters / "two", seed=1, num_labels=2, labels=["neg", "pos"])
    reg = AdapterRegistry(sm.load(model_dir), adapters)
    first = reg.acquire("two")
    assert first.labels == ["neg", "pos"]
    reg.release(first)
    (adapters / "two" / "labels.json").write_text('["negative", "positive"]')
    second = reg.acquire("two")
    assert second is not first and second.labels == ["negative", "positive"]
    reg.release(second)
    reg.unload("two")
    (adapters / "two" / "labels.json").write_text('["a", "b", "c"]')  # the head has 2 outputs
    with pytest.raises(BadAdapter, match="labels.json names 3 classes but the classifier head has 2"):
        reg.acquire("two")
    assert not _attached(reg)


def test_a_failed_load_does_not_pin(bert, tmp_path):
    reg, local = _registry(bert, tmp_path)
    weights = local / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"broken")
    with pytest.raises(BadAdapter):
        reg.load("a", pin=True)
    weights.write_bytes(good)
    entry = reg.acquire("a")
    assert not entry.pinned and not reg.describe()[0]["pinned"]


def test_errors_name_no_server_paths(bert, tmp_path):
    reg, local = _registry(bert, tmp_path)
    (local / "a" / "adapter_model.safetensors").unlink()
    (local / "b" / "adapter_model.safetensors").write_bytes(b"broken")
    for name in "ab":
        with pytest.raises(BadAdapter) as info:
            reg.acquire(name)
        assert str(tmp_path) not in str(info.value) and f"{name}/adapter_model.safetensors" in str(info.value)
    with pytest.raises(AdapterNotFound) as info:
        reg.acquire("nope")
    assert str(tmp_path) not in str(info.value)


def _live_tensor_bytes(reg) -> int:
    """Bytes of every distinct storage a live tensor object holds (after a full collection), less the
    loaded adapters' weights, without the batched stacks (a cache, bounded on its own)."""
    import gc

    from lorafit.batched import clear_stacks

    clear_stacks(reg.model)
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type != "meta":  # type(): no lazy module's __class__
            try:
                s = obj.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # a fake tensor left by an earlier test's torch.compile: it holds no memory
                continue
    return sum(storages.values()) - sum(e.nbytes for e in reg.loaded())


def test_retired_versions_leave_no_references(bert, tmp_path):
    """Soak: three threads send requests through the batcher (some cancelled while queued) over six
    adapters while this thread unloads, loads, rewrites files (new versions) and evicts (at most 3
    loaded). Afterwards every retired version's factors and head are freed (weak references dead),
    only the loaded versions are attached, and the live tensor bytes beside the loaded adapters' own are
    where they were before."""
    import gc
    import weakref

    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    from lorafit.model import lora_layers, saved_modules
    from lorafit.serve.app import Limits
    from lorafit.serve.engine import ClassifyRow, Job
    from lorafit.serve.server import build_service

    model_dir, adapters = bert
    local = tmp_path / "adapters"
    shutil.copytree(adapters, local)
    names = list("abcdef")
    variants = {n: (adapters / n, sm.make_adapter(model_dir, tmp_path / "twins" / n, seed=50 + i, r=2 + i))
                for i, n in enumerate(names)}  # the fixture's ranks: the same config, other weights
    service = build_service(str(model_dir), local, max_adapters=3, limits=Limits(max_wait_ms=1))
    reg, model = service.registry, service.model
    versions = {}  # internal name -> weak references to its factors, head copy and head parameters
    new_version = reg._new_version

    def recording(*args, **kwargs):
        entry = new_version(*args, **kwargs)
        refs = [weakref.ref(p) for _, layer in lora_layers(model) if entry.internal in layer.adapter_names
                for p in (layer.factors_a[entry.internal], layer.factors_b[entry.internal])]
        for _, wrapper in saved_modules(model):
            if entry.internal in wrapper.adapter_names:
                head = wrapper.modules_to_save[entry.internal]
                refs += [weakref.ref(head)] + [weakref.ref(p) for p in head.parameters()]
        versions[entry.internal] = refs
        return entry

    reg._new_version = recording

    def request(name, cancel=False):
        job = Job(rows=2, payload=[ClassifyRow("good fun"), ClassifyRow("dull")],
                  entry=reg.acquire(name) if name else None)
        future = service.batcher.submit(job)
        if cancel:
            service.batcher.cancel(job)
        try:
            return future.result(30)
        except concurrent.futures.CancelledError:
            return None

    for name in names + [None]:  # warm: every adapter loaded once, the stacks and caches built
        request(name)
    before = _live_tensor_bytes(reg)
    errors, stop = [], threading.Event()

    def client(seed):
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                request(rnd.choice(names + [None]), cancel=rnd.random() < 0.2)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    rnd = random.Random(7)
    try:
        for step in range(60):
            name = rnd.choice(names)
            if step % 3 == 0:
                reg.unload(name)
            elif step % 3 == 1:
                reg.load(name)
            else:  # new weights (same config; renamed into place, never half-written): a new version is loaded
                weights = local / name / "adapter_model.safetensors"
                shutil.copy(variants[name][step % 2] / "adapter_model.safetensors", weights.with_suffix(".tmp"))
                os.replace(weights.with_suffix(".tmp"), weights)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    # a job cancelled after the batcher took it (not yet started) gives its adapter back when the worker
    # reaches it, which can be just after its client has returned: wait for the batcher to drain
    deadline = time.monotonic() + 10
    while (service.batcher.pending() or any(e.refs for e in reg.loaded())) and time.monotonic() < deadline:
        time.sleep(0.01)
    loaded = {e.internal for e in reg.loaded()}
    assert len(versions) > 30 and len(loaded) <= 3  # many versions came and went
    assert set(lorafit.adapter_configs(model)) == loaded and all(e.refs == 0 for e in reg.loaded())
    gc.collect()
    alive = sorted(v for v, refs in versions.items() if v not in loaded and any(r() is not None for r in refs))
    assert not alive, f"retired versions still referenced: {alive}"
    for internal in loaded:
        assert all(r() is not None for r in versions[internal])  # the check can see a live version
    # the batched stacks' free slots are bounded too
    rows = [(len(layer.__dict__["_lorafit_row_stacks"].stack), len(layer.adapter_names))
            for _, layer in lora_layers(model) if "_lorafit_row_stacks" in layer.__dict__]
    assert rows and all(n <= 4 * (k + 1) for n, k in rows), rows
    after = _live_tensor_bytes(reg)
    assert abs(after - before) <= 4096, (before, after)


def test_the_model_lock_is_granted_in_arrival_order():
    """The batch worker takes the model lock again right after each batch: a load that asked before
    must get it first, or it can wait through batch after batch."""
    from lorafit.serve.registry import FairLock

    lock, order, threads = FairLock(), [], []

    def take(name):
        with lock:
            order.append(name)

    lock.acquire()
    for i, name in enumerate(["load", "batch", "detach", "batch again"]):
        threads.append(threading.Thread(target=take, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while lock.tickets < i + 2:  # this one is waiting before the next asks
            assert time.monotonic() < deadline
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == ["load", "batch", "detach", "batch again"]


def test_files_that_change_while_read_do_not_load(bert, tmp_path, monkeypatch):
    """A read that overlaps an in-place rewrite can return a config mixing two versions (b's alpha, a's rank)
    that parses with a's weights into an adapter that is neither: the config read again differs, so the load
    fails and requests keep the version they had. Likewise a weights file whose state changes during every
    read; one replaced during a single read is read again."""
    reg, local = _registry(bert, tmp_path)
    ids = torch.randint(4, 30, (1, 5))
    first = reg.acquire("a")
    reg.release(first)
    expected = _logits(reg, first, ids)
    read = lorafit.read_adapter_files
    config_a, config_b = (json.loads((local / n / "adapter_config.json").read_text()) for n in "ab")
    torn = json.dumps(dict(config_a, lora_alpha=config_b["lora_alpha"])).encode()
    weights_a = (local / "a" / "adapter_model.safetensors").read_bytes()
    assert lorafit.parse_adapter(torn, weights_a)[0].lora_alpha != config_a["lora_alpha"]  # it would load

    monkeypatch.setattr(lorafit, "read_adapter_files", lambda path: (torn, read(path)[1]))
    with pytest.raises(BadAdapter, match="changed while they were read"):
        reg.load("a")
    os.utime(local / "a" / "adapter_config.json", ns=(5, 5))  # a change for the request's check to see
    failures = reg.stats["load_failures"]
    assert reg.acquire("a") is first and reg.stats["load_failures"] == failures + 1

    stamps = iter(range(100, 200))

    def read_while_rewritten(path):
        files = read(path)
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(files[1])  # same bytes; a new modification time, whatever the clock's resolution
        os.utime(weights, ns=(next(stamps),) * 2)
        return files

    reads = []

    def replaced_while_read_once(path):
        reads.append(path)
        files = read(path)
        if len(reads) == 1:  # renamed into place: the next read sees the whole new file
            tmp = path / "adapter_model.tmp"
            tmp.write_bytes(files[1])
            os.replace(tmp, path / "adapter_model.safetensors")
        return files

    monkeypatch.setattr(lorafit, "read_adapter_files", read_while_rewritten)
    os.utime(local / "a" / "adapter_config.json", ns=(6, 6))
    assert reg.acquire("a") is first and reg.stats["load_failures"] == failures + 2
    monkeypatch.setattr(lorafit, "read_adapter_files", replaced_while_read_once)
    reg.unload("a")
    assert reg.load("a").digest == first.digest and reg.stats["load_failures"] == failures + 2 and len(reads) == 2
    monkeypatch.undo()
    os.utime(local / "a" / "adapter_model.safetensors", ns=(7, 7))
    torch.testing.assert_close(_logits(reg, reg.acquire("a"), ids), expected, atol=1e-5, rtol=1e-5)
