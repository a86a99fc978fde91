//! [`TestCa`]: a throwaway certificate authority (the `openssl` command) that issues
//! server and client certificates for TLS tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A certificate and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, unencrypted).
    pub key: PathBuf,
}

/// A CA valid for one day, in a temporary directory removed on drop, that issues
/// P-256 certificates for `localhost` / `127.0.0.1` (servers) or any name (clients).
///
/// ```no_run
/// let ca = beamline_test_support::TestCa::new();
/// let server = ca.issue("server", true);
/// let client = ca.issue("client-a", false);
/// # let _ = (ca.ca_pem(), server.cert, client.key);
/// ```
#[derive(Debug)]
pub struct TestCa {
    dir: TempDir,
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("TestCa: cannot run openssl (install the Debian package openssl): {e}")
        });
    assert!(
        out.status.success(),
        "TestCa: openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestCa {
    /// Creates the CA (key and self-signed certificate).
    ///
    /// # Panics
    ///
    /// If `openssl` is missing or fails.
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("beamline-ca-")
            .tempdir()
            .unwrap_or_else(|e| panic!("TestCa: cannot create a temporary directory: {e}"));
        let ca = TestCa { dir };
        let (key, pem) = (ca.path("ca.key"), ca.path("ca.pem"));
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=beamline-test-ca",
                ][..],
                &EC[..],
                &["-keyout", &key, "-out", &pem][..],
            ]
            .concat(),
        );
        ca
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// The CA certificate (PEM), to trust.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a certificate with common name `name`: for a server (`server = true`:
    /// names `localhost` and `127.0.0.1`, server auth) or a client (client auth).
    pub fn issue(&self, name: &str, server: bool) -> Issued {
        let ext = self.path(&format!("{name}.ext"));
        let usage = if server {
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
        std::fs::write(&ext, format!("basicConstraints=CA:FALSE\n{usage}"))
            .unwrap_or_else(|e| panic!("TestCa: cannot write {ext}: {e}"));
        let (key, csr, cert) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.csr")),
            self.path(&format!("{name}.pem")),
        );
        let subject = format!("/CN={name}");
        openssl(
            &[
                &["req", "-subj", &subject][..],
                &EC[..],
                &["-keyout", &key, "-out", &csr][..],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.path("ca.pem"),
            "-CAkey",
            &self.path("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        Issued {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}
