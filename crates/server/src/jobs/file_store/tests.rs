//! The file store against its own files: what a crash or a bad disk leaves behind is
//! skipped or repaired, never a panic or a refused start.

use serde_json::json;

use super::*;
use crate::jobs::store::Retention;
use crate::jobs::JobState;
use forgeline_pipeline::{Format, TaskRequest};

fn record(id: &str, created: u64, state: JobState) -> JobRecord {
    JobRecord {
        id: id.into(),
        created,
        task: "Write add(a, b).".into(),
        state,
        runs: 1,
        finished: state.is_done().then_some(created + 5),
        result: state.is_done().then(|| json!({"files": []})),
        output: None,
        error: None,
        events_dropped: 0,
    }
}

fn request() -> StoredRequest {
    StoredRequest {
        task: TaskRequest::new("Write add(a, b)."),
        format: Format::Code,
    }
}

fn event(i: usize) -> Value {
    json!({"object": "job.event", "stage": "router", "status": "started", "message": format!("event {i}")})
}

#[test]
fn a_job_written_is_read_back_whole_and_removed_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path().join("jobs")).unwrap();
    let mut r = record("job-1", 100, JobState::Running);
    store.create(&r, &request()).unwrap();
    for i in 0..3 {
        store.append_event("job-1", &event(i)).unwrap();
    }
    r.state = JobState::Succeeded;
    r.finished = Some(120);
    r.output = Some("def add(a, b):\n    return a + b\n".into());
    store.update(&r).unwrap();
    store
        .create(&record("job-0", 50, JobState::Running), &request())
        .unwrap();
    // The same id twice is refused, and leaves the first alone.
    let again = store.create(&record("job-1", 1, JobState::Running), &request());
    assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
    let on_disk = dir_bytes(&tmp.path().join("jobs/job-1"));
    assert_eq!(store.bytes("job-1"), on_disk);
    assert!(on_disk > 0);
    drop(store);

    let store = FileStore::open(tmp.path().join("jobs")).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.skipped, 0);
    let ids: Vec<&str> = loaded.jobs.iter().map(|j| j.record.id.as_str()).collect();
    assert_eq!(ids, ["job-0", "job-1"], "oldest first");
    let j = &loaded.jobs[1];
    assert_eq!(j.record, r);
    assert_eq!(j.request, Some(request()));
    assert_eq!(j.events, (0..3).map(event).collect::<Vec<_>>());
    assert!(loaded.jobs[0].events.is_empty());
    assert_eq!(store.bytes("job-1"), on_disk, "counted again on load");

    store.remove("job-1").unwrap();
    assert!(!tmp.path().join("jobs/job-1").exists());
    assert_eq!(store.bytes("job-1"), 0);
    // Removing what is gone is no error; an event for it does not bring it back.
    store.remove("job-1").unwrap();
    assert!(store.append_event("job-1", &event(9)).is_err());
    assert!(!tmp.path().join("jobs/job-1").exists());
}

#[test]
fn a_torn_last_event_line_is_dropped_and_cut_off_so_later_events_append_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    let store = FileStore::open(&jobs).unwrap();
    store
        .create(&record("job-a", 1, JobState::Running), &request())
        .unwrap();
    store.append_event("job-a", &event(0)).unwrap();
    store.append_event("job-a", &event(1)).unwrap();
    // SIGKILL halfway through writing the third.
    let path = jobs.join("job-a").join(EVENTS);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"object": "job.event", "stage": "ro"#)
        .unwrap();
    drop(f);
    drop(store);

    let store = FileStore::open(&jobs).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.jobs[0].events, vec![event(0), event(1)]);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.ends_with("}\n"), "the torn line is cut off: {text:?}");
    // The run that follows appends on a line of its own.
    store.append_event("job-a", &event(2)).unwrap();
    drop(store);
    let store = FileStore::open(&jobs).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.jobs[0].events, vec![event(0), event(1), event(2)]);
}

#[test]
fn corrupt_files_are_skipped_and_the_rest_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    let store = FileStore::open(&jobs).unwrap();
    for (id, created) in [("job-good", 1), ("job-badrec", 2), ("job-other", 3)] {
        store
            .create(&record(id, created, JobState::Succeeded), &request())
            .unwrap();
    }
    store
        .create(&record("job-badreq", 4, JobState::Running), &request())
        .unwrap();
    store
        .create(&record("job-lines", 5, JobState::Running), &request())
        .unwrap();
    drop(store);
    // A record that is not JSON, one for another id, a request that is garbage, an event
    // line in the middle that is garbage (and one that is JSON but no object), a record
    // that never got written, a leftover temporary file, stray files and directories.
    fs::write(
        jobs.join("job-badrec").join(RECORD),
        b"{\"id\": \"job-badr\x00\xff",
    )
    .unwrap();
    let mut other = record("job-elsewhere", 3, JobState::Succeeded);
    other.task = "moved".into();
    fs::write(
        jobs.join("job-other").join(RECORD),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();
    fs::write(jobs.join("job-badreq").join(REQUEST), b"[1, 2").unwrap();
    fs::write(
        jobs.join("job-lines").join(EVENTS),
        format!("{}\nnot json at all\n[1, 2]\n\n{}\n", event(0), event(1)),
    )
    .unwrap();
    fs::create_dir(jobs.join("job-unacked")).unwrap();
    fs::write(jobs.join("job-unacked").join(REQUEST), b"{}").unwrap();
    fs::write(jobs.join("job-good").join("job.json.tmp"), b"{\"half").unwrap();
    fs::create_dir(jobs.join("not a job")).unwrap();
    fs::write(jobs.join("stray.txt"), b"hello").unwrap();

    let store = FileStore::open(&jobs).unwrap();
    let loaded = store.load().unwrap();
    let ids: Vec<&str> = loaded.jobs.iter().map(|j| j.record.id.as_str()).collect();
    assert_eq!(ids, ["job-good", "job-badreq", "job-lines"]);
    assert_eq!(loaded.skipped, 4, "badrec, other, unacked, `not a job`");
    assert_eq!(loaded.jobs[1].request, None);
    assert_eq!(loaded.jobs[2].events, vec![event(0), event(1)]);
    assert!(!jobs.join("job-good").join("job.json.tmp").exists());
    // Skipped files are left for whoever wants to look.
    assert!(jobs.join("job-badrec").join(RECORD).exists());
}

#[test]
fn one_server_a_store_and_ids_cannot_leave_it() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    let store = FileStore::open(&jobs).unwrap();
    let e = FileStore::open(&jobs)
        .err()
        .expect("the second open is refused");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(e.to_string().contains("--data-dir"), "{e}");
    for bad in ["../x", "a/b", "", ".", "..", "job 1"] {
        assert!(!valid_id(bad), "{bad}");
        assert!(store.remove(bad).is_err(), "{bad}");
        assert!(store.append_event(bad, &event(0)).is_err(), "{bad}");
    }
    drop(store);
    FileStore::open(&jobs).expect("free once the first is closed");
}

#[test]
fn retention_over_stored_sizes_removes_the_oldest_finished_first() {
    // The policy over what a store counts: three finished jobs of some size each, room for
    // about two.
    let tmp = tempfile::tempdir().unwrap();
    let store = FileStore::open(tmp.path().join("jobs")).unwrap();
    for (i, id) in ["job-1", "job-2", "job-3"].iter().enumerate() {
        store
            .create(&record(id, i as u64, JobState::Succeeded), &request())
            .unwrap();
        for e in 0..20 {
            store.append_event(id, &event(e)).unwrap();
        }
    }
    let kept: Vec<_> = ["job-1", "job-2", "job-3"]
        .iter()
        .enumerate()
        .map(|(i, id)| crate::jobs::store::Kept {
            id: id.to_string(),
            finished: Some(i as u64),
            bytes: store.bytes(id),
        })
        .collect();
    let each = store.bytes("job-3");
    let retention = Retention {
        max_bytes: Some(each * 2 + each / 2),
        ..Retention::default()
    };
    let gone = crate::jobs::store::expired(&kept, 10, 100, 0, &retention);
    assert_eq!(gone, ["job-1"]);
}
