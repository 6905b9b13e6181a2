//! The job table's own safety net, with stand-in runners: a run that panics or fails ends
//! its job as failed with the reason and frees its slot; shutdown waits for running jobs.

use std::time::Duration;

use super::*;

/// Runs each job as `f` says.
struct FnRunner<F>(F);

impl<F> JobRunner for FnRunner<F>
where
    F: Fn() -> BoxFuture<'static, forgeline_pipeline::Result<JobOutcome>> + Send + Sync + 'static,
{
    fn run(
        &self,
        _: TaskRequest,
        _: Format,
        _: mpsc::UnboundedSender<JobEvent>,
    ) -> BoxFuture<'static, forgeline_pipeline::Result<JobOutcome>> {
        (self.0)()
    }
}

fn jobs<F>(f: F) -> Arc<Jobs>
where
    F: Fn() -> BoxFuture<'static, forgeline_pipeline::Result<JobOutcome>> + Send + Sync + 'static,
{
    let limits = JobLimits {
        max_running: 1,
        max_kept: 8,
    };
    Arc::new(Jobs::with_runner(
        Arc::new(FnRunner(f)),
        Arc::default(),
        limits,
    ))
}

async fn ended(job: &Job) -> JobState {
    for _ in 0..500 {
        if job.state().is_done() {
            return job.state();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the job is still {:?}", job.state());
}

fn task() -> TaskRequest {
    TaskRequest::new("Write add(a, b).")
}

#[tokio::test]
async fn a_run_that_panics_fails_its_job_with_the_panic_and_frees_the_slot() {
    let jobs = jobs(|| Box::pin(async { panic!("injected: stage blew up at byte 7") }));
    for _ in 0..3 {
        // One slot: each job fits only if the one before freed it.
        let job = jobs.submit(task(), Format::Md).unwrap();
        assert_eq!(ended(&job).await, JobState::Failed);
        let v = job.to_json();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("panicked") && msg.contains("stage blew up at byte 7"),
            "{v}"
        );
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(jobs.running(), 0);
    }
}

#[tokio::test]
async fn a_run_that_fails_ends_its_job_with_the_error() {
    let jobs =
        jobs(|| Box::pin(async { Err(forgeline_pipeline::Error::InvalidTask("no task".into())) }));
    let job = jobs.submit(task(), Format::Md).unwrap();
    assert_eq!(ended(&job).await, JobState::Failed);
    assert_eq!(job.to_json()["error"]["type"], "invalid_request_error");
}

#[test]
fn a_failed_jobs_error_type_follows_the_engine_variant() {
    use forgeline_engine::error::{Internal, Validation};
    use forgeline_pipeline::Error as P;
    let too_long = Validation::PromptTooLong {
        tokens: 9000,
        context: 8192,
        model: "m".into(),
    };
    assert_eq!(
        error_kind(&P::Engine(too_long.into())),
        "invalid_request_error"
    );
    let busy = forgeline_engine::Error::Overloaded {
        waiting: 9,
        limit: 8,
    };
    assert_eq!(error_kind(&P::Engine(busy)), "rate_limit_error");
    let ours = P::Engine(Internal::EngineThreadStopped.into());
    assert_eq!(error_kind(&ours), "server_error");
    assert_eq!(error_kind(&P::Internal("bug".into())), "server_error");
}

#[tokio::test]
async fn shutdown_waits_for_running_jobs_and_cancel_all_counts_the_rest() {
    let jobs = jobs(|| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(forgeline_pipeline::Error::InvalidTask("done".into()))
        })
    });
    jobs.submit(task(), Format::Md).unwrap();
    tokio::time::timeout(Duration::from_secs(5), jobs.wait_idle())
        .await
        .expect("idle once the job ends");
    assert_eq!(jobs.running(), 0);
    assert_eq!(jobs.cancel_all(), 0);

    let stuck = self::jobs(|| Box::pin(std::future::pending()));
    let job = stuck.submit(task(), Format::Md).unwrap();
    let r = tokio::time::timeout(Duration::from_millis(100), stuck.wait_idle()).await;
    assert!(r.is_err(), "a running job is not idle");
    assert_eq!(stuck.cancel_all(), 1);
    assert_eq!(job.state(), JobState::Cancelled);
    assert!(job.to_json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("grace period"));
    tokio::time::timeout(Duration::from_secs(5), stuck.wait_idle())
        .await
        .expect("idle once cancelled");
}

/// Runs a task by its text: `hang` never ends; anything else sends a router event and fails
/// with its text. Counts its runs.
#[derive(Default)]
struct ByTask {
    runs: std::sync::atomic::AtomicUsize,
}

impl JobRunner for ByTask {
    fn run(
        &self,
        task: TaskRequest,
        _: Format,
        events: mpsc::UnboundedSender<JobEvent>,
    ) -> BoxFuture<'static, forgeline_pipeline::Result<JobOutcome>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let _ = events.send(JobEvent {
                job: 1,
                stage: forgeline_pipeline::Stage::Router,
                status: EventStatus::Started,
                subtask: None,
                attempt: None,
                message: format!("routing {}", task.task),
                elapsed_ms: 0,
            });
            if task.task == "hang" {
                std::future::pending::<()>().await;
            }
            Err(forgeline_pipeline::Error::InvalidTask(task.task))
        })
    }
}

fn stored(
    dir: &std::path::Path,
    runner: Arc<ByTask>,
    max_kept: usize,
    retention: Retention,
) -> (Arc<Jobs>, Restored) {
    let limits = JobLimits {
        max_running: 2,
        max_kept,
    };
    let store = Arc::new(FileStore::open(dir.join("jobs")).unwrap());
    let jobs =
        Arc::new(Jobs::with_runner(runner, Arc::default(), limits).with_store(store, retention));
    let restored = jobs.restore().unwrap();
    (jobs, restored)
}

/// Drops the table once its tasks have let go of it, which closes its store.
async fn close(jobs: Arc<Jobs>) {
    for _ in 0..500 {
        if Arc::strong_count(&jobs) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the job table is still held");
}

fn objects(job: &Job) -> Vec<String> {
    job.lock()
        .events
        .iter()
        .map(|e| e["object"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_store_keeps_ended_jobs_and_runs_cut_off_ones_again_under_their_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = Arc::new(ByTask::default());
    let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    assert_eq!(restored, Restored::default());
    let quick = jobs.submit(TaskRequest::new("quick"), Format::Md).unwrap();
    assert_eq!(ended(&quick).await, JobState::Failed);
    let hang = jobs.submit(TaskRequest::new("hang"), Format::Code).unwrap();
    while objects(&hang).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = quick.to_json();
    // The grace period ends: cancelled here, but its end is not stored.
    assert_eq!(jobs.cancel_all(), 1);
    assert!(hang.to_json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("runs again"));
    tokio::time::timeout(Duration::from_secs(5), jobs.wait_idle())
        .await
        .unwrap();
    close(jobs).await;

    let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    assert_eq!(
        restored,
        Restored {
            finished: 1,
            requeued: 1,
            ..Restored::default()
        }
    );
    assert_eq!(jobs.get(&quick.id).unwrap().to_json(), before);
    let again = jobs.get(&hang.id).unwrap();
    assert_eq!(again.state(), JobState::Running);
    assert_eq!(again.to_json()["runs"], 2);
    while objects(&again).len() < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(objects(&again), ["job.event", "job.requeued", "job.event"]);
    let requeued = again.lock().events[1].clone();
    assert_eq!(requeued["run"], 2, "{requeued}");
    assert!(requeued["message"]
        .as_str()
        .unwrap()
        .contains("runs again from the start"));
    assert_eq!(runner.runs.load(Ordering::SeqCst), 3);
    // Cancelled by a client this time: stored, and not run a third time.
    assert!(jobs.cancel_or_remove(&again));
    tokio::time::timeout(Duration::from_secs(5), jobs.wait_idle())
        .await
        .unwrap();
    close(jobs).await;
    let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    assert_eq!((restored.finished, restored.requeued), (2, 0));
    assert_eq!(jobs.get(&hang.id).unwrap().state(), JobState::Cancelled);
    assert_eq!(objects(&jobs.get(&hang.id).unwrap()).len(), 3);
    assert_eq!(runner.runs.load(Ordering::SeqCst), 3);
    // Deleting a finished job removes it from the disk too.
    let dir = tmp.path().join("jobs").join(&quick.id);
    assert!(dir.is_dir());
    assert!(!jobs.cancel_or_remove(&jobs.get(&quick.id).unwrap()));
    assert!(!dir.exists());
    close(jobs).await;
    let (jobs, _) = stored(tmp.path(), runner, 8, Retention::default());
    assert!(jobs.get(&quick.id).is_none());
}

#[tokio::test]
async fn a_cut_off_job_whose_request_is_unreadable_ends_failed_on_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = Arc::new(ByTask::default());
    let (jobs, _) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    let hang = jobs.submit(TaskRequest::new("hang"), Format::Md).unwrap();
    jobs.cancel_all();
    jobs.wait_idle().await;
    close(jobs).await;
    let request = tmp.path().join("jobs").join(&hang.id).join("request.json");
    std::fs::write(&request, b"{\"task\": ").unwrap();

    let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    assert_eq!((restored.failed, restored.requeued), (1, 0));
    let v = jobs.get(&hang.id).unwrap().to_json();
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be read back"));
    assert_eq!(runner.runs.load(Ordering::SeqCst), 1);
    assert_eq!(jobs.running(), 0);
    tokio::time::timeout(Duration::from_secs(1), jobs.wait_idle())
        .await
        .expect("nothing left running");
    close(jobs).await;
    let (_, restored) = stored(tmp.path(), runner, 8, Retention::default());
    assert_eq!(
        (restored.finished, restored.failed),
        (1, 0),
        "its end is stored"
    );
}

#[tokio::test]
async fn a_job_cut_off_in_each_of_its_runs_is_not_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = Arc::new(ByTask::default());
    let mut id = String::new();
    for run in 1..=MAX_RUNS {
        let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, Retention::default());
        if run == 1 {
            id = jobs
                .submit(TaskRequest::new("hang"), Format::Md)
                .unwrap()
                .id
                .clone();
        } else {
            assert_eq!(restored.requeued, 1);
        }
        assert_eq!(jobs.get(&id).unwrap().to_json()["runs"], run);
        jobs.cancel_all();
        jobs.wait_idle().await;
        close(jobs).await;
    }
    let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    assert_eq!((restored.requeued, restored.failed), (0, 1));
    let v = jobs.get(&id).unwrap().to_json();
    assert_eq!(v["state"], "failed", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("during each of the job's 3 runs"));
    assert_eq!(runner.runs.load(Ordering::SeqCst), MAX_RUNS as usize);
}

#[tokio::test]
async fn retention_applies_at_start_and_as_jobs_end() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = Arc::new(ByTask::default());
    let (jobs, _) = stored(tmp.path(), runner.clone(), 8, Retention::default());
    let mut ids = Vec::new();
    for i in 0..4 {
        let j = jobs
            .submit(TaskRequest::new(format!("t{i}")), Format::Md)
            .unwrap();
        ended(&j).await;
        ids.push(j.id.clone());
    }
    close(jobs).await;
    // Rewrite their stored ends as long ago (in 1970), a second apart, so that "ended
    // first" is well defined.
    for (i, id) in ids.iter().enumerate() {
        let path = tmp.path().join("jobs").join(id).join("job.json");
        let mut r: JobRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        r.finished = Some(1000 + i as u64);
        std::fs::write(&path, serde_json::to_vec_pretty(&r).unwrap()).unwrap();
    }
    let exists = |id: &String| tmp.path().join("jobs").join(id).exists();

    // Count: three kept, the one that ended first removed.
    let (jobs, restored) = stored(tmp.path(), runner.clone(), 3, Retention::default());
    assert_eq!((restored.finished, restored.removed), (3, 1));
    assert!(jobs.get(&ids[0]).is_none() && !exists(&ids[0]));
    // A new job that ends makes room by removing the next one that ended first.
    let j = jobs.submit(TaskRequest::new("t4"), Format::Md).unwrap();
    ended(&j).await;
    assert!(!exists(&ids[1]) && jobs.get(&ids[1]).is_none());
    assert_eq!(jobs.len(), 3);
    close(jobs).await;

    // Size: room for about two jobs' files.
    let each: u64 = std::fs::read_dir(tmp.path().join("jobs").join(&ids[3]))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let size = Retention {
        max_bytes: Some(each * 2 + each / 2),
        ..Retention::default()
    };
    let (jobs, restored) = stored(tmp.path(), runner.clone(), 8, size);
    assert_eq!((restored.finished, restored.removed), (2, 1));
    assert!(!exists(&ids[2]) && exists(&ids[3]) && exists(&j.id));
    close(jobs).await;

    // Age: ended more than a day ago (in 1970); the one that just ended stays.
    let age = Retention {
        keep_for: Some(Duration::from_secs(86_400)),
        ..Retention::default()
    };
    let (jobs, restored) = stored(tmp.path(), runner, 8, age);
    assert_eq!((restored.finished, restored.removed), (1, 1));
    assert!(!exists(&ids[3]) && exists(&j.id));
    assert!(jobs.get(&j.id).is_some());
}

#[tokio::test]
async fn an_idle_server_forgets_jobs_past_their_age() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = Arc::new(ByTask::default());
    let age = Retention {
        keep_for: Some(Duration::from_secs(2)),
        ..Retention::default()
    };
    let (jobs, _) = stored(tmp.path(), runner, 8, age);
    let j = jobs.submit(TaskRequest::new("t"), Format::Md).unwrap();
    ended(&j).await;
    let dir = tmp.path().join("jobs").join(&j.id);
    assert!(dir.exists() && jobs.get(&j.id).is_some());
    // Nothing else happens on the server: the timer alone removes it, from the table and
    // from disk.
    let t = std::time::Instant::now();
    while jobs.get(&j.id).is_some() || dir.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "a job 2 s past its end was kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "removed before its age"
    );
    close(jobs).await;
}
