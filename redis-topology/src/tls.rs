//! Certificates for a topology served over TLS: a CA of its own and one
//! server certificate for 127.0.0.1, made with the `openssl` command.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The files every node of a TLS topology is configured with.
#[derive(Clone, Debug)]
pub(crate) struct TlsFiles {
    pub(crate) ca_cert: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// The CA certificate (PEM), for clients to trust.
    pub(crate) ca_pem: Vec<u8>,
}

impl TlsFiles {
    /// The `redis.conf` lines that make a node listen on `port` over TLS
    /// only, and use TLS for replication and Sentinel's links too.
    pub(crate) fn config(&self, port: u16) -> String {
        format!(
            "port 0\n\
             tls-port {port}\n\
             tls-cert-file {cert}\n\
             tls-key-file {key}\n\
             tls-ca-cert-file {ca}\n\
             tls-auth-clients no\n\
             tls-replication yes\n",
            cert = self.cert.display(),
            key = self.key.display(),
            ca = self.ca_cert.display(),
        )
    }
}

/// Makes a CA and a server certificate for `127.0.0.1` and `localhost`
/// (P-256 keys, valid two days) in `dir`.
pub(crate) fn generate(dir: &Path) -> Result<TlsFiles> {
    let ca_cert = dir.join("ca.crt");
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .map_err(|source| Error::Io {
        path: ext.clone(),
        source,
    })?;
    let name = |file: &str| dir.join(file).display().to_string();
    let (ca_key_s, ca_cert_s, key_s, csr_s, cert_s, ext_s) = (
        name("ca.key"),
        name("ca.crt"),
        name("server.key"),
        name("server.csr"),
        name("server.crt"),
        name("server.ext"),
    );
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca: Vec<&str> = [
        &["req", "-x509"][..],
        &new_key,
        &[
            "-days",
            "2",
            "-subj",
            "/CN=redis-topology CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &ca_key_s,
            "-out",
            &ca_cert_s,
        ],
    ]
    .concat();
    let request: Vec<&str> = [
        &["req"][..],
        &new_key,
        &["-subj", "/CN=127.0.0.1", "-keyout", &key_s, "-out", &csr_s],
    ]
    .concat();
    let sign = [
        "x509",
        "-req",
        "-days",
        "2",
        "-CAcreateserial",
        "-in",
        &csr_s,
        "-CA",
        &ca_cert_s,
        "-CAkey",
        &ca_key_s,
        "-extfile",
        &ext_s,
        "-out",
        &cert_s,
    ];
    for args in [&ca[..], &request[..], &sign[..]] {
        openssl(args)?;
    }
    let ca_pem = std::fs::read(&ca_cert).map_err(|source| Error::Io {
        path: ca_cert.clone(),
        source,
    })?;
    Ok(TlsFiles {
        ca_cert,
        cert,
        key,
        ca_pem,
    })
}

fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|source| Error::Tls {
            reason: format!(
                "cannot run `openssl` (Debian/Ubuntu: apt-get install openssl): {source}"
            ),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Tls {
            reason: format!(
                "`openssl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}
