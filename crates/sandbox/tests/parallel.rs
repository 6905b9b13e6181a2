//! Runs go in parallel up to the configured limit, without blocking the async runtime.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgeline_sandbox::{Module, Outcome, Sandbox, SandboxConfig};

#[tokio::test(flavor = "current_thread")]
async fn runs_wait_for_a_slot_and_leave_the_runtime_free() {
    let sandbox = Sandbox::new(SandboxConfig {
        max_parallel: 2,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(sandbox.max_parallel(), 2);

    // A ticker on the same (single) thread: it only advances if the runs never block it.
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let module = Module::new(
        "solution",
        "import time\nstart = time.time()\ntime.sleep(0.4)\nprint(start, time.time())\n",
    )
    .unwrap();
    let started = Instant::now();
    let runs = (0..4).map(|_| sandbox.run_program(&module));
    let reports = futures_util::future::join_all(runs.collect::<Vec<_>>()).await;
    let elapsed = started.elapsed();
    ticker.abort();
    let mut intervals = Vec::new();
    for report in reports {
        let report = report.unwrap();
        assert_eq!(report.outcome, Outcome::Passed, "{}", report.stderr);
        let times: Vec<f64> = report
            .stdout
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        intervals.push((times[0], times[1]));
    }
    // The programs' own clocks: at most two ran at once, and two did.
    let most_at_once = intervals
        .iter()
        .map(|&(start, _)| {
            intervals
                .iter()
                .filter(|&&(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert_eq!(most_at_once, 2, "{intervals:?}");
    let ticks = ticks.load(Ordering::Relaxed);
    assert!(
        ticks as u128 >= elapsed.as_millis() / 10 / 2,
        "only {ticks} ticks in {elapsed:?}"
    );
}

#[tokio::test]
async fn a_launcher_that_does_not_start_python_is_refused_by_name() {
    let err = Sandbox::new(SandboxConfig {
        launcher: Some("/bin/false".into()),
        ..SandboxConfig::default()
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("the sandbox launcher /bin/false did not run Python"),
        "{err}"
    );
}
