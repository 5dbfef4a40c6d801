//! How a voicemail PIN is stored: PBKDF2-HMAC-SHA256 with a random salt per user, as
//! `pbkdf2-sha256$<iterations>$<salt>$<hash>` (salt and hash in standard base64 without padding).
//!
//! Kamailio never reads the PIN; a voicemail application verifies it with [`verify`]. A PIN has
//! few digits, so only a slow, salted hash keeps it from falling to a table or a quick search:
//! the salt makes two users with the same PIN store different values, the iterations make each
//! guess cost. The stored value is never compared with a desired PIN when planning (that would
//! cost the same work per user); a PIN write is always a write.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use pbkdf2::sha2::Sha256;

use crate::pbx::Secret;

/// The prefix of a stored PIN.
pub const SCHEME: &str = "pbkdf2-sha256";
/// PBKDF2 rounds for new PINs. Stored with each value, so it can be raised without breaking
/// the PINs already stored.
pub const ITERATIONS: u32 = 100_000;
const SALT_BYTES: usize = 16;
const HASH_BYTES: usize = 32;

/// The stored form of a PIN, with a fresh random salt.
pub fn hash(pin: &Secret) -> String {
    hash_with(pin, &rand::random::<[u8; SALT_BYTES]>(), ITERATIONS)
}

fn hash_with(pin: &Secret, salt: &[u8], iterations: u32) -> String {
    let out =
        pbkdf2::pbkdf2_hmac_array::<Sha256, HASH_BYTES>(pin.expose().as_bytes(), salt, iterations);
    format!(
        "{SCHEME}${iterations}${}${}",
        B64.encode(salt),
        B64.encode(out)
    )
}

/// Whether `pin` is the PIN `stored` was made from (false for anything not in this format).
pub fn verify(stored: &str, pin: &Secret) -> bool {
    let mut parts = stored.split('$');
    let (Some(SCHEME), Some(iterations), Some(salt), Some(_), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(iterations), Ok(salt)) = (iterations.parse::<u32>(), B64.decode(salt)) else {
        return false;
    };
    if iterations == 0 {
        return false;
    }
    let actual = hash_with(pin, &salt, iterations);
    // Equal length by construction; compare without an early exit.
    actual.len() == stored.len()
        && actual
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn same_pin_stores_differently_and_verifies() {
        let pin = Secret::new("4711");
        let a = hash(&pin);
        let b = hash(&pin);
        assert_ne!(a, b, "a random salt per user");
        assert!(a.starts_with("pbkdf2-sha256$100000$"), "{a}");
        assert_eq!(a.split('$').count(), 4);
        assert!(verify(&a, &pin) && verify(&b, &pin));
        assert!(!verify(&a, &Secret::new("4712")));
        assert!(!a.contains("4711"));
    }

    #[test]
    fn a_known_vector() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256, P = "passwd", S = "salt", c = 1.
        let stored = hash_with(&Secret::new("passwd"), b"salt", 1);
        let hash = stored.rsplit('$').next().unwrap();
        assert_eq!(
            hex::encode(B64.decode(hash).unwrap()),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    #[test]
    fn no_unsalted_digest_is_stored() {
        let pin = Secret::new("123456");
        let stored = hash(&pin);
        let old = hex::encode(sha2::Sha256::digest(b"pbx.test:204:123456"));
        assert!(!stored.contains(&old));
        assert!(!stored.starts_with("sha256:"));
    }

    #[test]
    fn malformed_values_never_verify() {
        let pin = Secret::new("1234");
        for stored in [
            "",
            "sha256:abcd",
            "pbkdf2-sha256$0$AAAA$AAAA",
            "pbkdf2-sha256$x$AAAA$AAAA",
            "pbkdf2-sha256$1$!!$AAAA",
            "pbkdf2-sha256$1$AAAA$AAAA$extra",
        ] {
            assert!(!verify(stored, &pin), "{stored}");
        }
    }
}
