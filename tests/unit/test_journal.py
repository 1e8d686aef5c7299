"""The job journal (jobs/journal.py): what a Ray job writes instead of the store, and its ingestion."""

from __future__ import annotations

from sqft_service.jobs.journal import JournalEvents, JournalJobs, ingest
from sqft_service.store.db import Database
from sqft_service.store.events import EventStore
from sqft_service.store.jobs import JobStore


def _store(tmp_path):
    db = Database(tmp_path / "sqft.db")
    jobs, events = JobStore(db), EventStore(db)
    jobs.create(job_id="ftjob-1", kind="fine_tune", config={}, workspace=str(tmp_path / "jobs" / "ftjob-1"))
    return db, jobs, events


def test_ingest_stores_each_record_once_even_when_read_again(tmp_path):
    db, jobs, events = _store(tmp_path)
    journal = tmp_path / "journal.jsonl"
    JournalEvents(journal).add_event("ftjob-1", "hello", data={"x": 1})
    JournalEvents(journal).add_checkpoint("ftjob-1", 4, "/ckpt/step-4", {"train_loss": 1.5})
    JournalJobs(journal).update("ftjob-1", trained_tokens=120, estimated_finish=None, status="succeeded")

    offset = ingest(journal, 0, "ftjob-1", events, jobs)
    assert offset == journal.stat().st_size
    assert ingest(journal, 0, "ftjob-1", events, jobs) == offset  # a restart reads it all again

    stored, _ = events.list_events("ftjob-1", limit=10)
    assert [e.message for e in stored] == ["hello"] and stored[0].data == {"x": 1}
    checkpoints, _ = events.list_checkpoints("ftjob-1")
    assert [(c.step, c.path) for c in checkpoints] == [(4, "/ckpt/step-4")]
    job = jobs.get("ftjob-1")
    assert job.trained_tokens == 120
    assert job.status != "succeeded"  # a journal sets progress only, never the job's status
    db.close()


def test_a_line_still_being_written_waits_and_a_broken_one_is_skipped(tmp_path):
    db, jobs, events = _store(tmp_path)
    journal = tmp_path / "journal.jsonl"
    JournalEvents(journal).add_event("ftjob-1", "first")
    with open(journal, "a") as handle:
        handle.write("not json\n")
    complete = journal.stat().st_size
    with open(journal, "a") as handle:
        handle.write('{"record": "event", "id": "ftevent-x", "crea')  # the writer is mid-line

    assert ingest(journal, 0, "ftjob-1", events, jobs) == complete
    with open(journal, "a") as handle:
        handle.write('ted_at": 5, "level": "info", "type": "message", "message": "second", "data": null}\n')
    assert ingest(journal, complete, "ftjob-1", events, jobs) == journal.stat().st_size
    assert [e.message for e in events.list_events("ftjob-1", limit=10)[0]] == ["second", "first"]
    assert ingest(tmp_path / "missing.jsonl", 0, "ftjob-1", events, jobs) == 0
    db.close()
