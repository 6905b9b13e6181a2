// The hostile suite, included by `hostile.rs` (runs started by the launcher, as forgeline
// starts them) and `hostile_forked.rs` (runs forked from the test process).

use std::io::ErrorKind;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use forgeline_sandbox::{Clock, Outcome, RunReport};

/// Host processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn unique(name: &str) -> String {
    format!(
        "forgeline-{name}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ rand_seed()
    )
}

fn rand_seed() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The host is fine: nothing with the marker runs, and a trivial program still passes.
async fn assert_host_unharmed(marker: &str) {
    // Killed processes vanish from /proc a moment after the run ends.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut left = processes_with(marker);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = processes_with(marker);
    }
    assert!(left.is_empty(), "processes outlived the run: {left:?}");
    let next = run("print(6 * 7)\n").await;
    assert_eq!(next.outcome, Outcome::Passed, "{}", show(&next));
    assert_eq!(next.stdout, "42\n");
}

/// Python code that re-executes `body` with `marker` on its command line, so that the test
/// can look for its processes on the host.
fn marked(body: &str, marker: &str) -> String {
    format!(
        "import os, sys\nif len(sys.argv) < 2 or sys.argv[1] != {marker:?}:\n    os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', {body:?}, {marker:?}])\nexec({body:?})\n"
    )
}

#[tokio::test]
async fn infinite_loop_times_out() {
    let marker = unique("loop");
    let started = Instant::now();
    let report = run(&marked("while True:\n    pass\n", &marker)).await;
    assert!(
        matches!(report.outcome, Outcome::Timeout { .. }),
        "{}",
        show(&report)
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_host_unharmed(&marker).await;
}

#[tokio::test]
async fn fork_bomb_is_contained() {
    let marker = unique("forkbomb");
    let body =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let started = Instant::now();
    let report = run(&marked(body, &marker)).await;
    assert!(
        matches!(report.outcome, Outcome::Timeout { .. }),
        "{}",
        show(&report)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_host_unharmed(&marker).await;
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_limit() {
    let report = run("hoard = []\nwhile True:\n    hoard.append(bytearray(10 ** 7))\n").await;
    assert!(
        matches!(report.outcome, Outcome::MemoryLimit { limit_bytes } if limit_bytes == 512 << 20),
        "{}",
        show(&report)
    );
    let at_once = run("x = bytearray(10 ** 12)\n").await;
    assert!(
        matches!(at_once.outcome, Outcome::MemoryLimit { .. }),
        "{}",
        show(&at_once)
    );
    assert_host_unharmed("memory-bomb-has-no-marker").await;
}

#[tokio::test]
async fn printing_a_gigabyte_is_truncated_visibly() {
    let report = run(
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n",
    )
    .await;
    assert!(
        matches!(report.outcome, Outcome::Passed | Outcome::Timeout { .. }),
        "{}",
        report.outcome
    );
    let limit = test_limits().output_bytes;
    assert!(report.stdout.len() < limit + 200, "{}", report.stdout.len());
    assert!(report.stdout.starts_with("xxxx"));
    let marker = report.stdout.lines().last().unwrap();
    assert!(
        marker.starts_with("[forgeline: output truncated:"),
        "no truncation marker: {marker}"
    );
    if report.outcome == Outcome::Passed {
        assert!(marker.contains("of 1073741824 bytes kept"), "{marker}");
    }
    assert_host_unharmed("gigabyte-has-no-marker").await;
}

#[tokio::test]
async fn deep_recursion_is_a_recursion_error_or_a_stack_overflow() {
    let plain = run("def f(n):\n    return 1 + f(n + 1)\n\nf(0)\n").await;
    let Outcome::Exception(exc) = &plain.outcome else {
        panic!("{}", show(&plain))
    };
    assert_eq!(exc.exception_type, "RecursionError");
    // With the recursion limit lifted and recursion through C (map), the C stack overflows.
    let unlimited = run("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return list(map(f, [n + 1]))\n\nf(0)\n").await;
    assert!(
        matches!(&unlimited.outcome, Outcome::KilledBySignal { name, .. } if name == "SIGSEGV"),
        "{}",
        show(&unlimited)
    );
    assert!(unlimited.outcome.to_string().contains("deep recursion"));
    assert_host_unharmed("recursion-has-no-marker").await;
}

#[tokio::test]
async fn child_ignoring_sigterm_dies_with_the_program() {
    let marker = unique("orphan");
    // A grandchild in its own session that ignores SIGTERM; the program exits at once.
    let code = format!(
        "import subprocess, sys, time, os\n\
         child = 'import signal, time, os\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nopen(\"ready\", \"w\").close()\\ntime.sleep(600)\\n'\n\
         subprocess.Popen([sys.executable, '-I', '-S', '-c', child, {marker:?}], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
         while not os.path.exists('ready'):\n    time.sleep(0.01)\n\
         print('child started')\n"
    );
    let report = run(&code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert_eq!(report.stdout, "child started\n");
    assert_host_unharmed(&marker).await;

    // The same grandchild under a program that hangs: the timeout takes both down.
    let marker = unique("orphan-timeout");
    let hanging = code.replace("orphan", "orphan-timeout") + "time.sleep(600)\n";
    let hanging = hanging.replace(&unique_prefix(&code), &marker);
    let report = run(&hanging).await;
    assert!(
        matches!(
            report.outcome,
            Outcome::Timeout {
                clock: Clock::Wall,
                ..
            }
        ),
        "{}",
        show(&report)
    );
    assert_host_unharmed(&marker).await;
}

/// The marker inside a program made by `child_ignoring_sigterm_dies_with_the_program`.
fn unique_prefix(code: &str) -> String {
    let start = code.find("forgeline-orphan").unwrap();
    let end = code[start..].find('"').unwrap() + start;
    code[start..end].to_string()
}

#[tokio::test]
async fn odd_exit_codes_are_reported_as_the_process_would_exit() {
    let cases: &[(&str, Outcome)] = &[
        ("import sys\nsys.exit(3)\n", exited(3, None)),
        ("import sys\nsys.exit(-1)\n", exited(255, None)),
        ("import sys\nsys.exit('bye')\n", exited(1, Some("bye"))),
        ("import sys\nsys.exit(256)\n", Outcome::Passed),
        ("import sys\nsys.exit(None)\n", Outcome::Passed),
        ("import sys\nsys.exit(True)\n", exited(1, None)),
        ("import os\nos._exit(7)\n", exited(7, None)),
        (
            "import os\nprint('bye', flush=True)\nos._exit(0)\n",
            Outcome::Passed,
        ),
    ];
    for (code, expected) in cases {
        let report = run(code).await;
        assert_eq!(&report.outcome, expected, "{code}\n{}", show(&report));
    }
    // In tests, exiting early is never a pass.
    for (code, tests) in [
        ("import os\nos._exit(0)\n", "from solution import x\n"),
        ("import sys\nsys.exit(0)\n", "import solution\n"),
    ] {
        let report = test(code, tests).await;
        assert!(
            matches!(
                report.outcome,
                Outcome::Exited {
                    code: 0,
                    message: Some(_)
                }
            ),
            "{code}\n{}",
            show(&report)
        );
    }
    assert_host_unharmed("exit-has-no-marker").await;
}

fn exited(code: i32, message: Option<&str>) -> Outcome {
    Outcome::Exited {
        code,
        message: message.map(str::to_string),
    }
}

#[tokio::test]
async fn files_outside_the_work_directory_cannot_be_touched() {
    let decoy = tempfile::tempdir().unwrap();
    std::fs::set_permissions(decoy.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let keep = decoy.path().join("keep.txt");
    std::fs::write(&keep, "precious").unwrap();
    std::fs::set_permissions(&keep, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir = decoy.path().display();
    let code = format!(
        "import os, shutil\n\
         attempts = {{\n\
         'read': lambda: open('{dir}/keep.txt').read(),\n\
         'write': lambda: open('{dir}/keep.txt', 'w').write('gone'),\n\
         'create': lambda: open('{dir}/new.txt', 'w').write('x'),\n\
         'delete': lambda: os.remove('{dir}/keep.txt'),\n\
         'rename': lambda: os.rename('{dir}/keep.txt', 'stolen.txt'),\n\
         'rmtree': lambda: shutil.rmtree('{dir}'),\n\
         'chmod': lambda: os.chmod('{dir}/keep.txt', 0),\n\
         'tmp': lambda: open('/tmp/forgeline-escape.txt', 'w').write('x'),\n\
         'proc': lambda: open('/proc/1/environ').read(),\n\
         }}\n\
         for name, attempt in attempts.items():\n\
         \x20   try:\n\
         \x20       attempt()\n\
         \x20       print(name, 'SUCCEEDED')\n\
         \x20   except OSError as e:\n\
         \x20       print(name, 'denied', type(e).__name__)\n\
         open('inside.txt', 'w').write('fine')\n\
         os.mkdir('sub')\n\
         os.rename('inside.txt', 'sub/moved.txt')\n\
         shutil.rmtree('sub')\n\
         print('work directory ok')\n"
    );
    let report = run(&code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(!report.stdout.contains("SUCCEEDED"), "{}", report.stdout);
    assert_eq!(
        report.stdout.matches("denied").count(),
        9,
        "{}",
        report.stdout
    );
    assert!(report.stdout.ends_with("work directory ok\n"));
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "precious");
    let entries: Vec<_> = std::fs::read_dir(decoy.path()).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1);
    assert!(!std::path::Path::new("/tmp/forgeline-escape.txt").exists());
    assert_host_unharmed("files-have-no-marker").await;
}

#[tokio::test]
async fn sockets_cannot_reach_the_host() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let code = format!(
        "import socket\n\
         try:\n\
         \x20   socket.create_connection(('127.0.0.1', {port}), timeout=2)\n\
         \x20   print('tcp CONNECTED')\n\
         except OSError as e:\n\
         \x20   print('tcp failed', e.errno)\n\
         try:\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.sendto(b'hello', ('127.0.0.1', {udp_port}))\n\
         \x20   print('udp sent')\n\
         except OSError as e:\n\
         \x20   print('udp failed', e.errno)\n"
    );
    let report = run(&code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(report.stdout.contains("tcp failed"), "{}", report.stdout);
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the sandbox reached the host: {other:?}"),
    }
    let mut buf = [0u8; 16];
    match udp.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("a datagram reached the host: {other:?}"),
    }
    assert_host_unharmed("sockets-have-no-marker").await;
}

#[tokio::test]
async fn nul_bytes_and_invalid_utf8_are_syntax_errors() {
    let sandbox = sandbox().await;
    let nul = forgeline_sandbox::Module::new("solution", b"x = 1\ny = 2\0\n".to_vec()).unwrap();
    let report = sandbox.run_program(&nul).await.unwrap();
    let Outcome::SyntaxError(err) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!((err.line, err.column), (Some(2), Some(6)));
    assert!(err.message.contains("null bytes"), "{}", err.message);

    let latin1 =
        forgeline_sandbox::Module::new("solution", b"x = 1\nname = '\xe9t\xe9'\n".to_vec())
            .unwrap();
    let report: RunReport = sandbox.run_program(&latin1).await.unwrap();
    let Outcome::SyntaxError(err) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("utf-8"), "{}", err.message);

    // Test files get the same treatment.
    let tests =
        forgeline_sandbox::TestSuite::new("test_solution.py", b"assert True\0".to_vec()).unwrap();
    let report = sandbox.run_tests(&module("x = 1\n"), &tests).await.unwrap();
    let Outcome::SyntaxError(err) = &report.outcome else {
        panic!("{}", show(&report))
    };
    assert_eq!(err.file, "test_solution.py");
    assert_host_unharmed("encoding-has-no-marker").await;
}

#[tokio::test]
async fn the_process_limit_caps_children() {
    let sandbox = sandbox().await;
    if sandbox.isolation().process_limit == forgeline_sandbox::ProcessLimit::None {
        eprintln!("no process limit here: {:?}", sandbox.isolation().missing);
        return;
    }
    let code = "import os, time\n\
                pids = []\n\
                for _ in range(100):\n\
                \x20   try:\n\
                \x20       pid = os.fork()\n\
                \x20   except OSError:\n\
                \x20       break\n\
                \x20   if pid == 0:\n\
                \x20       time.sleep(30)\n\
                \x20       os._exit(0)\n\
                \x20   pids.append(pid)\n\
                print(len(pids))\n";
    let report = run(code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let children: u32 = report.stdout.trim().parse().unwrap();
    let limit = test_limits().max_processes;
    assert!(
        children < limit && children + 5 >= limit,
        "{children} children, limit {limit}"
    );
    assert_host_unharmed("nproc-has-no-marker").await;
}

#[tokio::test]
async fn a_cancelled_run_leaves_nothing_behind() {
    let marker = unique("cancelled");
    let code = marked("import time\ntime.sleep(600)\n", &marker);
    let sandbox = sandbox().await;
    let program = module(&code);
    let mut run = Box::pin(sandbox.run_program(&program));
    // Wait until the program runs, then drop the run's future.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            report = &mut run => panic!("the run ended on its own: {report:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if !processes_with(&marker).is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "the program never started");
            }
        }
    }
    // The run's waiter is the launcher (whose arguments it keeps) exactly when one is used.
    let launchers = processes_with("__forgeline-sandbox-launch");
    assert_eq!(!launchers.is_empty(), launcher().is_some(), "{launchers:?}");
    drop(run);
    assert_host_unharmed(&marker).await;
}

/// The run directory the program ran in, from its own `os.getcwd()` on the first line.
fn run_dir_of(report: &RunReport) -> std::path::PathBuf {
    let cwd = report.stdout.lines().next().unwrap_or_default();
    assert!(
        cwd.starts_with('/'),
        "no directory printed: {}",
        show(report)
    );
    cwd.into()
}

#[tokio::test]
async fn deeply_nested_directories_are_removed_without_recursion() {
    // mkdir + rename keeps every path short while the tree grows 15,000 deep; a locked
    // (mode 000) directory at the top and in the middle. Removal used to overflow a stack.
    let code = "import os\n\
                print(os.getcwd(), flush=True)\n\
                os.mkdir('n')\n\
                depth = 0\n\
                try:\n\
                \x20   for depth in range(1, 15001):\n\
                \x20       os.mkdir('t')\n\
                \x20       os.rename('n', 't/n')\n\
                \x20       os.rename('t', 'n')\n\
                \x20       if depth == 7000:\n\
                \x20           os.chmod('n/n', 0)\n\
                except OSError as e:\n\
                \x20   print('stopped', e.errno)\n\
                os.chmod('n', 0)\n\
                print('depth', depth)\n";
    // Room to finish on a busy machine: the removal is what is tested.
    let limits = forgeline_sandbox::Limits {
        wall_time: Duration::from_secs(30),
        cpu_time: Duration::from_secs(30),
        ..test_limits()
    };
    let job = forgeline_sandbox::Job::new(module(code), forgeline_sandbox::Check::Run)
        .with_limits(limits);
    let report = sandbox().await.run(job).await.unwrap();
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(report.stdout.contains("depth "), "{}", show(&report));
    let dir = run_dir_of(&report);
    assert!(!dir.exists(), "{} was left behind", dir.display());
    assert_host_unharmed("deep-has-no-marker").await;
}

/// Runs `code` with `.png` files kept, failing the test instead of hanging.
async fn run_keeping_png(code: &str) -> RunReport {
    let job = forgeline_sandbox::Job::new(module(code), forgeline_sandbox::Check::Run)
        .keep_files(&["png"]);
    let run = sandbox().await.run(job);
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("reading the run directory back hung")
        .unwrap()
}

#[tokio::test]
async fn a_fifo_as_the_result_record_or_a_kept_file_does_not_hang() {
    // Ended with os._exit, the harness never writes its record: the FIFO stays.
    let code = "import os\n\
                os.mkfifo('.forgeline-result.json')\n\
                os.mkfifo('figure.png')\n\
                open('real.png', 'wb').write(b'png')\n\
                os._exit(0)\n";
    let report = run_keeping_png(code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let names: Vec<_> = report.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["real.png"]);
    assert_host_unharmed("fifo-has-no-marker").await;
}

#[tokio::test]
async fn a_link_to_dev_zero_as_the_result_record_or_a_kept_file_is_not_read() {
    let code = "import os\n\
                os.symlink('/dev/zero', '.forgeline-result.json')\n\
                os.symlink('/dev/zero', 'zero.png')\n\
                os.mkdir('figures')\n\
                os.symlink('/dev/zero', 'figures/deeper.png')\n\
                os._exit(0)\n";
    let report = run_keeping_png(code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(report.files.is_empty(), "{:?}", report.files.len());
    assert_host_unharmed("zero-has-no-marker").await;
}

#[tokio::test]
async fn unix_sockets_on_the_host_cannot_be_reached() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    let dir = tempfile::Builder::new()
        .prefix("forgeline-unix-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.path().join("host.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let code = format!(
        "import socket\n\
         try:\n\
         \x20   s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         \x20   s.settimeout(2)\n\
         \x20   s.connect({path:?})\n\
         \x20   s.sendall(b'hello')\n\
         \x20   print('unix CONNECTED', s.recv(5))\n\
         except OSError as e:\n\
         \x20   print('unix failed', e.errno)\n\
         a, b = socket.socketpair()\n\
         a.sendall(b'pair')\n\
         print('socketpair', b.recv(4).decode())\n",
        path = path.display().to_string()
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = done.clone();
    let server = std::thread::spawn(move || {
        // Accepts until the run is over (and a moment more).
        let mut grace = 10;
        while grace > 0 {
            if finished.load(std::sync::atomic::Ordering::Relaxed) {
                grace -= 1;
            }
            if let Ok((mut conn, _)) = listener.accept() {
                conn.set_nonblocking(false).unwrap();
                let _ = conn.write_all(b"reply");
                let mut buf = [0u8; 5];
                let _ = conn.read(&mut buf);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    let report = run(&code).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(report.stdout.contains("unix failed"), "{}", report.stdout);
    assert!(report.stdout.contains("socketpair pair"), "{}", report.stdout);
    assert!(!server.join().unwrap(), "the program reached the host's socket");
    assert_host_unharmed("unix-has-no-marker").await;
}

/// A root-only secret where Landlock lets runs read (`/usr/local/share`): a 0640 file in a
/// 0710 directory, as /etc/ssl/private holds its keys. Removed when dropped.
struct Secret {
    dir: std::path::PathBuf,
}

impl Secret {
    fn plant() -> Option<Secret> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let dir = std::path::PathBuf::from(format!(
            "/usr/local/share/forgeline-secret-{}",
            unique("caps")
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let secret = Secret { dir };
        std::fs::write(secret.file(), "top secret\n").unwrap();
        std::fs::set_permissions(secret.file(), std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::set_permissions(&secret.dir, std::fs::Permissions::from_mode(0o710)).unwrap();
        Some(secret)
    }

    fn file(&self) -> std::path::PathBuf {
        self.dir.join("key.pem")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn no_capability_is_left_to_read_root_only_files() {
    let secret = Secret::plant();
    let mut targets = vec!["/etc/ssl/private/ssl-cert-snakeoil.key".to_string()];
    targets.extend(secret.as_ref().map(|s| s.file().display().to_string()));
    let code = format!(
        "import ctypes\n\
         for path in {targets:?}:\n\
         \x20   try:\n\
         \x20       print('READ', path, open(path).read()[:20])\n\
         \x20   except OSError as e:\n\
         \x20       print('denied', path, e.errno)\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         class Header(ctypes.Structure):\n\
         \x20   _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]\n\
         class Data(ctypes.Structure):\n\
         \x20   _fields_ = [('eff', ctypes.c_uint32), ('prm', ctypes.c_uint32), ('inh', ctypes.c_uint32)]\n\
         header, data = Header(0x20080522, 0), (Data * 2)()\n\
         assert libc.capget(ctypes.byref(header), data) == 0\n\
         eff = data[0].eff | data[1].eff << 32\n\
         prm = data[0].prm | data[1].prm << 32\n\
         inh = data[0].inh | data[1].inh << 32\n\
         bnd = sum(1 << c for c in range(64) if libc.prctl(23, c, 0, 0, 0) == 1)\n\
         amb = sum(1 << c for c in range(64) if libc.prctl(47, 3, c, 0, 0) == 1)\n\
         print('caps', eff, prm, inh, bnd, amb)\n"
    );
    let report = run(&code).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(!report.stdout.contains("READ"), "{}", report.stdout);
    assert!(report.stdout.contains("caps 0 0 0 0 0\n"), "{}", report.stdout);
    drop(secret);
    assert_host_unharmed("caps-have-no-marker").await;
}

/// Runs `code` with more time, and `limits` changed by `change`.
async fn run_with(code: &str, change: impl FnOnce(&mut forgeline_sandbox::Limits)) -> RunReport {
    let mut limits = forgeline_sandbox::Limits {
        wall_time: Duration::from_secs(30),
        cpu_time: Duration::from_secs(30),
        ..test_limits()
    };
    change(&mut limits);
    let job = forgeline_sandbox::Job::new(module(code), forgeline_sandbox::Check::Run)
        .with_limits(limits);
    sandbox().await.run(job).await.unwrap()
}

#[tokio::test]
async fn memory_is_limited_for_the_whole_run_not_only_each_process() {
    let sandbox = sandbox().await;
    if sandbox.isolation().memory_limit != forgeline_sandbox::MemoryLimit::Cgroup {
        eprintln!("no memory cgroup here: {:?}", sandbox.isolation().missing);
        return;
    }
    // Six children each touch 600 MiB and hold it a moment: 3.6 GB, above the run's 2 GiB,
    // while each child stays under its own 1 GiB.
    let code = "import os, time\n\
                pids = []\n\
                for i in range(6):\n\
                \x20   pid = os.fork()\n\
                \x20   if pid == 0:\n\
                \x20       try:\n\
                \x20           b = bytearray(600 << 20)\n\
                \x20           b[::4096] = b'\\x01' * (len(b) // 4096)\n\
                \x20           time.sleep(2)\n\
                \x20       except MemoryError:\n\
                \x20           os._exit(3)\n\
                \x20       os._exit(0)\n\
                \x20   pids.append(pid)\n\
                ok = 0\n\
                for pid in pids:\n\
                \x20   _, status = os.waitpid(pid, 0)\n\
                \x20   ok += os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0\n\
                print('succeeded', ok)\n";
    let report = run_with(code, |l| {
        l.memory_bytes = 1 << 30;
        l.run_memory_bytes = 2 << 30;
    })
    .await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    let ok: u32 = report.stdout.trim().trim_start_matches("succeeded ").parse().unwrap();
    assert!(ok < 6, "all six children got their 600 MiB: {}", report.stdout);

    // The program itself over the run's limit: killed by the cgroup, reported as the limit.
    let alone = "b = bytearray(600 << 20)\nb[::4096] = b'\\x01' * (len(b) // 4096)\nprint('kept it')\n";
    let report = run_with(alone, |l| {
        l.memory_bytes = 1 << 30;
        l.run_memory_bytes = 256 << 20;
    })
    .await;
    assert!(
        matches!(report.outcome, Outcome::MemoryLimit { limit_bytes } if limit_bytes == 256 << 20),
        "{}",
        show(&report)
    );
    assert_host_unharmed("memory-sum-has-no-marker").await;
}

#[tokio::test]
async fn the_run_directory_has_a_disk_and_inode_quota() {
    let sandbox = sandbox().await;
    if sandbox.isolation().disk_limit != forgeline_sandbox::DiskLimit::Tmpfs {
        eprintln!("no disk quota here: {:?}", sandbox.isolation().missing);
        return;
    }
    let bytes = "import os\n\
                 n = 0\n\
                 try:\n\
                 \x20   for i in range(16):\n\
                 \x20       with open('f%d' % i, 'wb') as f:\n\
                 \x20           f.write(b'x' * ((16 << 20) - 4096))\n\
                 \x20       n += 1\n\
                 except OSError as e:\n\
                 \x20   print('stopped', e.errno)\n\
                 print('files', n)\n";
    let started = Instant::now();
    let report = run_with(bytes, |_| {}).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(report.stdout.contains("stopped 28"), "{}", report.stdout);
    assert!(!report.stdout.contains("files 16"), "{}", report.stdout);
    let inodes = "n = 0\n\
                  try:\n\
                  \x20   for i in range(18500):\n\
                  \x20       open('n%d' % i, 'w').close()\n\
                  \x20       n += 1\n\
                  except OSError as e:\n\
                  \x20   print('stopped', e.errno)\n\
                  print('files', n)\n";
    let report = run_with(inodes, |_| {}).await;
    assert_eq!(report.outcome, Outcome::Passed, "{}", show(&report));
    assert!(report.stdout.contains("stopped 28"), "{}", report.stdout);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    // A full directory still gets its record: a test run reports its failure.
    let full = "for i in range(18500):\n    try:\n        open('n%d' % i, 'w').close()\n    except OSError:\n        break\n";
    let report = test(full, "import solution\nassert 1 == 2\n").await;
    assert!(
        matches!(report.outcome, Outcome::AssertionFailed(_)),
        "{}",
        show(&report)
    );
    assert_host_unharmed("disk-has-no-marker").await;
}
