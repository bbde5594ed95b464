//! Editing the TOML while the balancer serves: the edit takes effect on its
//! own, a broken edit changes nothing, and no request fails throughout.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::*;

fn body(ports: &[u16], interval: &str) -> String {
    let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "[upstream]\nservers = [{}]\nresolve_interval = \"1s\"\nconnect_timeout = \"1s\"\n\
         [upstream.health_check]\ninterval = \"{interval}\"\ntimeout = \"500ms\"\n",
        list.join(", ")
    )
}

/// Requests `/info` in a loop until stopped, recording who answered and what failed.
struct Loop {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<usize>>,
}

impl Loop {
    fn start(url: String) -> Loop {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f) = (
            Arc::clone(&stop),
            Arc::clone(&answered),
            Arc::clone(&failures),
        );
        let thread = thread::spawn(move || {
            let mut sent = 0;
            // Bounded: a test that forgets to stop it still ends.
            while !s.load(Ordering::Relaxed) && sent < 200_000 {
                sent += 1;
                match get(&url) {
                    Ok(r) if r.status == 200 => a.lock().unwrap().push(container_id(&r)),
                    Ok(r) => f.lock().unwrap().push(format!("{} {}", r.status, r.body)),
                    Err(e) => f.lock().unwrap().push(e),
                }
            }
            sent
        });
        Loop {
            stop,
            answered,
            failures,
            thread: Some(thread),
        }
    }

    /// Waits until the last 20 answers all came from `names`, and every one of them answered.
    fn wait_for_only(&self, names: &[&str]) {
        wait_for(
            Duration::from_secs(10),
            &format!("traffic to exactly {names:?}"),
            || {
                let answered = self.answered.lock().unwrap();
                let recent: HashSet<&str> =
                    answered.iter().rev().take(20).map(String::as_str).collect();
                let wanted: HashSet<&str> = names.iter().copied().collect();
                (answered.len() >= 20 && recent == wanted).then_some(())
            },
        );
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.thread.take().unwrap().join().unwrap();
        (sent, self.failures.lock().unwrap().clone())
    }
}

#[test]
fn edits_take_effect_live_with_no_failed_request() {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let names = ["a", "b", "c", "d"];
    let _backends: Vec<Proc> = names
        .iter()
        .zip(&ports)
        .map(|(n, p)| start_backend(n, *p))
        .collect();
    let lb = start_balancer(&body(&ports[..1], "200ms"));
    wait_for(Duration::from_secs(10), "the first backend", || {
        get(&lb.url("/info")).ok().filter(|r| r.status == 200)
    });
    let traffic = Loop::start(lb.url("/info"));
    traffic.wait_for_only(&["a"]);

    // Add a backend.
    lb.rewrite(&body(&ports[..2], "200ms"));
    lb.wait_for_log(&format!("upstream.servers added 127.0.0.1:{}", ports[1]));
    traffic.wait_for_only(&["a", "b"]);

    // Remove one.
    lb.rewrite(&body(&ports[1..2], "200ms"));
    lb.wait_for_log(&format!("upstream.servers removed 127.0.0.1:{}", ports[0]));
    traffic.wait_for_only(&["b"]);

    // Replace the whole list.
    lb.rewrite(&body(&ports[2..4], "200ms"));
    traffic.wait_for_only(&["c", "d"]);

    // A broken file changes nothing and says where it is wrong.
    let config = lb.config.display().to_string();
    std::fs::write(&lb.config, "[upstream\nservers = [\"127.0.0.1:1\"]\n").unwrap();
    let error = lb.wait_for_log("config reload failed");
    assert!(
        error.contains(&config) && error.contains("line 1"),
        "{error}"
    );
    std::fs::write(
        &lb.config,
        config_text(lb.port, &body(&ports[..1], "200ms"))
            .replace("connect_timeout", "conect_timeout"),
    )
    .unwrap();
    let error = wait_for(Duration::from_secs(10), "the second failure", || {
        lb.proc
            .log_text()
            .lines()
            .find(|l| l.contains("conect_timeout"))
            .map(str::to_owned)
    });
    assert!(error.contains("line 6"), "{error}");
    // The error is logged once the reload has been refused: what is in
    // force now is what stays.
    traffic.wait_for_only(&["c", "d"]);

    // The fixed file is taken, with one line per change.
    lb.rewrite(&body(&ports[2..3], "300ms"));
    lb.wait_for_log(&format!("upstream.servers removed 127.0.0.1:{}", ports[3]));
    lb.wait_for_log("health_check.interval 200ms -> 300ms");
    traffic.wait_for_only(&["c"]);

    // What only a restart can change is kept, and said so.
    std::fs::write(
        &lb.config,
        body(&ports[2..3], "300ms").replace("[upstream]", "listen = \"127.0.0.1:1\"\n[upstream]"),
    )
    .unwrap();
    lb.wait_for_log("needs a restart");
    assert_eq!(
        get(&lb.url("/")).unwrap().body,
        "Hello World!",
        "still on the old listen address"
    );

    let (sent, failures) = traffic.finish();
    assert!(sent > 100, "the loop ran ({sent} requests)");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn a_file_renamed_over_the_config_is_picked_up() {
    let ports = [free_port(), free_port()];
    let _a = start_backend("first", ports[0]);
    let _b = start_backend("second", ports[1]);
    let lb = start_balancer(&body(&ports[..1], "200ms"));
    wait_for(Duration::from_secs(10), "the first backend", || {
        get(&lb.url("/info"))
            .ok()
            .filter(|r| r.status == 200 && container_id(r) == "first")
    });
    // What editors such as vim do: write a new file beside it, rename it over.
    let temp = lb.config.with_extension("toml.swp");
    std::fs::write(&temp, config_text(lb.port, &body(&ports[1..], "200ms"))).unwrap();
    std::fs::rename(&temp, &lb.config).unwrap();
    lb.wait_for_log(&format!("upstream.servers added 127.0.0.1:{}", ports[1]));
    wait_for(
        Duration::from_secs(10),
        "traffic to the second backend only",
        || {
            let ids: HashSet<String> = (0..6)
                .filter_map(|_| get(&lb.url("/info")).ok())
                .map(|r| container_id(&r))
                .collect();
            (ids.len() == 1 && ids.contains("second")).then_some(())
        },
    );
    // And again: the watch survives the file being replaced.
    std::fs::write(&temp, config_text(lb.port, &body(&ports, "200ms"))).unwrap();
    std::fs::rename(&temp, &lb.config).unwrap();
    lb.wait_for_log(&format!("upstream.servers added 127.0.0.1:{}", ports[0]));
}

#[test]
fn sighup_reloads_and_keeps_serving() {
    let port = free_port();
    let _a = start_backend("only", port);
    let lb = start_balancer(&body(&[port], "200ms"));
    wait_for(Duration::from_secs(10), "the backend", || {
        get(&lb.url("/")).ok().filter(|r| r.status == 200)
    });
    let status = std::process::Command::new("kill")
        .args(["-HUP", &lb.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    lb.wait_for_log("SIGHUP: reloading");
    lb.wait_for_log("no change");
    assert_eq!(get(&lb.url("/")).unwrap().body, "Hello World!");
}
