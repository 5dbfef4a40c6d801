//! One TLS crypto provider for the whole process: ring, which kube already uses.

/// Installs ring as rustls' default provider. Idempotent; safe to call from every client builder.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
