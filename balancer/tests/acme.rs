//! Automatic HTTPS (`[tls.acme]`) against a real ACME server on this
//! machine: Debian's `pebble`, with its own CA, and `pebble-challtestsrv`
//! as its DNS (every name is 127.0.0.1), so that its validation authority
//! fetches the HTTP-01 answer from the balancer's plain listener.
//!
//! Checked: a certificate obtained through HTTP-01 within seconds, which
//! curl verifies against pebble's root; a renewal swapped in under a loop
//! of HTTPS requests with none failing; a restart that serves the stored
//! certificate without ordering; a CA that refuses or is down, with the
//! balancer serving and the failure in `/status`, `/metrics` and the log;
//! two balancers on one storage ordering once.
//!
//! pebble is a prerequisite (`apt-get install pebble`, which `.ci/run`
//! does): without it these tests fail, they do not skip.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use support::*;

/// How long pebble may take to issue, on a busy machine.
const ISSUE: Duration = Duration::from_secs(30);

/// A running pebble with its DNS, and the files a balancer needs to trust it.
struct Pebble {
    _dns: Proc,
    _proc: Proc,
    dir: tempfile::TempDir,
    /// Pebble's HTTPS certificate (its own listener), for `ca_file`.
    pki: Pki,
    pub directory: String,
    management: u16,
}

impl Pebble {
    /// Pebble whose HTTP-01 checks connect to `http_port`, issuing
    /// certificates valid for `validity`; `blocked` names it refuses.
    fn start(http_port: u16, validity: Duration, blocked: &[&str]) -> Pebble {
        Pebble::start_with(
            http_port,
            serde_json::json!({
                "domainBlocklist": blocked,
                "certificateValidityPeriod": validity.as_secs(),
            }),
        )
    }

    /// [`Pebble::start`] with `settings` added to its configuration.
    fn start_with(http_port: u16, settings: serde_json::Value) -> Pebble {
        for program in ["pebble", "pebble-challtestsrv"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {program}")])
                    .output()
                    .is_ok_and(|o| o.status.success()),
                "{program} is needed for the ACME tests: apt-get install pebble (.ci/run installs it)"
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new(&["127.0.0.1", "localhost"]);
        let (listen, management, dns, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": pki.cert,
                "privateKey": pki.key,
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        for (key, value) in settings.as_object().into_iter().flatten() {
            config["pebble"][key] = value.clone();
        }
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).expect("write pebble.json");
        let mut dns_cmd = Command::new("pebble-challtestsrv");
        dns_cmd.args([
            "-dns01",
            &format!("127.0.0.1:{dns}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &format!("127.0.0.1:{dns_management}"),
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]);
        let mut dns_proc = spawn(dns_cmd, &dir.path().join("dns.log"));
        wait_for(Duration::from_secs(10), "pebble's DNS to listen", || {
            dns_proc.assert_running("pebble-challtestsrv");
            TcpStream::connect(("127.0.0.1", dns)).ok()
        });
        let mut cmd = Command::new("pebble");
        cmd.arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        let mut proc = spawn(cmd, &dir.path().join("pebble.log"));
        wait_for(Duration::from_secs(10), "pebble to listen", || {
            proc.assert_running("pebble");
            TcpStream::connect(("127.0.0.1", listen)).ok()
        });
        Pebble {
            _dns: dns_proc,
            _proc: proc,
            pki,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management,
            dir,
        }
    }

    /// Pebble's issuing root, fetched from its management interface (it
    /// makes a new one at each start), written to a file.
    fn root(&self) -> PathBuf {
        let file = self.dir.path().join("root.pem");
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&self.pki.ca)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .arg("-o")
            .arg(&file)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "pebble's root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        file
    }

    /// `[tls]` with `[tls.acme]` at this pebble, for `domains`, kept in `storage`.
    fn config(&self, tls_port: u16, storage: &Path, domains: &str, extra: &str) -> String {
        format!(
            "admin_listen = \"127.0.0.1:{admin}\"\n[upstream]\nservers = [\"127.0.0.1:1\"]\n\
             [tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\
             [tls.acme]\ndirectory = \"{}\"\ndomains = {domains}\nstorage = {}\nca_file = {}\nemail = \"ops@acme.test\"\n{extra}",
            self.directory,
            toml_path(storage),
            toml_path(&self.pki.ca),
            admin = free_port(),
        )
    }
}

fn spawn(cmd: Command, log: &Path) -> Proc {
    spawn_logged(cmd, log.to_owned(), None)
}

/// A balancer whose plain listener is `port` (the one pebble checks).
fn start_on(port: u16, body: &str) -> Balancer {
    start_program_on(&binary("balancer"), port, body, &[])
}

fn admin_port(balancer: &Balancer) -> u16 {
    let text = std::fs::read_to_string(&balancer.config).expect("the config");
    text.lines()
        .find_map(|l| l.strip_prefix("admin_listen = \"127.0.0.1:"))
        .and_then(|rest| rest.trim_end_matches('"').parse().ok())
        .expect("an admin_listen line")
}

/// GET /health-check over HTTPS to `host` (SNI) on `port`, trusting only
/// `root`: the status and the leaf certificate served.
fn https_get(port: u16, host: &str, root: &Path) -> Result<(u16, Vec<u8>), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let connection = ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let socket = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(connection, socket);
    write!(
        tls,
        "GET /health-check HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("handshake or request: {e}"))?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A peer that closes without close_notify, after a whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(format!("reading the answer: {e}")),
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no peer certificate")?;
    Ok((status, leaf))
}

/// Waits until `host` is served a certificate that `root` verifies; returns
/// it. The failure says what the last attempt got, with `lb`'s log.
fn wait_for_certificate(lb: &Balancer, port: u16, host: &str, root: &Path) -> Vec<u8> {
    let deadline = Instant::now() + ISSUE;
    loop {
        let got = https_get(port, host, root);
        if let Ok((200, leaf)) = got {
            return leaf;
        }
        assert!(
            Instant::now() < deadline,
            "no verified certificate for {host} within {ISSUE:?}: {got:?}\n{}",
            lb.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pebble (`validity`, refusing `blocked`) and a balancer using it for
/// `domains` with `extra` in `[tls.acme]` (`extra_tls` in `[tls]`).
struct Stack {
    pebble: Pebble,
    _storage: tempfile::TempDir,
    tls_port: u16,
    lb: Balancer,
}

fn stack(
    validity: Duration,
    blocked: &[&str],
    domains: &str,
    extra_tls: &str,
    extra: &str,
) -> Stack {
    let port = free_port();
    let pebble = Pebble::start(port, validity, blocked);
    let storage = tempfile::tempdir().expect("temp dir");
    let tls_port = free_port();
    let body = pebble
        .config(tls_port, storage.path(), domains, extra)
        .replace("[tls.acme]", &format!("{extra_tls}[tls.acme]"));
    let lb = start_on(port, &body);
    Stack {
        pebble,
        _storage: storage,
        tls_port,
        lb,
    }
}

/// Waits until `/status` on `admin` says `domain` is in `state`; returns
/// the domain's whole entry.
fn wait_for_state(admin: u16, domain: &str, state: &str) -> serde_json::Value {
    wait_for(
        Duration::from_secs(20),
        &format!("{domain} {state} in /status"),
        || {
            let status = support::status(admin);
            let entry = status["acme"][domain].clone();
            (entry["state"] == state).then_some(entry)
        },
    )
}

fn orders(metrics: &str, domain: &str) -> f64 {
    sample(
        metrics,
        &format!("balancer_acme_orders_total{{domain=\"{domain}\"}}"),
    )
}

#[test]
fn a_certificate_is_obtained_through_http01_and_verifies_against_the_ca_root() {
    // The challenge is answered before the redirect to HTTPS, and before the
    // upstream that every other request goes to (nothing listens there).
    let Stack {
        pebble,
        tls_port,
        lb,
        ..
    } = stack(
        Duration::from_secs(3600),
        &[],
        "[\"www.acme.test\"]",
        "redirect_http = true\n",
        "",
    );
    let started = Instant::now();
    let root = pebble.root();
    let leaf = wait_for_certificate(&lb, tls_port, "www.acme.test", &root);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the certificate took {:?}",
        started.elapsed()
    );
    // curl, verifying the chain against pebble's root, as a user would.
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&root)
        .args([
            "--resolve",
            &format!("www.acme.test:{tls_port}:127.0.0.1"),
            &format!("https://www.acme.test:{tls_port}/health-check"),
        ])
        .output()
        .expect("curl runs");
    assert!(
        out.status.success() && out.stdout == b"success",
        "curl against pebble's root: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!leaf.is_empty());
    // The plain listener still redirects everything else.
    let (reply, _) = raw_exchange(
        lb.port,
        b"GET /anything HTTP/1.1\r\nHost: www.acme.test\r\nConnection: close\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 308"), "{reply}");
    let log = lb.proc.log_text();
    assert!(
        log.contains("acme: certificate obtained for www.acme.test"),
        "{log}"
    );
    let admin = admin_port(&lb);
    let status = status(admin);
    assert_eq!(
        status["acme"]["www.acme.test"]["state"], "valid",
        "{status:#}"
    );
    let metrics = scrape(admin);
    assert_eq!(orders(&metrics, "www.acme.test"), 1.0, "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("balancer_tls_certificate_expiry_seconds")
                && l.contains("hosts=\"www.acme.test\"")),
        "the expiry metric covers the ACME certificate: {metrics}"
    );
}

#[test]
fn a_restart_serves_the_stored_certificate_without_ordering_again() {
    let port = free_port();
    let pebble = Pebble::start(port, Duration::from_secs(3600), &[]);
    let storage = tempfile::tempdir().expect("temp dir");
    let tls_port = free_port();
    let body = pebble.config(tls_port, storage.path(), "[\"www.acme.test\"]", "");
    let root = pebble.root();
    let first = {
        let lb = start_on(port, &body);
        let leaf = wait_for_certificate(&lb, tls_port, "www.acme.test", &root);
        drop(lb);
        leaf
    };
    let lb = start_on(port, &body);
    // Served from the first second: no order in between.
    let (status, leaf) = https_get(tls_port, "www.acme.test", &root)
        .expect("the stored certificate is served at once");
    assert_eq!((status, &leaf), (200, &first));
    // A round of the renewal loop has run (it logs nothing when nothing is due).
    wait_for_state(admin_port(&lb), "www.acme.test", "valid");
    assert_eq!(orders(&scrape(admin_port(&lb)), "www.acme.test"), 0.0);
    let log = lb.proc.log_text();
    assert!(!log.contains("acme: ordering"), "{log}");
}

#[test]
fn a_renewal_is_swapped_in_under_https_requests_with_none_failing() {
    // 40 s certificates, renewed when 32 s are left: one renewal within ~8 s.
    let Stack {
        pebble,
        tls_port,
        lb,
        ..
    } = stack(
        Duration::from_secs(40),
        &[],
        "[\"www.acme.test\"]",
        "",
        "renew_before = \"32s\"\n",
    );
    let root = pebble.root();
    let first = wait_for_certificate(&lb, tls_port, "www.acme.test", &root);
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut requests, mut failures) = (0, Vec::new());
    let renewed = loop {
        assert!(
            Instant::now() < deadline,
            "no renewal within 40 s:\n{}",
            lb.proc.log_text()
        );
        requests += 1;
        match https_get(tls_port, "www.acme.test", &root) {
            Ok((200, leaf)) if leaf != first => break leaf,
            Ok((200, _)) => {}
            other => failures.push(format!("{other:?}")),
        }
    };
    assert!(
        failures.is_empty(),
        "{} of {requests} HTTPS requests failed during the renewal: {failures:?}",
        failures.len()
    );
    assert!(
        requests > 1,
        "the loop ran while the old certificate was served"
    );
    // The renewed certificate stays in force.
    assert_eq!(
        https_get(tls_port, "www.acme.test", &root).map(|(s, l)| (s, l == renewed)),
        Ok((200, true))
    );
    assert!(orders(&scrape(admin_port(&lb)), "www.acme.test") >= 2.0);
}

#[test]
fn a_refusing_or_absent_ca_leaves_the_balancer_serving_and_the_failure_visible() {
    let Stack {
        pebble,
        tls_port,
        lb: refused,
        ..
    } = stack(
        Duration::from_secs(3600),
        &["blocked.acme.test"],
        "[\"blocked.acme.test\"]",
        "",
        "",
    );
    // The CA down: a directory where nothing listens.
    let gone = free_port();
    let down_tls = free_port();
    let down_storage = tempfile::tempdir().expect("temp dir");
    let down = start_program(
        &binary("balancer"),
        &pebble
            .config(down_tls, down_storage.path(), "[\"www.acme.test\"]", "")
            .replace(&pebble.directory, &format!("https://127.0.0.1:{gone}/dir")),
        &[],
    );
    for (lb, tls_port, domain, reason) in [
        (&refused, tls_port, "blocked.acme.test", "blocked.acme.test"),
        (&down, down_tls, "www.acme.test", "creating the account"),
    ] {
        let admin = admin_port(lb);
        let state = wait_for_state(admin, domain, "failing");
        let error = state["last_error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{domain}: {state:#}");
        assert!(state["next_attempt"].is_string(), "{state:#}");
        let metrics = scrape(admin);
        assert!(
            sample(
                &metrics,
                &format!("balancer_acme_failures_total{{domain=\"{domain}\"}}")
            ) >= 1.0,
            "{metrics}"
        );
        let warning = lb.wait_for_log(&format!("acme: {domain}: "));
        assert!(warning.contains("WARN"), "{warning}");
        // Still serving plain HTTP; no certificate, so no handshake for that name.
        assert_eq!(get(&lb.url("/health-check")).map(|r| r.status), Ok(200));
        let handshake = https_get(tls_port, domain, &pebble.pki.ca);
        assert!(handshake.is_err(), "{domain}: {handshake:?}");
    }
    // The CA's problem detail, as pebble words it.
    let status = support::status(admin_port(&refused));
    let error = status["acme"]["blocked.acme.test"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("rejectedIdentifier"), "{error}");
    // The status page shows it too, in a real browser.
    let page = format!("http://127.0.0.1:{}/", admin_port(&refused));
    let dom = Browser::new().load(&page, &["--dump-dom"]).out;
    let row = dom
        .split("<tr")
        .find(|r| r.contains("data-domain=\"blocked.acme.test\""))
        .unwrap_or_else(|| panic!("no ACME row for blocked.acme.test on the status page:\n{dom}"));
    assert!(
        row.contains("data-state=\"failing\"") && row.contains("rejectedIdentifier"),
        "{row}"
    );
}

#[test]
fn two_balancers_sharing_storage_order_once() {
    let port = free_port();
    let pebble = Pebble::start(port, Duration::from_secs(3600), &[]);
    let storage = tempfile::tempdir().expect("temp dir");
    let (tls_a, tls_b) = (free_port(), free_port());
    // Only `a` is where pebble checks HTTP-01: whichever orders, the answer
    // is in the shared storage for both.
    let a = start_on(
        port,
        &pebble.config(tls_a, storage.path(), "[\"www.acme.test\"]", ""),
    );
    let b = start_program(
        &binary("balancer"),
        &pebble.config(tls_b, storage.path(), "[\"www.acme.test\"]", ""),
        &[],
    );
    let root = pebble.root();
    let leaf_a = wait_for_certificate(&a, tls_a, "www.acme.test", &root);
    let leaf_b = wait_for_certificate(&b, tls_b, "www.acme.test", &root);
    assert_eq!(leaf_a, leaf_b, "both serve the one certificate ordered");
    // Both have looked at the storage since (their state is valid).
    for lb in [&a, &b] {
        wait_for_state(admin_port(lb), "www.acme.test", "valid");
    }
    let total: f64 = [&a, &b]
        .iter()
        .map(|lb| orders(&scrape(admin_port(lb)), "www.acme.test"))
        .sum();
    assert_eq!(
        total,
        1.0,
        "one order between two replicas\na:\n{}\nb:\n{}",
        a.proc.log_text(),
        b.proc.log_text()
    );
}

#[test]
fn check_validates_the_acme_section_without_contacting_the_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("balancer.toml");
    // Nothing listens at the directory: --check must not need it.
    let section = |storage: &Path, domains: &str| {
        format!(
            "listen = \"127.0.0.1:80\"\n[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\nlisten = \"127.0.0.1:443\"\n\
             [tls.acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\ndomains = {domains}\nstorage = {}\n",
            free_port(),
            toml_path(storage)
        )
    };
    let check = |text: &str| {
        std::fs::write(&config, text).expect("write the config");
        run_balancer(&["--check", "--config", config.to_str().expect("UTF-8")])
    };
    let storage = dir.path().join("acme");
    let (code, out) = check(&section(&storage, "[\"www.example.com\"]"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
    assert!(!storage.exists(), "--check creates nothing: {out}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("write a file");
    let (code, out) = check(&section(&file.join("acme"), "[\"www.example.com\"]"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tls.acme.storage") && out.contains("is not a directory"),
        "{out}"
    );

    let (code, out) = check(&section(&storage, "[\"*.example.com\"]"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("wildcard"), "{out}");

    // A name that no route would serve.
    let routed = section(&storage, "[\"www.example.com\", \"other.example.com\"]").replace(
        "[upstream]\nservers",
        "[[route]]\nhost = \"www.example.com\"\nupstream = \"web\"\n[upstreams.web]\nservers",
    );
    let (code, out) = check(&routed);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("other.example.com: no route serves this host"),
        "{out}"
    );
    assert!(!out.contains("www.example.com: no route"), "{out}");
}

/// The configuration `compose.acme.yaml` runs, container-free: the file as
/// shipped, with only its addresses, CA and storage pointed at this test.
#[test]
fn the_compose_acme_configuration_obtains_a_certificate_from_pebble() {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/balancer-acme.toml"),
    )
    .expect("deploy/balancer-acme.toml");
    let port = free_port();
    let pebble = Pebble::start(port, Duration::from_secs(3600), &[]);
    let storage = tempfile::tempdir().expect("temp dir");
    let (tls_port, admin) = (free_port(), free_port());
    let mut body = String::new();
    for line in shipped.lines() {
        let line = match line.split(" = ").next().unwrap_or_default() {
            "listen" if line.contains(":80\"") => continue, // start_on writes its own
            "admin_listen" => format!("admin_listen = \"127.0.0.1:{admin}\""),
            "listen" => format!("listen = \"127.0.0.1:{tls_port}\""),
            "directory" => format!(
                "directory = \"{}\"\nca_file = {}",
                pebble.directory,
                toml_path(&pebble.pki.ca)
            ),
            "domains" => "domains = [\"www.acme.test\"]".to_owned(),
            "storage" => format!("storage = {}", toml_path(storage.path())),
            _ => line.to_owned(),
        };
        body.push_str(&line);
        body.push('\n');
    }
    let lb = start_on(port, &body);
    let root = pebble.root();
    wait_for_certificate(&lb, tls_port, "www.acme.test", &root);
    let status = status(admin);
    assert_eq!(
        status["acme"]["www.acme.test"]["state"], "valid",
        "{status:#}"
    );
}

/// A CA that requires external account binding gets it, with the HMAC key
/// read from a file (as a secret is mounted).
#[test]
fn external_account_binding_is_sent_from_a_key_file() {
    // base64url, as CAs hand the key out.
    let key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let port = free_port();
    let pebble = Pebble::start_with(
        port,
        serde_json::json!({
            "externalAccountBindingRequired": true,
            "externalAccountMACKeys": { "kid-1": key },
        }),
    );
    let storage = tempfile::tempdir().expect("temp dir");
    let key_file = storage.path().join("eab.key");
    std::fs::write(&key_file, format!("{key}\n")).expect("write the key");
    let tls_port = free_port();
    let eab = |kid: &str| {
        format!(
            "eab_kid = \"{kid}\"\neab_hmac_key = {{ file = {} }}\n",
            toml_path(&key_file)
        )
    };
    // A kid the CA does not know: refused, with the CA's reason.
    let acme_dir = storage.path().join("acme");
    let lb = start_on(
        port,
        &pebble.config(
            tls_port,
            &acme_dir,
            "[\"www.acme.test\"]",
            &eab("kid-unknown"),
        ),
    );
    let admin = admin_port(&lb);
    let state = wait_for_state(admin, "www.acme.test", "failing");
    assert!(
        state["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("creating the account"),
        "{state:#}"
    );
    drop(lb);
    let lb = start_on(
        port,
        &pebble.config(tls_port, &acme_dir, "[\"www.acme.test\"]", &eab("kid-1")),
    );
    wait_for_certificate(&lb, tls_port, "www.acme.test", &pebble.root());
}

/// A stand-in CA over HTTPS (a second balancer whose `routes(its URL)`
/// answer as the CA would), and a balancer whose `[tls.acme]` points at it:
/// what must live while the test runs, the balancer's admin port, the balancer.
fn behind_a_stand_in_ca(
    routes: impl Fn(&str) -> String,
) -> ((Balancer, Pki, tempfile::TempDir), u16, Balancer) {
    let pki = Pki::new(&["127.0.0.1"]);
    let ca_port = free_port();
    let ca = start_balancer(&format!(
        "[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\nlisten = \"127.0.0.1:{ca_port}\"\ncertificate = {}\nprivate_key = {}\n{}",
        toml_path(&pki.cert),
        toml_path(&pki.key),
        routes(&format!("https://127.0.0.1:{ca_port}"))
    ));
    let storage = tempfile::tempdir().expect("temp dir");
    let (admin, tls_port) = (free_port(), free_port());
    let lb = start_balancer(&format!(
        "admin_listen = \"127.0.0.1:{admin}\"\n[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\
         [tls.acme]\ndirectory = \"https://127.0.0.1:{ca_port}/dir\"\ndomains = [\"www.acme.test\"]\nstorage = {}\nca_file = {}\n",
        toml_path(storage.path()),
        toml_path(&pki.ca)
    ));
    ((ca, pki, storage), admin, lb)
}

/// A CA whose answer is no problem document (a proxy's error page): the
/// failure names the status it answered.
#[test]
fn a_ca_answering_an_error_page_is_named_by_its_status() {
    let (_ca, admin, lb) = behind_a_stand_in_ca(|_| {
        "[[route]]\npath = \"/\"\nrespond = { status = 503, body = \"<html>maintenance</html>\", content_type = \"text/html\" }\n".to_owned()
    });
    let state = wait_for_state(admin, "www.acme.test", "failing");
    let error = state["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("503 Service Unavailable"), "{state:#}");
    assert_eq!(get(&lb.url("/health-check")).map(|r| r.status), Ok(200));
}

/// A CA at its rate limit answers 429 with `Retry-After`: the next attempt
/// waits that long, not the 10 s of the first retry. The CA here is a
/// second balancer over HTTPS whose route answers as a rate-limited ACME
/// server does.
#[test]
fn a_rate_limited_ca_is_asked_again_only_after_its_retry_after() {
    let problem = r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many new orders recently","status":429}"#;
    let (_ca, admin, lb) = behind_a_stand_in_ca(|ca| {
        let directory = format!(
            r#"{{"newNonce":"{ca}/nonce","newAccount":"{ca}/account","newOrder":"{ca}/order"}}"#
        );
        format!(
            "[[route]]\npath = \"/dir\"\nrespond = {{ status = 200, body = '{directory}', content_type = \"application/json\" }}\n\
             [[route]]\npath = \"/nonce\"\nrespond = {{ status = 200 }}\nresponse_headers = {{ set = {{ \"Replay-Nonce\" = \"bm9uY2U\" }} }}\n\
             [[route]]\npath = \"/\"\nrespond = {{ status = 429, body = '{problem}', content_type = \"application/problem+json\" }}\n\
             response_headers = {{ set = {{ \"Retry-After\" = \"3600\", \"Replay-Nonce\" = \"bm9uY2U\" }} }}\n"
        )
    });
    let state = wait_for_state(admin, "www.acme.test", "failing");
    let next = state["next_attempt"]
        .as_str()
        .and_then(|t| httpdate::parse_http_date(t).ok())
        .unwrap_or_else(|| panic!("no next_attempt: {state:#}"));
    let wait = next
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let error = state["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("too many new orders recently") && error.contains("rateLimited"),
        "the CA's problem detail: {state:#}"
    );
    assert!(
        wait > Duration::from_secs(3500),
        "Retry-After: 3600 must put the next attempt an hour away, not {wait:?}: {state:#}"
    );
    assert!(
        lb.wait_for_log("acme: www.acme.test: ")
            .contains("next in 3"),
        "{}",
        lb.proc.log_text()
    );
}

/// Storage that cannot be written (here: under a file) fails like a CA:
/// visible and retried, with the balancer serving.
#[test]
fn storage_that_cannot_be_written_is_a_visible_failure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("write a file");
    let (admin, tls_port) = (free_port(), free_port());
    let lb = start_balancer(&format!(
        "admin_listen = \"127.0.0.1:{admin}\"\n[upstream]\nservers = [\"127.0.0.1:1\"]\n[tls]\nlisten = \"127.0.0.1:{tls_port}\"\n\
         [tls.acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\ndomains = [\"www.acme.test\"]\nstorage = {}\n",
        free_port(),
        toml_path(&file.join("acme"))
    ));
    let state = wait_for_state(admin, "www.acme.test", "failing");
    assert!(
        state["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot take the lock"),
        "{state:#}"
    );
    assert_eq!(get(&lb.url("/health-check")).map(|r| r.status), Ok(200));
}
