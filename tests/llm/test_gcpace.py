"""The garbage collector paced for LLM streams (curate.llm.gcpace): raised while a stage's stream
runs, put back after (nested, threaded, disabled or already-high collectors left alone), and the
stage's rows freed before the threshold goes back."""

from __future__ import annotations

import gc
import threading

import pyarrow as pa
import pytest

from curate.llm.gcpace import DEFAULT_THRESHOLD, paced, threshold


@pytest.fixture(autouse=True)
def _restore_gc():
    before, enabled = gc.get_threshold(), gc.isenabled()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)
    (gc.enable if enabled else gc.disable)()


def test_paced_raises_the_young_threshold_and_puts_it_back():
    with paced():
        assert gc.get_threshold() == (DEFAULT_THRESHOLD, 10, 10)
        with paced():   # nested: still raised, and the inner exit does not put it back
            assert gc.get_threshold()[0] == DEFAULT_THRESHOLD
        assert gc.get_threshold()[0] == DEFAULT_THRESHOLD
    assert gc.get_threshold() == (700, 10, 10)


def test_paced_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with paced():
            raise RuntimeError("boom")
    assert gc.get_threshold() == (700, 10, 10)


def test_threads_overlapping_streams_restore_once_the_last_ends():
    inside, release = threading.Event(), threading.Event()

    def other():
        with paced():
            inside.set()
            release.wait(10)

    th = threading.Thread(target=other)
    with paced():
        th.start()
        assert inside.wait(10)
    assert gc.get_threshold()[0] == DEFAULT_THRESHOLD   # the other thread's stream still runs
    release.set()
    th.join(10)
    assert gc.get_threshold() == (700, 10, 10)


def test_env_zero_disabled_collector_and_higher_threshold_are_left_alone(monkeypatch):
    monkeypatch.setenv("CURATE_GC_THRESHOLD", "0")
    with paced():
        assert gc.get_threshold() == (700, 10, 10)
    monkeypatch.setenv("CURATE_GC_THRESHOLD", "20000")
    assert threshold() == 20000
    with paced():
        assert gc.get_threshold()[0] == 20000
    monkeypatch.delenv("CURATE_GC_THRESHOLD")
    gc.disable()
    with paced():
        assert gc.get_threshold() == (700, 10, 10)
    gc.enable()
    gc.set_threshold(2_000_000, 10, 10)
    with paced():
        assert gc.get_threshold()[0] == 2_000_000
    assert gc.get_threshold()[0] == 2_000_000


def test_a_user_change_inside_is_kept(monkeypatch):
    with paced():
        gc.set_threshold(5000, 10, 10)
    assert gc.get_threshold()[0] == 5000


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("CURATE_GC_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="CURATE_GC_THRESHOLD"):
        threshold()


def test_a_stage_stream_runs_paced_and_frees_its_rows_before_restoring(openai_server, prompts, monkeypatch):
    """During the stream the requests see the raised threshold; when it goes back the flow (its
    rows, jobs and answers) is already freed, so putting it back does not set off a collection
    that walks the whole batch."""
    import contextlib
    import weakref

    from facts_stage import Facts, facts_answer

    import curate.llm.stage as stage_mod

    seen: list[int] = []

    def responder(body):
        seen.append(gc.get_threshold()[0])   # the fake server runs in this process
        return facts_answer(body)

    flows: list[weakref.ref] = []
    alive_at_exit: list[bool] = []
    init = stage_mod._Flow.__init__

    def spy_init(self, *a, **kw):
        flows.append(weakref.ref(self))
        init(self, *a, **kw)

    real_paced = stage_mod.paced

    @contextlib.contextmanager
    def spy_paced():
        with real_paced():
            yield
            alive_at_exit.append(any(r() is not None for r in flows))

    monkeypatch.setattr(stage_mod._Flow, "__init__", spy_init)
    monkeypatch.setattr(stage_mod, "paced", spy_paced)
    openai_server.state.backend = "script"
    openai_server.state.responder = responder
    stage = Facts(engine={"kind": "openai", "model": "m", "base_url": openai_server.base_url, "max_retries": 0},
                  prompts_dir=str(prompts), max_tokens=8, cache=False)
    n = 200
    table = pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"word{i} alpha beta gamma" for i in range(n)]})
    out = stage(table)
    assert out.num_rows > 0
    assert len(seen) == n and set(seen) == {DEFAULT_THRESHOLD}
    assert gc.get_threshold() == (700, 10, 10)
    assert flows and alive_at_exit == [False]


def test_a_child_forked_during_a_stream_gets_the_collector_back():
    import os

    with paced():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: no stream runs in it
            os.write(w, repr(gc.get_threshold()).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 100).decode()
        os.waitpid(pid, 0)
        assert gc.get_threshold()[0] == DEFAULT_THRESHOLD   # the parent's stream still runs
    assert got == "(700, 10, 10)"
