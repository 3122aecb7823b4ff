//! A plain HTTP file server for tests that can hold chosen paths (a GET of a held
//! path waits until the test releases it) or fail them (503 until healed). A run
//! that fetches such an input is stopped, or sees an outage, at a point the test
//! chooses, on a fast machine as on a loaded one: [`GateServer::wait_for_held`] and
//! [`GateServer::wait_for_requests`] tell the test that the run has got there.
//!
//! HTTP/1.1 with keep-alive, GET and HEAD, `Content-Length` bodies; only what
//! `object_store`'s HTTP client sends. Binds 127.0.0.1 on a free port; the server's
//! threads end with the test process.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    held: HashSet<String>,
    /// Requests waiting at a held path now.
    waiting: usize,
    /// Paths answered with 503 Service Unavailable.
    failing: HashSet<String>,
    /// Requests seen, per path.
    requests: HashMap<String, usize>,
}

pub struct GateServer {
    port: u16,
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl GateServer {
    pub fn start() -> GateServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let accept = Arc::clone(&shared);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = Arc::clone(&accept);
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        GateServer { port, shared }
    }

    /// `http://127.0.0.1:PORT/{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.shared
            .0
            .lock()
            .unwrap()
            .files
            .insert(format!("/{path}"), bytes);
    }

    /// GETs of `path` wait from now on until [`GateServer::release`].
    pub fn hold(&self, path: &str) {
        self.shared
            .0
            .lock()
            .unwrap()
            .held
            .insert(format!("/{path}"));
    }

    /// Requests of `path` are answered 503 from now on until [`GateServer::heal`].
    pub fn fail(&self, path: &str) {
        self.shared
            .0
            .lock()
            .unwrap()
            .failing
            .insert(format!("/{path}"));
    }

    /// Failing paths are served again.
    pub fn heal(&self) {
        self.shared.0.lock().unwrap().failing.clear();
    }

    /// Blocks until `path` has been requested `n` times (see
    /// [`GateServer::wait_for_held`] for `limit` and `check`).
    pub fn wait_for_requests(
        &self,
        path: &str,
        n: usize,
        limit: Duration,
        check: impl FnMut() -> Result<(), String>,
    ) {
        let key = format!("/{path}");
        let what = format!("requests of {path}");
        self.wait_until(&what, n, limit, check, |s| {
            s.requests.get(&key).copied().unwrap_or(0)
        });
    }

    /// Lets every held request through, and later ones at once.
    pub fn release(&self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().unwrap().held.clear();
        cvar.notify_all();
    }

    /// Blocks until `n` requests wait at held paths. `check` is asked between waits
    /// and fails the wait with its message (a run that exited instead); so does
    /// `limit`, which only catches hangs (a run that never gets there).
    pub fn wait_for_held(
        &self,
        n: usize,
        limit: Duration,
        check: impl FnMut() -> Result<(), String>,
    ) {
        self.wait_until("requests at held paths", n, limit, check, |s| s.waiting);
    }

    /// Waits (woken by every request) until `count` reaches `n`.
    fn wait_until(
        &self,
        what: &str,
        n: usize,
        limit: Duration,
        mut check: impl FnMut() -> Result<(), String>,
        count: impl Fn(&State) -> usize,
    ) {
        let (lock, cvar) = &*self.shared;
        let deadline = Instant::now() + limit;
        loop {
            let state = lock.lock().unwrap();
            let (state, _) = cvar
                .wait_timeout_while(state, Duration::from_millis(50), |s| count(s) < n)
                .unwrap();
            let seen = count(&state);
            drop(state);
            if seen >= n {
                return;
            }
            if let Err(why) = check() {
                panic!("{seen} of {n} {what}: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "{seen} of {n} {what} within {limit:?}"
            );
        }
    }
}

/// A `check` for [`GateServer::wait_for_held`]: fails once `child` has exited.
pub fn still_running(child: &mut std::process::Child) -> Result<(), String> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => Err(format!("the run exited ({status})")),
        Err(e) => Err(e.to_string()),
    }
}

fn serve(stream: TcpStream, shared: &(Mutex<State>, Condvar)) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut body_len = 0usize;
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                body_len = value.trim().parse().unwrap_or(0);
            }
        }
        if body_len > 0 {
            let mut body = vec![0u8; body_len];
            if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                return;
            }
        }
        let (lock, cvar) = shared;
        let mut state = lock.lock().unwrap();
        *state.requests.entry(path.clone()).or_default() += 1;
        cvar.notify_all();
        if state.failing.contains(&path) {
            drop(state);
            let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
            if writer.write_all(busy).is_err() {
                return;
            }
            continue;
        }
        if state.held.contains(&path) {
            state.waiting += 1;
            cvar.notify_all();
            while state.held.contains(&path) {
                state = cvar.wait(state).unwrap();
            }
            state.waiting -= 1;
        }
        let file = state.files.get(&path).cloned();
        drop(state);
        let response = match (&file, method.as_str()) {
            (Some(bytes), "GET" | "HEAD") => {
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                    bytes.len()
                )
                .into_bytes();
                if method == "GET" {
                    r.extend_from_slice(bytes);
                }
                r
            }
            (None, _) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            _ => b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n".to_vec(),
        };
        if writer.write_all(&response).is_err() {
            return;
        }
    }
}
