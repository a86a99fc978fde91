//! NATS decentralised auth for tests: an operator, one account and its users as
//! JWTs signed with NKeys (the `ed25519-nkey` profile nats-server checks), a
//! server configuration that trusts them (`operator` + a memory resolver), and
//! `.creds` files the way `nsc` writes them — so `credentials_file` is tested
//! against a real server without `nsc`.

use std::time::{SystemTime, UNIX_EPOCH};

use nkeys::KeyPair;
use serde_json::{Value, json};

/// An operator with one account, ready to issue user credentials.
pub struct NatsOperator {
    operator: KeyPair,
    account: KeyPair,
    operator_jwt: String,
    account_jwt: String,
}

impl Default for NatsOperator {
    fn default() -> Self {
        Self::new()
    }
}

impl NatsOperator {
    /// A fresh operator and account (keys made here, nothing read from disk).
    pub fn new() -> NatsOperator {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let operator_jwt = encode(
            &operator,
            &operator.public_key(),
            "test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = encode(
            &operator,
            &account.public_key(),
            "test-account",
            json!({"type": "account", "version": 2, "limits": {
                "subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1,
                "data": -1, "payload": -1, "wildcards": true
            }}),
        );
        NatsOperator {
            operator,
            account,
            operator_jwt,
            account_jwt,
        }
    }

    /// The server configuration that trusts this operator and knows the account.
    pub fn server_config(&self) -> String {
        format!(
            "operator: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n}}\n",
            self.operator_jwt,
            self.account.public_key(),
            self.account_jwt
        )
    }

    /// The text of a `.creds` file for a new user of the account, with no
    /// permission limits.
    pub fn user_creds(&self, name: &str) -> String {
        let user = KeyPair::new_user();
        let jwt = encode(
            &self.account,
            &user.public_key(),
            name,
            json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                   "subs": -1, "data": -1, "payload": -1}),
        );
        let seed = user.seed().expect("a generated user key has a seed");
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    /// The operator's public key (for messages).
    pub fn operator_public_key(&self) -> String {
        self.operator.public_key()
    }
}

/// A JWT of `claims` (the `nats` part) for `subject`, issued and signed by `issuer`.
fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let jti: u128 = rand_u128();
    let claims = json!({
        "jti": format!("{jti:032X}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = base64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = base64url(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{body}");
    let signature = issuer
        .sign(signing_input.as_bytes())
        .expect("a generated key pair signs");
    format!("{signing_input}.{}", base64url(&signature))
}

/// A unique id without a random-number crate: time and a counter.
fn rand_u128() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    nanos ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 96)
}

/// Base64url without padding (RFC 4648 §5), as JWTs use it.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(b"fooba"), "Zm9vYmE");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn a_jwt_is_signed_by_its_issuer() {
        let op = NatsOperator::new();
        let parts: Vec<&str> = op.operator_jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let creds = op.user_creds("u");
        assert!(creds.contains("BEGIN NATS USER JWT") && creds.contains("BEGIN USER NKEY SEED"));
        assert!(op.server_config().contains(&op.account.public_key()));
    }
}
