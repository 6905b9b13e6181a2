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
