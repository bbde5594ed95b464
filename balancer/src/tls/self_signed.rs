//! `balancer cert --self-signed --host NAME --out DIR`: a development CA and
//! a certificate for NAME signed by it, written as PEM files. Nothing is
//! ever generated without being asked for: a missing certificate is an
//! error, not a reason to make one.
//!
//! - `DIR/ca.pem`: the CA to trust (`curl --cacert DIR/ca.pem`);
//! - `DIR/cert.pem`: the certificate, then the CA (the chain to serve);
//! - `DIR/key.pem`: the certificate's private key, readable by all (0644), so
//!   that a container's unprivileged user can serve it: it is a development
//!   key, for a CA whose own key is thrown away.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// How long a development certificate is valid.
const VALID_DAYS: i64 = 365;

/// Writes the three files; returns their paths, or what went wrong.
pub fn write(hosts: &[String], out: &Path) -> Result<Vec<PathBuf>, String> {
    if hosts.is_empty() {
        return Err("name at least one --host".to_owned());
    }
    let now = time::OffsetDateTime::now_utc();
    let until = now + time::Duration::days(VALID_DAYS);

    let ca_key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    // A name of its own: clients that hold several development CAs pick
    // the issuer by name (and by key identifier, set on the certificate).
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("balancer development CA {:08x}", fastrand::u32(..)),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now;
    ca.not_after = until;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| format!("cannot sign the CA: {e}"))?;

    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut leaf =
        CertificateParams::new(hosts.to_vec()).map_err(|e| format!("invalid --host: {e}"))?;
    leaf.distinguished_name
        .push(DnType::CommonName, hosts[0].clone());
    leaf.not_before = now;
    leaf.not_after = until;
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf
        .signed_by(&key, &ca_cert, &ca_key)
        .map_err(|e| format!("cannot sign the certificate: {e}"))?;

    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let files = [
        ("ca.pem", ca_cert.pem(), 0o644),
        (
            "cert.pem",
            format!("{}{}", cert.pem(), ca_cert.pem()),
            0o644,
        ),
        // Readable by the container user that serves it: a development key for
        // a throwaway CA whose own key is never written anywhere.
        ("key.pem", key.serialize_pem(), 0o644),
    ];
    let mut written = Vec::new();
    for (name, text, mode) in files {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        set_mode(&path, mode)?;
        written.push(path);
    }
    Ok(written)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))
}
