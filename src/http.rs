//! The one HTTP client setup every outbound client shares.

use std::sync::Once;
use std::time::Duration;

static CRYPTO_PROVIDER: Once = Once::new();

/// Installs ring as the process's rustls provider (the same one the Kubernetes client
/// uses), so no second crypto library is compiled in.
pub fn install_crypto_provider() {
    CRYPTO_PROVIDER.call_once(|| {
        // An error only means another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

pub fn http_client(timeout: Duration) -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("ml-intern/", env!("CARGO_PKG_VERSION")))
        .build()
        // Building only fails when the TLS backend cannot initialise, which the provider
        // installed above rules out.
        .expect("HTTP client configuration is valid")
}

/// A client for long-lived streams: no overall deadline (readers time out each read).
pub fn streaming_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("ml-intern/", env!("CARGO_PKG_VERSION")))
        .build()
        // As in http_client.
        .expect("HTTP client configuration is valid")
}

/// The cause chain of a reqwest error in one line ("error sending request: connection
/// refused"), which reqwest's Display alone hides.
pub fn describe_error(e: &reqwest::Error) -> String {
    let mut parts = vec![if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        e.to_string()
    }];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
