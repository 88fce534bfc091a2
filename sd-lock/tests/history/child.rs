//! A holder in a child process: this test binary run again as one test, with an
//! environment variable that makes that test play the holder. It prints its token
//! (`SDLOCK-TOKEN n`) and one raw event a line; the parent reads them, stops and
//! resumes it with signals, and closes its stdin to end it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::Event;

/// In the child: a flag raised when the parent closes our stdin (time to stop).
pub fn stop_on_stdin_close() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let raised = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        raised.store(true, Ordering::SeqCst);
    });
    stop
}

/// One line to the parent, at once.
pub fn emit(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// The child process; killed (after SIGCONT) if the test ends early.
pub struct Holder {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub token: Arc<Mutex<Option<u64>>>,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Holder {
    /// Runs this test binary again as `test` alone, with `env` = `spec` set (the child
    /// sees it and plays the holder).
    pub fn spawn(test: &str, env: &str, spec: &str) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(env, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let token = Arc::new(Mutex::new(None));
        let events = Arc::new(Mutex::new(Vec::new()));
        let (t, e) = (token.clone(), events.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints `test NAME ... ` without a newline before the test's own
                // output: look for the marker anywhere in the line.
                if let Some(at) = line.find("SDLOCK-TOKEN ") {
                    let rest = &line[at + "SDLOCK-TOKEN ".len()..];
                    *t.lock().unwrap() =
                        rest.split_whitespace().next().and_then(|t| t.parse().ok());
                } else if let Some(event) = Event::parse(&line) {
                    e.lock().unwrap().push(event);
                }
            }
        });
        Holder {
            child,
            stdin,
            token,
            events,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Closes its stdin (it stops writing) and waits for it to exit successfully.
    pub fn finish(mut self) -> Vec<Event> {
        drop(self.stdin.take());
        sd_testkit::eventually_blocking("the paused holder exits", || self.exited());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the holder process failed: {status}");
        // The reader thread has the last lines once the pipe closed.
        sd_testkit::eventually_blocking("the holder's output is read", || {
            Arc::strong_count(&self.events) == 1
        });
        self.events()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(self.pid(), libc::SIGCONT);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
