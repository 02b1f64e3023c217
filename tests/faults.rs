//! Faults injected into runs of the binary: a file-size limit standing in for a full disk,
//! and SIGKILL at seeded moments.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Makes `cmd`'s process unable to grow any file past `bytes` (RLIMIT_FSIZE), with SIGXFSZ
/// ignored so that a write past the limit fails with EFBIG, as a write to a full disk fails
/// with ENOSPC, instead of killing the process.
pub fn file_size_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// How a run under [`run_killed_at`] ended.
#[derive(Debug)]
pub struct Killed {
    /// Whether the kill interrupted it (false: it had finished before).
    pub interrupted: bool,
    /// Its output.
    pub output: Output,
}

/// Runs `cmd`, sends it SIGKILL `after` its start unless it has finished by then.
pub fn run_killed_at(cmd: &mut Command, after: Duration) -> Killed {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let mut interrupted = false;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() >= after {
            interrupted = child.kill().is_ok();
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let output = child.wait_with_output().expect("wait");
    Killed {
        interrupted: interrupted && output.status.code().is_none(),
        output,
    }
}

/// `n` kill moments spread over a run of `duration`, from a fixed seed: uniform over
/// (0, 0.95·duration), sorted.
pub fn kill_times(seed: u64, n: usize, duration: Duration) -> Vec<Duration> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t: Vec<Duration> = (0..n)
        .map(|_| duration.mul_f64(rng.gen_range(0.0..0.95)))
        .collect();
    t.sort();
    t
}

/// How long `cmd` takes uninterrupted (it must succeed), and its output.
pub fn timed(cmd: &mut Command) -> (Duration, Output) {
    let start = Instant::now();
    let output = cmd.output().expect("run the binary");
    assert!(output.status.success(), "{}", crate::cli::text(&output));
    (start.elapsed(), output)
}
